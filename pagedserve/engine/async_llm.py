"""AsyncLLM: the asyncio front end of the engine core process (what the API server uses).

Input processing (tokens, validation) and output processing (detokenization, stop
strings, n > 1 fan-in) run here, in the API process; the engine core runs in its own
process behind ``AsyncMPClient``. One asyncio task reads the core's outputs and hands
each request's ``RequestOutput`` to that request's collector; ``generate()`` yields
from the collector. A slow consumer gets merged deltas, never a growing queue.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

from pagedserve.config import EngineConfig
from pagedserve.engine.arg_utils import EngineArgs
from pagedserve.engine.core_client import AsyncMPClient, EngineDeadError
from pagedserve.engine.input_processor import InputProcessor, PromptType
from pagedserve.engine.messages import EngineCoreOutputs, SchedulerStats
from pagedserve.engine.output_processor import OutputProcessor, ParentRequest
from pagedserve.engine.tokenizer import load_tokenizer
from pagedserve.metrics.stats import IterationStats
from pagedserve.outputs import CompletionOutput, RequestOutput
from pagedserve.sampling_params import RequestOutputKind, SamplingParams

if TYPE_CHECKING:
    from pagedserve.metrics.observability import EngineObservability

logger = logging.getLogger(__name__)

__all__ = ["AsyncLLM", "EngineDeadError", "QueueFullError", "RequestOutputCollector"]


class QueueFullError(RuntimeError):
    """The engine's waiting queue is at --max-num-queued-requests (HTTP 429)."""


class RequestOutputCollector:
    """Holds the newest output of one request until its consumer takes it.

    With DELTA outputs, a new output arriving before the consumer took the previous
    one is merged into it (text, token ids and logprobs appended), so a slow client
    costs memory proportional to its unread text, not one object per step.
    """

    def __init__(self, output_kind: RequestOutputKind) -> None:
        self.aggregate = output_kind == RequestOutputKind.DELTA
        self.output: RequestOutput | BaseException | None = None
        self.ready = asyncio.Event()

    def put(self, output: RequestOutput | BaseException) -> None:
        if self.output is None or isinstance(output, BaseException):
            self.output = output
        elif isinstance(self.output, RequestOutput):
            if self.aggregate:
                _merge_delta(self.output, output)
            else:
                self.output = output
        self.ready.set()

    async def get(self) -> RequestOutput:
        while self.output is None:
            await self.ready.wait()
        return self._take()

    def get_nowait(self) -> RequestOutput | None:
        return None if self.output is None else self._take()

    def _take(self) -> RequestOutput:
        output = self.output
        self.output = None
        self.ready.clear()
        if isinstance(output, BaseException):
            raise output
        assert output is not None
        return output


def _merge_delta(into: RequestOutput, new: RequestOutput) -> None:
    """Append a DELTA output to an unread one (per completion index)."""
    by_index: dict[int, CompletionOutput] = {c.index: c for c in into.outputs}
    for completion in new.outputs:
        old = by_index.get(completion.index)
        if old is None:
            into.outputs.append(completion)
            by_index[completion.index] = completion
            continue
        old.text += completion.text
        old.token_ids = list(old.token_ids) + list(completion.token_ids)
        if completion.logprobs is not None:
            old.logprobs = list(old.logprobs or []) + list(completion.logprobs)
        old.cumulative_logprob = completion.cumulative_logprob
        old.finish_reason = completion.finish_reason
        old.stop_reason = completion.stop_reason
    into.outputs.sort(key=lambda c: c.index)
    into.finished = new.finished
    into.num_cached_tokens = new.num_cached_tokens
    into.metrics = new.metrics
    if into.prompt_logprobs is None:
        into.prompt_logprobs = new.prompt_logprobs


