"""Front-end side of outputs: detokenize, stop strings, logprobs, n>1 fan-in, metrics.

Runs in the API process (or in-process for ``LLM``). Engine-core outputs carry token
ids; this turns them into ``RequestOutput`` objects and tells the caller which
requests to abort in the core (a stop string matched).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pagedserve.engine.detokenizer import IncrementalDetokenizer
from pagedserve.engine.messages import EngineCoreOutput, TokenLogprobs
from pagedserve.metrics.stats import IterationStats, RequestStateStats
from pagedserve.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from pagedserve.sampling_params import RequestOutputKind, SamplingParams


class ParentRequest:
    """Fans one user request with n > 1 into n child requests and back."""

    def __init__(self, request_id: str, params: SamplingParams) -> None:
        self.request_id = request_id
        self.params = params
        self.n = params.n
        self.children: dict[int, RequestState] = {}
        self.num_finished = 0
        # Set by the front end for tracing (pagedserve.metrics.tracing.RequestTraceContext).
        self.trace_context: Any = None

    def child_request_id(self, index: int) -> str:
        return f"{index}_{self.request_id}" if self.n > 1 else self.request_id

    def child_params(self, index: int) -> SamplingParams:
        if self.n == 1:
            return self.params
        params = self.params.clone()
        params.n = 1
        if params.seed is not None:
            # As vLLM: children of a seeded request get distinct, reproducible seeds.
            params.seed = params.seed + index
        return params


@dataclass
class RequestState:
    """One child request's output state."""

    request_id: str
    index: int
    parent: ParentRequest
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    detokenizer: IncrementalDetokenizer | None
    arrival_time: float
    output_token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, Logprob]] | None = None
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
    cumulative_logprob: float | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_cached_tokens: int = 0
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None
    num_preemptions: int = 0
    sent_token_offset: int = 0
    sent_logprob_offset: int = 0
    # Metrics timestamps and counts (only when the output processor logs stats).
    stats: RequestStateStats | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class OutputProcessor:
    """Owns the per-request output states of the front end."""

    def __init__(self, tokenizer: Any, log_stats: bool = False) -> None:
        self.tokenizer = tokenizer
        self.log_stats = log_stats
        self.request_states: dict[str, RequestState] = {}
        self.parents: dict[str, ParentRequest] = {}
        self._token_text_cache: dict[int, str] = {}
        # Called with each user request (parent) once all its children ended (tracing).
        self.on_parent_finished: Callable[[ParentRequest], None] | None = None

    def add_request(
        self,
        parent: ParentRequest,
        index: int,
        prompt: str | None,
        prompt_token_ids: list[int],
        params: SamplingParams,
        arrival_time: float,
    ) -> None:
        request_id = parent.child_request_id(index)
        if request_id in self.request_states:
            raise ValueError(f"Request id {request_id!r} is already running")
        detokenizer = None
        if params.detokenize:
            detokenizer = IncrementalDetokenizer.from_sampling_params(
                self.tokenizer, prompt_token_ids, params
            )
        state = RequestState(
            request_id=request_id,
            index=index,
            parent=parent,
            prompt=prompt,
            prompt_token_ids=prompt_token_ids,
            params=params,
            detokenizer=detokenizer,
            arrival_time=arrival_time,
            logprobs=[] if params.logprobs is not None else None,
            cumulative_logprob=0.0 if params.logprobs is not None else None,
            prompt_logprobs=[None] if params.prompt_logprobs is not None else None,
            stats=RequestStateStats(arrival_time=arrival_time) if self.log_stats else None,
        )
        parent.children[index] = state
        self.parents[parent.request_id] = parent
        self.request_states[request_id] = state

    def add_children(
        self, parent: ParentRequest, prompt: str | None, core_requests: list[Any]
    ) -> None:
        """Register the output state of every child of ``parent`` (EngineCoreRequests)."""
        for index, core_request in enumerate(core_requests):
            self.add_request(
                parent,
                index,
                prompt,
                core_request.prompt_token_ids,
                core_request.sampling_params,
                core_request.arrival_time,
            )

    def has_unfinished_requests(self) -> bool:
        return bool(self.request_states)

    def abort_requests(
        self, request_ids: list[str], iteration_stats: IterationStats | None = None
    ) -> list[str]:
        """Drop states of aborted parent or child ids; returns the child ids to abort in the core.

        With ``iteration_stats``, each dropped child counts as finished with reason "abort".
        """
        child_ids: list[str] = []
        aborted: list[RequestState] = []
        for rid in request_ids:
            parent = self.parents.pop(rid, None)
            if parent is not None:
                for child in parent.children.values():
                    if self.request_states.pop(child.request_id, None) is not None:
                        child_ids.append(child.request_id)
                        aborted.append(child)
            elif rid in self.request_states:
                state = self.request_states.pop(rid)
                self.parents.pop(state.parent.request_id, None)
                child_ids.append(rid)
                aborted.append(state)
        for state in aborted:
            if state.finish_reason is None:
                state.finish_reason = "abort"
                state.parent.num_finished += 1
            self._record_finished(state, iteration_stats)
        return child_ids

    # ---------------------------------------------------------------- outputs
    def process_outputs(
        self,
        outputs: list[EngineCoreOutput],
        now: float | None = None,
        engine_core_timestamp: float | None = None,
        iteration_stats: IterationStats | None = None,
    ) -> tuple[list[RequestOutput], list[str]]:
        """Apply one step's outputs; returns (outputs ready to hand out, ids to abort in core).

        With ``iteration_stats`` (one per engine-core step), the step's tokens, latencies
        and finished requests are accounted there (pagedserve.metrics.stats).
        """
        now = time.time() if now is None else now
        core_timestamp = engine_core_timestamp or now
        touched: dict[str, list[RequestState]] = {}
        to_abort: list[str] = []
        for output in outputs:
            state = self.request_states.get(output.request_id)
            if state is None:
                continue  # aborted meanwhile
            if iteration_stats is not None and state.stats is not None:
                iteration_stats.update_from_output(
                    output, core_timestamp, len(state.prompt_token_ids), state.stats
                )
            if self._apply(state, output, now):
                to_abort.append(state.request_id)
            touched.setdefault(state.parent.request_id, []).append(state)

        ready: list[RequestOutput] = []
        for parent_id, states in touched.items():
            parent = self.parents[parent_id]
            request_output = self._make_request_output(parent, states)
            for state in states:
                if state.finished:
                    state.finished_time = now
                    self.request_states.pop(state.request_id, None)
                    self._record_finished(state, iteration_stats)
            if parent.num_finished == parent.n:
                self.parents.pop(parent_id, None)
            if request_output is not None:
                ready.append(request_output)
        return ready, to_abort

    def _record_finished(
        self, state: RequestState, iteration_stats: IterationStats | None
    ) -> None:
        """Stats of a finished child; and of its parent, and the tracing hook, once all ended."""
        parent = state.parent
        if iteration_stats is not None and state.stats is not None:
            iteration_stats.update_from_finished_request(
                state.finish_reason or "abort",
                len(state.prompt_token_ids),
                state.params.max_tokens,
                state.stats,
                state.num_cached_tokens,
            )
            if parent.num_finished == parent.n:
                iteration_stats.update_from_finished_parent(
                    parent.n, max(len(c.output_token_ids) for c in parent.children.values())
                )
        if parent.num_finished == parent.n and self.on_parent_finished is not None:
            self.on_parent_finished(parent)

    def _apply(self, state: RequestState, output: EngineCoreOutput, now: float) -> bool:
        """Update one child's state; True when a stop string ended it (abort in core)."""
        stop_string_hit = False
        if output.first_scheduled_time is not None and state.first_scheduled_time is None:
            state.first_scheduled_time = output.first_scheduled_time
        state.num_cached_tokens = output.num_cached_tokens
        state.num_preemptions = output.num_preemptions
        if output.new_prompt_logprobs and state.prompt_logprobs is not None:
            state.prompt_logprobs.extend(self._to_logprob_dict(e) for e in output.new_prompt_logprobs)
        new_ids = output.new_token_ids
        if new_ids:
            if state.first_token_time is None:
                state.first_token_time = now
            state.last_token_time = now
            state.output_token_ids.extend(new_ids)
            if output.new_logprobs and state.logprobs is not None:
                for entry in output.new_logprobs:
                    state.logprobs.append(self._to_logprob_dict(entry))
                    state.cumulative_logprob = (state.cumulative_logprob or 0.0) + entry[0][1]
            if state.detokenizer is not None:
                # The core finishes with "stop" only on an EOS / stop token id: its text is
                # left out of the output (unless include_stop_str_in_output).
                stop_terminated = output.finish_reason == "stop"
                stop_str = state.detokenizer.update(new_ids, stop_terminated)
                if stop_str is not None and output.finish_reason is None:
                    state.finish_reason = "stop"
                    state.stop_reason = stop_str
                    stop_string_hit = True
        if output.finish_reason is not None and state.finish_reason is None:
            state.finish_reason = output.finish_reason
            state.stop_reason = output.stop_reason
        if state.finished:
            state.parent.num_finished += 1
        return stop_string_hit

    def _to_logprob_dict(self, entry: TokenLogprobs | None) -> dict[int, Logprob] | None:
        if entry is None:
            return None
        result: dict[int, Logprob] = {}
        for token_id, logprob, rank in entry:
            if token_id not in result:
                result[token_id] = Logprob(logprob, rank, self._token_text(token_id))
        return result

    def _token_text(self, token_id: int) -> str:
        text = self._token_text_cache.get(token_id)
        if text is None:
            text = self.tokenizer.decode([token_id])
            if len(self._token_text_cache) < 1 << 16:
                self._token_text_cache[token_id] = text
        return text

    def _make_request_output(
        self, parent: ParentRequest, touched: list[RequestState]
    ) -> RequestOutput | None:
        kind = parent.params.output_kind
        all_finished = parent.num_finished == parent.n
        if kind == RequestOutputKind.FINAL_ONLY and not all_finished:
            return None
        delta = kind == RequestOutputKind.DELTA
        states = touched if delta else [parent.children[i] for i in sorted(parent.children)]
        completions = [self._completion(state, delta) for state in states]
        first = parent.children[min(parent.children)]
        return RequestOutput(
            request_id=parent.request_id,
            prompt=first.prompt,
            prompt_token_ids=first.prompt_token_ids,
            prompt_logprobs=first.prompt_logprobs,
            outputs=completions,
            finished=all_finished,
            num_cached_tokens=first.num_cached_tokens,
            metrics=self._metrics(parent),
        )

    def _completion(self, state: RequestState, delta: bool) -> CompletionOutput:
        finished = state.finished
        text = ""
        if state.detokenizer is not None:
            text = state.detokenizer.get_next_output_text(finished, delta)
        if delta:
            token_ids = state.output_token_ids[state.sent_token_offset :]
            logprobs = (
                state.logprobs[state.sent_logprob_offset :] if state.logprobs is not None else None
            )
        else:
            token_ids = list(state.output_token_ids)
            logprobs = list(state.logprobs) if state.logprobs is not None else None
        state.sent_token_offset = len(state.output_token_ids)
        state.sent_logprob_offset = len(state.logprobs or [])
        return CompletionOutput(
            index=state.index,
            text=text,
            token_ids=token_ids,
            cumulative_logprob=state.cumulative_logprob,
            logprobs=logprobs,
            finish_reason=state.finish_reason,
            stop_reason=state.stop_reason,
        )

    def _metrics(self, parent: ParentRequest) -> RequestMetrics:
        children = list(parent.children.values())
        first = children[0]
        scheduled = [c.first_scheduled_time for c in children if c.first_scheduled_time]
        first_tokens = [c.first_token_time for c in children if c.first_token_time]
        last_tokens = [c.last_token_time for c in children if c.last_token_time]
        first_scheduled = min(scheduled) if scheduled else None
        return RequestMetrics(
            arrival_time=first.arrival_time,
            first_scheduled_time=first_scheduled,
            first_token_time=min(first_tokens) if first_tokens else None,
            last_token_time=max(last_tokens) if last_tokens else None,
            finished_time=time.time() if parent.num_finished == parent.n else None,
            time_in_queue=(first_scheduled - first.arrival_time) if first_scheduled else None,
        )
