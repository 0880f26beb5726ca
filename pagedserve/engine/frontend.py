"""EngineFrontend: what the offline LLMEngine and the API server's AsyncLLM share.

A front end owns the tokenizer, the input processor (validation, one engine-core
request per child of an n > 1 request), the output processor (detokenization, stop
strings, fan-in), and the bookkeeping of which requests are in flight. It talks to
the engine core only through a client (``engine_core``) with three calls:
``add_request(EngineCoreRequest)``, ``abort_requests(ids)`` and a way to get the next
``EngineCoreOutputs`` — in-process (``InprocClient``, for ``LLMEngine``) or over ZMQ
(``AsyncMPClient``, for ``AsyncLLM``).
"""

from __future__ import annotations

import time
from typing import Any, Protocol

from pagedserve.config import EngineConfig
from pagedserve.engine.input_processor import (
    InputProcessor,
    InvalidRequestError,
    ProcessedPrompt,
    PromptType,
)
from pagedserve.engine.messages import EngineCoreOutputs, EngineCoreRequest
from pagedserve.engine.output_processor import OutputProcessor, ParentRequest
from pagedserve.metrics.stats import IterationStats
from pagedserve.outputs import RequestOutput
from pagedserve.sampling_params import SamplingParams
from pagedserve.transformers_utils.tokenizer import load_tokenizer


class EngineCoreClient(Protocol):
    """The calls a front end makes on its engine core."""

    def add_request(self, request: EngineCoreRequest) -> None: ...

    def abort_requests(self, request_ids: list[str]) -> None: ...


class EngineFrontend:
    """Tokenizer, input and output processing, and request bookkeeping."""

    engine_core: EngineCoreClient

    def __init__(
        self, engine_config: EngineConfig, strict_max_tokens: bool = False, log_stats: bool = False
    ) -> None:
        self.engine_config = engine_config
        self.model_config = engine_config.model_config
        self.tokenizer = load_tokenizer(self.model_config.tokenizer_path)
        self.input_processor = InputProcessor(
            self.model_config, engine_config.scheduler_config, self.tokenizer, strict_max_tokens
        )
        self.log_stats = log_stats
        self.output_processor = OutputProcessor(self.tokenizer, log_stats=log_stats)

    def get_tokenizer(self) -> Any:
        return self.tokenizer

    # ---------------------------------------------------------------- requests
    def process_request(
        self,
        request_id: str,
        prompt: PromptType | ProcessedPrompt,
        params: SamplingParams,
        priority: int = 0,
        arrival_time: float | None = None,
        cache_salt: str | None = None,
    ) -> tuple[ParentRequest, ProcessedPrompt, list[EngineCoreRequest]]:
        """Validate one request without adding it (raises InvalidRequestError)."""
        if request_id in self.output_processor.parents:
            raise InvalidRequestError(
                f"Request id {request_id!r} is already running", param="request_id"
            )
        parent = ParentRequest(request_id, params)
        child_ids = [parent.child_request_id(i) for i in range(parent.n)]
        child_params = [parent.child_params(i) for i in range(parent.n)]
        processed, core_requests = self.input_processor.process_inputs(
            child_ids, prompt, child_params, priority, arrival_time, cache_salt
        )
        return parent, processed, core_requests

    def add_parent_request(
        self,
        request_id: str,
        prompt: PromptType | ProcessedPrompt,
        params: SamplingParams,
        priority: int = 0,
        cache_salt: str | None = None,
        trace_context: Any = None,
    ) -> ParentRequest:
        """Validate, register and send one request (n > 1: its n children)."""
        parent, processed, core_requests = self.process_request(
            request_id, prompt, params, priority, time.time(), cache_salt
        )
        parent.trace_context = trace_context
        self.output_processor.add_children(parent, processed.prompt, core_requests)
        for core_request in core_requests:
            self.engine_core.add_request(core_request)
        return parent

    def abort_parent_requests(
        self, request_ids: list[str], iteration_stats: IterationStats | None = None
    ) -> list[str]:
        """Forget requests (parent or child ids) here and abort them in the core."""
        child_ids = self.output_processor.abort_requests(request_ids, iteration_stats)
        if child_ids:
            self.engine_core.abort_requests(child_ids)
        return child_ids

    def has_unfinished_requests(self) -> bool:
        return self.output_processor.has_unfinished_requests()

    def num_unfinished_requests(self) -> int:
        """Child requests (n > 1 counts n) this front end has in the engine."""
        return len(self.output_processor.request_states)

    # ---------------------------------------------------------------- outputs
    def process_core_outputs(
        self, core_outputs: EngineCoreOutputs, iteration_stats: IterationStats | None = None
    ) -> list[RequestOutput]:
        """Turn one step's outputs into RequestOutputs; stop-string hits are aborted in the core."""
        if not core_outputs.outputs:
            return []
        outputs, to_abort = self.output_processor.process_outputs(
            core_outputs.outputs, time.time(), core_outputs.timestamp, iteration_stats
        )
        if to_abort:
            self.engine_core.abort_requests(to_abort)
        return outputs
