"""What the scheduler hands the model runner each step."""

from __future__ import annotations

from dataclasses import dataclass, field

from pagedserve.core.request import Request


@dataclass
class SchedulerOutput:
    """One step's work.

    ``scheduled_requests`` lists the requests that compute tokens this step in
    batch order (running requests first, then newly admitted ones). For each,
    ``num_scheduled_tokens[req_id]`` tokens of ``request.all_token_ids`` starting at
    ``request.num_computed_tokens`` are computed (the scheduler advances
    ``num_computed_tokens`` only after the step, in ``update_from_output``).
    ``block_ids[req_id]`` is the request's full block list (block table row).
    """

    scheduled_requests: list[Request]
    num_scheduled_tokens: dict[str, int]
    total_num_scheduled_tokens: int
    block_ids: dict[str, list[int]]
    # Requests whose runner state must be (re)built from scratch this step:
    # newly admitted or resumed after preemption.
    new_req_ids: set[str] = field(default_factory=set)
    # Requests that finished/aborted/were preempted since the last step: the
    # runner drops its per-request state for them.
    finished_req_ids: set[str] = field(default_factory=set)
    preempted_req_ids: set[str] = field(default_factory=set)

    @property
    def is_empty(self) -> bool:
        return self.total_num_scheduled_tokens == 0


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
