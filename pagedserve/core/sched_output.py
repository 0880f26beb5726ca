"""What the scheduler hands the model runner each step, and what comes back.

Plain data, as vLLM's ``NewRequestData`` / ``CachedRequestData``: the model runner
never sees a :class:`~pagedserve.core.request.Request`. It keeps its own state per
request, built from ``NewRequestData`` when a request (re)enters the batch and
updated from ``CachedRequestData`` (plus the tokens it sampled) afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pagedserve.sampling_params import SamplingParams


@dataclass(slots=True)
class NewRequestData:
    """A request the runner must (re)build its state for: first scheduled, or resumed
    after preemption (then ``output_token_ids`` holds the tokens generated so far and
    the whole sequence is recomputed as a prefill).

    ``prompt_token_ids`` may be shared with the scheduler's request: read-only.
    """

    req_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams  # seed, logprobs, prompt_logprobs, penalties, ...
    block_ids: list[int]  # the request's full block table row
    num_computed_tokens: int  # tokens whose KV is already cached (prefix hits)
    output_token_ids: list[int] = field(default_factory=list)  # a copy; empty unless resumed


@dataclass(slots=True)
class CachedRequestData:
    """Requests the runner already holds, scheduled again this step (batch order).

    Per request: the block ids appended to its block table since it was last
    scheduled, and its progress. The runner appends the tokens it sampled itself.
    """

    req_ids: list[str] = field(default_factory=list)
    new_block_ids: list[list[int]] = field(default_factory=list)
    num_computed_tokens: list[int] = field(default_factory=list)

    @property
    def num_reqs(self) -> int:
        return len(self.req_ids)

    def append(self, req_id: str, new_block_ids: list[int], num_computed_tokens: int) -> None:
        self.req_ids.append(req_id)
        self.new_block_ids.append(new_block_ids)
        self.num_computed_tokens.append(num_computed_tokens)

    def remove(self, req_id: str) -> None:
        """Take a request back out (it was preempted later in the same step)."""
        index = self.req_ids.index(req_id)
        del self.req_ids[index], self.new_block_ids[index], self.num_computed_tokens[index]


@dataclass
class SchedulerOutput:
    """One step's work.

    The batch is ``scheduled_cached_reqs`` (running requests, in admission order)
    followed by ``scheduled_new_reqs`` (requests admitted this step). For each,
    ``num_scheduled_tokens[req_id]`` tokens starting at its ``num_computed_tokens``
    are computed (the scheduler advances its own count after the step, in
    ``update_from_output``).
    """

    scheduled_new_reqs: list[NewRequestData]
    scheduled_cached_reqs: CachedRequestData
    num_scheduled_tokens: dict[str, int]
    total_num_scheduled_tokens: int
    # Requests that finished/aborted since the last step: the runner drops their state.
    finished_req_ids: set[str] = field(default_factory=set)
    # Requests preempted since the last step: the runner drops their batch row; they
    # come back as NewRequestData.
    preempted_req_ids: set[str] = field(default_factory=set)
    # Structured outputs: for requests that sample this step under a constraint, row i of
    # ``grammar_bitmask`` (int32 [n, ceil(vocab / 32)], llguidance's layout) says which
    # tokens request ``structured_output_request_ids[i]`` may sample. It is a
    # ``concurrent.futures.Future`` of that tensor (filled while the forward runs) or the
    # tensor itself.
    structured_output_request_ids: list[str] = field(default_factory=list)
    grammar_bitmask: Any = None

    @property
    def is_empty(self) -> bool:
        return self.total_num_scheduled_tokens == 0

    @property
    def scheduled_req_ids(self) -> list[str]:
        """Request ids in batch order."""
        return self.scheduled_cached_reqs.req_ids + [r.req_id for r in self.scheduled_new_reqs]

    @property
    def new_req_ids(self) -> set[str]:
        return {r.req_id for r in self.scheduled_new_reqs}


@dataclass
class ModelRunnerOutput:
    """What the model runner returns for a step.

    ``sampled_token_ids[req_id]`` is the token sampled for a request whose
    scheduled tokens reached the end of its known tokens (absent for a partial
    prefill chunk). Logprobs are per sampled token: a list of (token_id, logprob,
    rank) with the chosen token first, then the top-N.
    """

    sampled_token_ids: dict[str, int]
    logprobs: dict[str, list[tuple[int, float, int]]] = field(default_factory=dict)
    # prompt logprobs computed this step for prompt positions (chunk by chunk):
    # list aligned to the prompt positions 1.. covered in this step; each entry as above.
    prompt_logprobs: dict[str, list[list[tuple[int, float, int]]]] = field(default_factory=dict)