class AsyncLLM:
    """Serve requests from asyncio code; the engine core runs in its own process."""

    def __init__(
        self,
        engine_config: EngineConfig,
        log_level: int | None = None,
        on_engine_dead: Callable[[EngineDeadError], None] | None = None,
        observability: EngineObservability | None = None,
    ) -> None:
        self.engine_config = engine_config
        self.model_config = engine_config.model_config
        self.tokenizer = load_tokenizer(self.model_config.tokenizer_path)
        self.input_processor = InputProcessor(self.model_config, self.tokenizer)
        # Metrics (IterationStats per step -> stat loggers) and tracing, when given.
        self.observability = observability
        self.log_stats = observability is not None and observability.log_stats
        self.output_processor = OutputProcessor(self.tokenizer, log_stats=self.log_stats)
        if observability is not None and observability.tracer is not None:
            self.output_processor.on_parent_finished = observability.on_parent_finished
        self.max_num_queued_requests = engine_config.scheduler_config.max_num_queued_requests
        self.on_engine_dead = on_engine_dead
        self.collectors: dict[str, RequestOutputCollector] = {}
        # Called after each engine step's outputs are processed (metrics hook):
        # callback(core_outputs: EngineCoreOutputs, request_outputs: list[RequestOutput]).
        self.step_callbacks: list[Callable[[EngineCoreOutputs, list[RequestOutput]], None]] = []
        self.dead_error: EngineDeadError | None = None
        self._output_task: asyncio.Task[None] | None = None
        self.engine_core = AsyncMPClient(engine_config, log_level=log_level)

    @classmethod
    def from_engine_args(cls, engine_args: EngineArgs, **kwargs: Any) -> AsyncLLM:
        return cls(engine_args.create_engine_config(), **kwargs)

    # ---------------------------------------------------------------- state
    @property
    def errored(self) -> bool:
        return self.dead_error is not None or self.engine_core.dead_reason is not None

    def is_alive(self) -> bool:
        """The engine core process is alive and its heartbeat is recent."""
        return not self.errored and self.engine_core.is_alive()

    @property
    def scheduler_stats(self) -> SchedulerStats | None:
        return self.engine_core.last_stats

    def get_tokenizer(self) -> Any:
        return self.tokenizer

    def num_unfinished_requests(self) -> int:
        """Child requests (n > 1 counts n) this front end has in the engine."""
        return len(self.output_processor.request_states)

    def num_queued_requests(self) -> int:
        """Requests waiting in the engine: in flight here minus running in the core."""
        stats = self.engine_core.last_stats
        running = stats.num_running_reqs if stats is not None else 0
        return max(0, self.num_unfinished_requests() - running)

    def check_capacity(self, num_new_requests: int) -> None:
        """Raise QueueFullError if that many more requests would overfill the waiting queue."""
        limit = self.max_num_queued_requests
        if limit > 0 and self.num_queued_requests() + num_new_requests > limit:
            raise QueueFullError(
                f"The server is at capacity: {self.num_queued_requests()} requests are "
                f"waiting (--max-num-queued-requests {limit}). Retry later."
            )

    # ---------------------------------------------------------------- requests
    def start(self) -> None:
        """Start the output reader task (call from the running event loop)."""
        if self._output_task is None:
            self._output_task = asyncio.get_running_loop().create_task(
                self._output_handler(), name="pagedserve-output-handler"
            )

    def add_request(
        self,
        request_id: str,
        prompt: PromptType,
        params: SamplingParams,
        priority: int = 0,
        trace_context: Any = None,
    ) -> RequestOutputCollector:
        """Validate, register and send one request; raises ValueError / QueueFullError.

        ``trace_context`` (pagedserve.metrics.tracing.RequestTraceContext) makes the
        request's span when it finishes, if tracing is on.
        """
        if self.dead_error is not None or self.engine_core.dead_reason is not None:
            raise self.dead_error or EngineDeadError(self.engine_core.dead_reason)
        self.start()
        if request_id in self.collectors or request_id in self.output_processor.parents:
            raise ValueError(f"Request id {request_id!r} is already running")
        self.check_capacity(params.n)
        processed = self.input_processor.process_prompt(prompt)
        parent = ParentRequest(request_id, params)
        parent.trace_context = trace_context
        core_requests = self.input_processor.make_child_requests(
            parent, processed, priority, time.time()
        )
        collector = RequestOutputCollector(params.output_kind)
        self.collectors[request_id] = collector
        self.output_processor.add_children(parent, processed.prompt, core_requests)
        for core_request in core_requests:
            self.engine_core.add_request(core_request)
        return collector

    async def generate(
        self,
        prompt: PromptType,
        sampling_params: SamplingParams,
        request_id: str,
        priority: int = 0,
    ) -> AsyncIterator[RequestOutput]:
        """Yield the request's outputs until it finishes.

        Closing or cancelling the iterator (a client disconnect) aborts the request
        in the engine core, freeing its KV blocks. Raises EngineDeadError if the engine
        core dies meanwhile.
        """
        collector = self.add_request(request_id, prompt, sampling_params, priority)
        finished = False
        try:
            while not finished:
                output = collector.get_nowait() or await collector.get()
                finished = output.finished
                yield output
        finally:
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str | list[str]) -> None:
        """Abort requests (parent ids) in the front end and the engine core."""
        ids = [request_id] if isinstance(request_id, str) else list(request_id)
        iteration_stats = IterationStats() if self.log_stats else None
        child_ids = self.output_processor.abort_requests(ids, iteration_stats)
        if iteration_stats is not None and self.observability is not None and child_ids:
            self.observability.record(None, iteration_stats)
        for rid in ids:
            self.collectors.pop(rid, None)
        if child_ids:
            logger.info("aborted request(s) %s", ", ".join(ids))
            self.engine_core.abort_requests(child_ids)

    # ---------------------------------------------------------------- outputs
    async def _output_handler(self) -> None:
        engine_core = self.engine_core
        output_processor = self.output_processor
        observability = self.observability
        log_stats = self.log_stats
        try:
            while True:
                core_outputs = await engine_core.get_output_async()
                iteration_stats = IterationStats() if log_stats else None
                request_outputs, to_abort = output_processor.process_outputs(
                    core_outputs.outputs, time.time(), core_outputs.timestamp, iteration_stats
                ) if core_outputs.outputs else ([], [])
                if observability is not None:
                    # Before any handler runs: a response never precedes its metrics.
                    try:
                        observability.record(core_outputs.scheduler_stats, iteration_stats)
                    except Exception:  # metrics must never take the server down
                        logger.exception("recording engine stats failed")
                for request_output in request_outputs:
                    collector = self.collectors.get(request_output.request_id)
                    if collector is None:
                        continue
                    collector.put(request_output)
                    if request_output.finished:
                        self.collectors.pop(request_output.request_id, None)
                if to_abort:
                    engine_core.abort_requests(to_abort)
                for callback in self.step_callbacks:
                    try:
                        callback(core_outputs, request_outputs)
                    except Exception:
                        logger.exception("step callback failed")
        except asyncio.CancelledError:
            raise
        except EngineDeadError as exc:
            self._fail_all(exc)
        except Exception as exc:  # a bug here must not leave clients hanging
            logger.exception("output handler failed")
            self._fail_all(EngineDeadError(f"the output handler failed: {exc!r}"))

    def _fail_all(self, error: EngineDeadError) -> None:
        self.dead_error = error
        for collector in self.collectors.values():
            collector.put(error)
        self.collectors.clear()
        if self.on_engine_dead is not None:
            self.on_engine_dead(error)

    # ---------------------------------------------------------------- utilities
    async def reset_prefix_cache(self) -> bool:
        return bool(await self.engine_core.call_utility_async("reset_prefix_cache"))

    async def get_engine_stats(self) -> dict[str, Any]:
        return await self.engine_core.call_utility_async("get_stats")

    async def shutdown(self) -> None:
        """Stop reading outputs and shut the engine core down."""
        if self._output_task is not None:
            self._output_task.cancel()
            try:
                await self._output_task
            except (asyncio.CancelledError, Exception):
                pass
            self._output_task = None
        await asyncio.get_running_loop().run_in_executor(None, self.engine_core.shutdown)

    def shutdown_sync(self) -> None:
        """Shut the engine core down from synchronous code (no running event loop)."""
        self.engine_core.shutdown()
