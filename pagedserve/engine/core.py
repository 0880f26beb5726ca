"""EngineCore: the scheduler and the model runner, one step at a time.

The same ``step()`` runs in-process (offline ``LLM``, most tests) and inside the
engine-core process behind ZMQ (the API server).
"""

from __future__ import annotations

import dataclasses
import logging
import time

from pagedserve import platform
from pagedserve.config import EngineConfig, KVCacheConfig
from pagedserve.core.request import Request, RequestStatus
from pagedserve.core.sched_output import ModelRunnerOutput, SchedulerOutput
from pagedserve.core.scheduler import Scheduler
from pagedserve.core.step_cost import StepBudget, run_warm_up
from pagedserve.engine.messages import (
    EngineCoreOutput,
    EngineCoreOutputs,
    EngineCoreRequest,
    SchedulerStats,
)
from pagedserve.structured_output.manager import StructuredOutputManager

logger = logging.getLogger(__name__)


class EngineCore:
    """Owns the scheduler and model runner; turns requests into per-step outputs.

    Start-up loads the model, then sizes the KV cache where the memory is (this
    process, this device, after the weights took theirs): ``kv_cache_config`` says
    how many blocks the scheduler's pool and the runner's caches have.
    """

    def __init__(self, engine_config: EngineConfig) -> None:
        from pagedserve.worker.model_runner import ModelRunner

        self.engine_config = engine_config
        platform.configure_threads(engine_config.num_threads or None)
        start = time.perf_counter()
        self.model_runner = ModelRunner(engine_config)
        self.model_runner.load_model()
        self.kv_cache_config: KVCacheConfig = self.model_runner.determine_kv_cache_config()
        self.model_runner.initialize_kv_cache(self.kv_cache_config)
        # The kernels --quantization chose for this CPU (for the banner); "" when none.
        self.quantization_info: str = getattr(self.model_runner.model, "quantization_info", "")
        self.scheduler = Scheduler(
            engine_config.scheduler_config,
            engine_config.cache_config,
            self.kv_cache_config,
            step_budget=self._make_step_budget(),
        )
        self.load_seconds = time.perf_counter() - start
        self._eos_token_ids = set(engine_config.model_config.eos_token_ids)
        model_config = engine_config.model_config
        # Requests with a structured-output constraint (pruned as they finish).
        self._constrained_req_ids: set[str] = set()
        self.structured_output_manager = StructuredOutputManager(
            model_config.tokenizer_path, model_config.vocab_size, model_config.eos_token_ids
        )
        # Outputs for requests that ended outside a step (aborts), sent with the next step.
        self._pending_outputs: list[EngineCoreOutput] = []

    def _make_step_budget(self) -> StepBudget | None:
        """The step-time budget (None when --max-step-latency-ms is 0), its cost model
        started from a few warm-up steps on dummy requests (a scratch scheduler over the
        same KV cache, without prefix caching, so nothing of them stays behind)."""
        config = self.engine_config
        target_ms = config.scheduler_config.max_step_latency_ms
        if target_ms == 0:
            return None
        start = time.perf_counter()
        scratch = Scheduler(
            config.scheduler_config,
            dataclasses.replace(config.cache_config, enable_prefix_caching=False),
            self.kv_cache_config,
        )
        warm_up = run_warm_up(
            scratch, self.model_runner.execute_model, config.model_config.vocab_size
        )
        cost_model = warm_up.make_cost_model()
        budget = StepBudget(
            cost_model,
            max_num_batched_tokens=config.scheduler_config.max_num_batched_tokens,
            min_prefill_tokens=config.cache_config.block_size,
            target_ms=target_ms,
            single_decode_ms=warm_up.single_decode_s * 1000,
        )
        logger.info(
            "step budget: %s; warm-up %.2f s, step cost ~ %.1f ms + %.3f ms/prefill token + "
            "%.2f ms/decode", budget.describe(), time.perf_counter() - start,
            *(c * 1000 for c in cost_model.coefficients[:3]),
        )
        return budget

    def _add_grammar_bitmask(self, scheduler_output: SchedulerOutput) -> None:
        """The token bitmask of the constrained requests that sample this step (those
        whose scheduled tokens reach the end of what they have)."""
        if not self._constrained_req_ids:
            return  # nothing constrained: no per-request work on the step's path
        constrained = []
        for req_id in list(self._constrained_req_ids):
            request = self.scheduler.get_request(req_id)
            if request is None or request.structured_output is None:  # finished or aborted
                self._constrained_req_ids.discard(req_id)
                continue
            num_tokens = scheduler_output.num_scheduled_tokens.get(req_id)
            if num_tokens is not None and (
                request.num_computed_tokens + num_tokens >= request.num_tokens
            ):
                constrained.append((req_id, request.structured_output))
        if constrained:
            scheduler_output.structured_output_request_ids = [r for r, _ in constrained]
            manager = self.structured_output_manager
            matchers = [s for _, s in constrained]
            # With a core to spare, filled on a worker thread while the forward runs (the
            # runner waits for it); with every core running the model, a thread beside
            # it only stalls the model's threads (measured on 2 cores: 0.75-0.89x vs
            # 0.82-0.89x of unconstrained throughput), so it is filled here.
            scheduler_output.grammar_bitmask = (
                manager.submit_grammar_bitmask(matchers) if manager.overlap_with_forward
                else manager.grammar_bitmask(matchers)
            )

    def describe_step_budget(self) -> str:
        """The step-time budget for the banner ("" when off)."""
        budget = self.scheduler.step_budget
        return budget.describe() if budget is not None else ""

    # ----------------------------------------------------------------- requests
    def add_request(self, core_request: EngineCoreRequest) -> None:
        params = core_request.sampling_params
        params.update_from_generation_config(self._eos_token_ids)
        request = Request(
            request_id=core_request.request_id,
            prompt_token_ids=core_request.prompt_token_ids,
            sampling_params=params,
            arrival_time=core_request.arrival_time,
            priority=core_request.priority,
            cache_salt=core_request.cache_salt,
        )
        if params.structured_outputs is not None:
            # Compiled here, in the engine core (never on the API server's event loop);
            # an invalid grammar raises ValueError and the request alone is rejected.
            request.structured_output = self.structured_output_manager.make_request(
                params.structured_outputs
            )
        self.scheduler.add_request(request)
        if request.structured_output is not None:
            self._constrained_req_ids.add(request.request_id)

    def abort_requests(self, request_ids: list[str]) -> None:
        """Abort at any time; the requests' blocks return to the pool at once."""
        live = [rid for rid in request_ids if self.scheduler.get_request(rid) is not None]
        self.scheduler.finish_requests(live, RequestStatus.FINISHED_ABORTED)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    def get_num_unfinished_requests(self) -> int:
        """Requests waiting or running."""
        return self.scheduler.get_num_unfinished_requests()

    def reset_prefix_cache(self) -> bool:
        """Forget every cached prefix block; only possible (True) while none is in use."""
        return bool(self.scheduler.reset_prefix_cache())

    def has_work(self) -> bool:
        """Requests to step, or outputs waiting to go out with the next step."""
        return bool(self._pending_outputs) or self.scheduler.has_unfinished_requests()

    def reject_request(self, request_id: str, reason: str) -> None:
        """Report a request that could not be added; it fails alone, with the next step."""
        self._pending_outputs.append(
            EngineCoreOutput(
                request_id=request_id, new_token_ids=[], finish_reason="error", stop_reason=reason
            )
        )

    # --------------------------------------------------------------------- step
    def step(self) -> EngineCoreOutputs:
        """Schedule, run the model once, and report what every request got."""
        start = time.perf_counter()
        outputs = self._pending_outputs
        self._pending_outputs = []
        if not self.scheduler.has_unfinished_requests():
            return EngineCoreOutputs(outputs, self.make_stats(0), time.time())
        scheduler_output = self.scheduler.schedule()
        if scheduler_output.is_empty:
            return EngineCoreOutputs(outputs, self.make_stats(0), time.time())
        self._add_grammar_bitmask(scheduler_output)
        try:
            runner_output = self.model_runner.execute_model(scheduler_output)
        except Exception:
            failed = scheduler_output.scheduled_req_ids
            logger.exception(
                "model execution failed; failing the %d requests of this step", len(failed)
            )
            self.scheduler.finish_requests(failed, RequestStatus.FINISHED_ERROR)
            outputs.extend(
                EngineCoreOutput(request_id=rid, new_token_ids=[], finish_reason="error")
                for rid in failed
            )
            return EngineCoreOutputs(outputs, self.make_stats(0), time.time())
        updated = self.scheduler.update_from_output(scheduler_output, runner_output)
        outputs.extend(self._make_outputs(scheduler_output, runner_output, updated))
        # What the step cost, scheduling and outputs included: the budget's cost model.
        self.scheduler.record_step_time(scheduler_output, time.perf_counter() - start)
        return EngineCoreOutputs(
            outputs,
            self.make_stats(scheduler_output.total_num_scheduled_tokens),
            time.time(),
        )

    def _make_outputs(
        self,
        scheduler_output: SchedulerOutput,
        runner_output: ModelRunnerOutput,
        updated: list[Request],
    ) -> list[EngineCoreOutput]:
        results: list[EngineCoreOutput] = []
        updated_ids = {r.request_id for r in updated}
        sampled = runner_output.sampled_token_ids
        for request in updated:
            rid = request.request_id
            token = sampled.get(rid)
            logprobs = runner_output.logprobs.get(rid)
            results.append(
                EngineCoreOutput(
                    request_id=rid,
                    new_token_ids=[token] if token is not None else [],
                    new_logprobs=[logprobs] if (logprobs is not None and token is not None) else None,
                    new_prompt_logprobs=runner_output.prompt_logprobs.get(rid),
                    finish_reason=request.get_finished_reason(),
                    stop_reason=request.stop_reason,
                    num_cached_tokens=max(request.num_cached_tokens, 0),
                    first_scheduled_time=request.first_scheduled_time,
                    num_preemptions=request.num_preemptions,
                )
            )
        # Prompt logprobs of partial prefill chunks travel even without a sampled token.
        for rid, chunk in runner_output.prompt_logprobs.items():
            if rid not in updated_ids:
                results.append(
                    EngineCoreOutput(request_id=rid, new_token_ids=[], new_prompt_logprobs=chunk)
                )
        return results

    def make_stats(self, num_scheduled_tokens: int = 0) -> SchedulerStats:
        """The scheduler's state now, for the front end's metrics."""
        scheduler = self.scheduler
        prefix = scheduler.prefix_cache_stats
        return SchedulerStats(
            num_running_reqs=scheduler.num_running,
            num_waiting_reqs=scheduler.num_waiting,
            kv_cache_usage=scheduler.kv_cache_usage,
            prefix_cache_queries=prefix.queries,
            prefix_cache_hits=prefix.hits,
            num_preemptions=scheduler.num_preemptions,
            num_scheduled_tokens=num_scheduled_tokens,
            **self._step_budget_stats(),
        )

    def _step_budget_stats(self) -> dict[str, float | int]:
        budget = self.scheduler.step_budget
        if budget is None:
            return {}
        return {
            "step_budget_ms": budget.last_target_s * 1000,
            "prefill_token_budget": budget.last_prefill_token_budget,
        }
