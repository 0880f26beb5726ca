"""AsyncLLM: the asyncio front end of the engine core process (what the API server uses).

The shared front end (``EngineFrontend``: tokens, validation, detokenization, stop
strings, n > 1 fan-in) runs here, in the API process; the engine core runs in its own
process behind ``AsyncMPClient``. One asyncio task reads the core's outputs and hands
each request's ``RequestOutput`` to that request's collector; ``generate()`` yields
from the collector. A slow consumer gets merged deltas, never a growing queue.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pagedserve.config import EngineConfig
from pagedserve.engine.arg_utils import EngineArgs
from pagedserve.engine.core_client import AsyncMPClient, EngineDeadError
from pagedserve.engine.frontend import EngineFrontend
from pagedserve.engine.input_processor import ProcessedPrompt, PromptType, QueueFullError
from pagedserve.engine.messages import SchedulerStats
from pagedserve.metrics.stats import IterationStats
from pagedserve.outputs import CompletionOutput, RequestOutput
from pagedserve.sampling_params import RequestOutputKind, SamplingParams

if TYPE_CHECKING:
    from pagedserve.metrics.observability import EngineObservability

logger = logging.getLogger(__name__)

__all__ = [
    "AsyncLLM", "EngineDeadError", "EngineHealth", "QueueFullError", "RequestOutputCollector"
]


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


@dataclass(frozen=True)
class EngineHealth:
    """What /health reports about the engine core."""

    status: str  # "ok", "stalled" (alive but no heartbeat) or "dead"
    engine_pid: int | None
    seconds_since_heartbeat: float
    scheduler_stats: SchedulerStats | None

    @property
    def healthy(self) -> bool:
        return self.status == "ok"


class AsyncLLM(EngineFrontend):
    """Serve requests from asyncio code; the engine core runs in its own process."""

    engine_core: AsyncMPClient

    def __init__(
        self,
        engine_config: EngineConfig,
        log_level: int | None = None,
        on_engine_dead: Callable[[EngineDeadError], None] | None = None,
        observability: EngineObservability | None = None,
    ) -> None:
        # The API rejects a max_tokens that cannot fit (OpenAI's behaviour).
        log_stats = observability is not None and observability.log_stats
        super().__init__(engine_config, strict_max_tokens=True, log_stats=log_stats)
        # Metrics (IterationStats per step -> stat loggers) and tracing, when given.
        self.observability = observability
        if observability is not None and observability.tracer is not None:
            self.output_processor.on_parent_finished = observability.on_parent_finished
        self.on_engine_dead = on_engine_dead
        self.collectors: dict[str, RequestOutputCollector] = {}
        self.dead_error: EngineDeadError | None = None
        self._output_task: asyncio.Task[None] | None = None
        self.engine_core = AsyncMPClient(engine_config, log_level=log_level)
        if observability is not None:
            observability.log_engine_initialized(self.engine_core.ready_info.num_blocks)

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

    def health(self) -> EngineHealth:
        client = self.engine_core
        if self.is_alive():
            status = "ok"
        elif self.errored or not client.is_process_alive():
            status = "dead"
        else:
            status = "stalled"
        return EngineHealth(
            status, client.engine_pid, client.seconds_since_heartbeat(), client.last_stats
        )

    @property
    def scheduler_stats(self) -> SchedulerStats | None:
        """The engine core's latest reported state (from its last step or heartbeat)."""
        return self.engine_core.last_stats

    @property
    def ready_info(self) -> Any:
        """Start-up facts the engine core reported (EngineCoreReadyInfo)."""
        return self.engine_core.ready_info

    def num_queued_requests(self) -> int:
        """Requests waiting in the engine: in flight here minus running in the core."""
        stats = self.engine_core.last_stats
        running = stats.num_running_reqs if stats is not None else 0
        return max(0, self.num_unfinished_requests() - running)

    def check_capacity(self, num_new_requests: int) -> None:
        """Raise QueueFullError if that many more requests would overfill the waiting queue."""
        self.input_processor.check_capacity(self.num_queued_requests(), num_new_requests)

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
        prompt: PromptType | ProcessedPrompt,
        params: SamplingParams,
        priority: int = 0,
        cache_salt: str | None = None,
        trace_context: Any = None,
    ) -> RequestOutputCollector:
        """Validate, register and send one request; raises ValueError / QueueFullError.

        ``trace_context`` (pagedserve.metrics.tracing.RequestTraceContext) makes the
        request's span when it finishes, if tracing is on.
        """
        if self.dead_error is not None or self.engine_core.dead_reason is not None:
            raise self.dead_error or EngineDeadError(self.engine_core.dead_reason)
        self.start()
        self.check_capacity(params.n)
        collector = RequestOutputCollector(params.output_kind)
        self.add_parent_request(request_id, prompt, params, priority, cache_salt, trace_context)
        self.collectors[request_id] = collector
        return collector

    async def generate(
        self,
        prompt: PromptType,
        sampling_params: SamplingParams,
        request_id: str,
        priority: int = 0,
    ) -> AsyncIterator[RequestOutput]:
        """Yield the request's outputs until it finishes (``vllm.AsyncLLM.generate``).

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
        child_ids = self.abort_parent_requests(ids, iteration_stats)
        if iteration_stats is not None and self.observability is not None and child_ids:
            self.observability.record(None, iteration_stats)
        for rid in ids:
            self.collectors.pop(rid, None)
        if child_ids:
            logger.info("aborted request(s) %s", ", ".join(ids))

    # ---------------------------------------------------------------- outputs
    async def _output_handler(self) -> None:
        try:
            while True:
                core_outputs = await self.engine_core.get_output_async()
                iteration_stats = IterationStats() if self.log_stats else None
                request_outputs = self.process_core_outputs(core_outputs, iteration_stats)
                if self.observability is not None:
                    # Before any handler runs: a response never precedes its metrics.
                    try:
                        self.observability.record(core_outputs.scheduler_stats, iteration_stats)
                    except Exception:  # metrics must never take the server down
                        logger.exception("recording engine stats failed")
                for request_output in request_outputs:
                    collector = self.collectors.get(request_output.request_id)
                    if collector is None:
                        continue
                    collector.put(request_output)
                    if request_output.finished:
                        self.collectors.pop(request_output.request_id, None)
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
        """Drop every cached prefix block not in use; False if some are in use."""
        return bool(await self.engine_core.call_utility_async("reset_prefix_cache"))

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
