"""The wire protocol between the front end (LLM / API server) and the engine core.

msgspec structs, so the same messages travel in-process and over ZMQ. Over ZMQ every
message is two frames: a one-byte kind (``InputKind`` to the core, ``OutputKind``
from it) and a msgpack payload.
"""

from __future__ import annotations

from enum import Enum
from typing import Any

import msgspec

from pagedserve.sampling_params import SamplingParams

# (token_id, logprob, rank): the chosen token first, then the top-N.
TokenLogprobs = list[tuple[int, float, int]]


class EngineCoreRequest(msgspec.Struct, array_like=True, omit_defaults=True):
    """A request as the engine core receives it: tokens, not text."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    arrival_time: float
    priority: int = 0
    cache_salt: str | None = None


class EngineCoreOutput(msgspec.Struct, array_like=True, omit_defaults=True):
    """What one step produced for one request."""

    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[TokenLogprobs] | None = None
    new_prompt_logprobs: list[TokenLogprobs] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_cached_tokens: int = 0
    first_scheduled_time: float | None = None
    num_preemptions: int = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class SchedulerStats(msgspec.Struct, omit_defaults=True):
    """Engine-core state after a step, for metrics and the stats log."""

    num_running_reqs: int = 0
    num_waiting_reqs: int = 0
    kv_cache_usage: float = 0.0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    num_preemptions: int = 0
    num_scheduled_tokens: int = 0
    # The step budget (0: off): the last step's target in ms and its prefill token budget.
    step_budget_ms: float = 0.0
    prefill_token_budget: int = 0


class EngineCoreOutputs(msgspec.Struct, array_like=True, omit_defaults=True):
    """One step's outputs for all requests, with the scheduler's state."""

    outputs: list[EngineCoreOutput]
    scheduler_stats: SchedulerStats | None = None
    timestamp: float = 0.0


class InputKind(bytes, Enum):
    """First frame of a message to the engine core."""

    ADD = b"A"  # payload: EngineCoreRequest
    ABORT = b"X"  # payload: list[str] (request ids)
    UTILITY = b"U"  # payload: (call_id, method, args)
    SHUTDOWN = b"S"  # payload: empty


class OutputKind(bytes, Enum):
    """First frame of a message from the engine core."""

    OUTPUTS = b"O"  # payload: EngineCoreOutputs
    HEARTBEAT = b"H"  # payload: EngineCoreHeartbeat
    UTILITY = b"U"  # payload: UtilityResult
    ERROR = b"E"  # payload: str (fatal; the process exits after sending it)


class EngineCoreHeartbeat(msgspec.Struct, array_like=True):
    """Sent at a fixed interval so the front end knows the busy loop is turning."""

    timestamp: float
    scheduler_stats: SchedulerStats


class UtilityResult(msgspec.Struct, array_like=True, omit_defaults=True):
    """The answer to one utility call."""

    call_id: int
    result: Any = None
    error: str | None = None


class EngineCoreReadyInfo(msgspec.Struct, omit_defaults=True):
    """Start-up facts the core reports once the model and KV cache are ready."""

    pid: int
    load_seconds: float
    num_blocks: int  # KV cache blocks, the null block included (KVCacheConfig)
    block_size: int
    kv_cache_memory_bytes: int
    num_threads: int
    isa: str
    device: str
    step_budget: str = ""  # the step-time budget, as the banner says it ("" : off)
    quantization: str = ""  # the int8 kernels chosen for this CPU ("" when unquantized)
