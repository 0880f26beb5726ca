"""The step-time budget: what an engine step costs, learnt online, and how much prefill
fits in the next one.

Every running decode waits for the whole step, so a step's duration is the inter-token
latency of every stream in it. A prefill chunk of up to ``max_num_batched_tokens`` in a
step full of decodes stalls them all; the budget sizes each step's prefill chunks (the
token budget of requests still in their prompt) so that the predicted step time stays
under a target. ``max_num_batched_tokens`` remains the hard cap, decodes always run,
and prefill always gets at least one block when it has any room at all.

The cost model is linear in what the scheduler controls::

    step seconds ~= base + per_prefill_token * P + per_decode * D + per_context_token * K

P: tokens of requests scheduled for more than one token (prefill chunks), D: requests
scheduled for one token (decodes), K: the context those decodes attend to (the sum of
their lengths). It is fitted by exponentially weighted least squares -- exponential moving
averages of x x^T and x t over the measured steps -- with a small ridge that anchors each
solve on the previous estimate, so a coefficient the recent steps do not exercise (no
prefill for a while) keeps its last value instead of drifting. It starts from a warm-up
measurement (:func:`run_warm_up`), seeded into the averages as a prior that fades, and a
measured step counts as at most twice (at least half) the prediction, so one step slowed
by a noisy neighbour barely moves it while a lasting slowdown is learnt within ~100 steps.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from pagedserve.core.request import Request, RequestStatus
from pagedserve.core.sched_output import ModelRunnerOutput, SchedulerOutput
from pagedserve.sampling_params import SamplingParams

if TYPE_CHECKING:
    from pagedserve.core.scheduler import Scheduler

logger = logging.getLogger(__name__)

# "auto": a step carrying prefill may take this many single-decode steps... (7: on a
# simulated 16- and 32-stream mix, measured offline, 8 gave ITL p99 3.3x / 2.1x the p50,
# 6 gave 2.5x / 2.4x at ~5% less throughput and 30% more TTFT p99; 4 halves the prefill
# rate while few streams decode)
AUTO_BUDGET_FACTOR = 7.0
# ... or this many times the predicted time of its decodes alone, whichever is longer, so
# prefill keeps pace with a large decode batch (and ITL p99 stays ~2x the decode step).
AUTO_DECODE_HEADROOM = 2.0
# ... and never less than the prefill backlog spread over this many steps.
AUTO_BACKLOG_STEPS = 32


@dataclass(frozen=True, slots=True)
class StepShape:
    """What a step computes, as the cost model sees it."""

    num_prefill_tokens: int = 0  # P: tokens of requests scheduled for more than one token
    num_decode_reqs: int = 0  # D: requests scheduled for one token
    num_decode_context_tokens: int = 0  # K: the decodes' lengths, summed

    @classmethod
    def of(cls, scheduler_output: SchedulerOutput) -> StepShape:
        """The shape of a scheduled step, from its plain data alone."""
        num_scheduled = scheduler_output.num_scheduled_tokens
        cached = scheduler_output.scheduled_cached_reqs
        progress = zip(cached.req_ids, cached.num_computed_tokens, strict=True)
        new = ((r.req_id, r.num_computed_tokens) for r in scheduler_output.scheduled_new_reqs)
        num_prefill_tokens = num_decode_reqs = num_context_tokens = 0
        for source in (progress, new):
            for req_id, num_computed_tokens in source:
                num_tokens = num_scheduled[req_id]
                if num_tokens == 1:
                    num_decode_reqs += 1
                    num_context_tokens += num_computed_tokens + 1
                else:
                    num_prefill_tokens += num_tokens
        return cls(num_prefill_tokens, num_decode_reqs, num_context_tokens)


class StepCostModel:
    """``seconds ~= base + per_prefill_token * P + per_decode * D + per_context_token * K``,
    refitted after every measured step (see the module docstring)."""

    # Typical size of each feature (1, P, D, K): the fit works on features divided by
    # these, so the ridge weighs every coefficient by its contribution to a typical step.
    _SCALES = np.array([1.0, 256.0, 16.0, 4096.0])
    # A measured step counts as at most this many times (at least 1/this) the prediction:
    # one step slowed by a page fault or a noisy neighbour barely moves the fit.
    _OUTLIER_RATIO = 2.0
    # Per-prefill-token seconds never go below this (the budget divides by it).
    _MIN_PER_PREFILL_TOKEN_S = 1e-7

    def __init__(
        self,
        base_s: float,
        per_prefill_token_s: float,
        per_decode_s: float,
        per_context_token_s: float = 0.0,
        *,
        alpha: float = 0.03,
        prior_weight: float = 0.3,
        ridge: float = 0.1,
    ) -> None:
        coefficients = (base_s, per_prefill_token_s, per_decode_s, per_context_token_s)
        if not all(math.isfinite(c) and c >= 0 for c in coefficients):
            raise ValueError(f"step cost coefficients must be finite and >= 0, got {coefficients}")
        if not 0 < alpha <= 1:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        if ridge <= 0 or prior_weight <= 0:
            raise ValueError(f"ridge and prior_weight must be > 0, got {ridge}, {prior_weight}")
        self.alpha = alpha
        self.ridge = ridge
        self._weights = self._project(np.array(coefficients) * self._SCALES)
        # EMAs of z z^T and z * seconds (z: scaled features), seeded with the starting
        # coefficients as if seen once in every direction: early steps, which exercise only
        # a few directions, correct those and leave the others; the seed fades as 1 - alpha.
        self._xx = prior_weight * np.eye(4)
        self._xt = prior_weight * self._weights
        self.num_observations = 0

    @classmethod
    def _features(cls, shape: StepShape) -> np.ndarray:
        x = (1.0, shape.num_prefill_tokens, shape.num_decode_reqs, shape.num_decode_context_tokens)
        return np.array(x) / cls._SCALES

    def _project(self, weights: np.ndarray) -> np.ndarray:
        """No negative cost; a prefill token always costs something."""
        weights = np.maximum(weights, 0.0)
        weights[1] = max(weights[1], self._MIN_PER_PREFILL_TOKEN_S * self._SCALES[1])
        return weights

    @property
    def coefficients(self) -> tuple[float, float, float, float]:
        """(base, per prefill token, per decode, per context token), in seconds."""
        base, prefill, decode, context = (self._weights / self._SCALES).tolist()
        return base, prefill, decode, context

    @property
    def per_prefill_token_s(self) -> float:
        return float(self._weights[1] / self._SCALES[1])

    def predict(self, shape: StepShape) -> float:
        """Predicted seconds of a step of this shape."""
        return float(self._features(shape) @ self._weights)

    def observe(self, shape: StepShape, seconds: float) -> None:
        """Fold one measured step into the fit."""
        if not math.isfinite(seconds) or seconds < 0:
            return
        z = self._features(shape)
        predicted = float(z @ self._weights)
        if predicted > 0:
            ratio = self._OUTLIER_RATIO
            seconds = min(max(seconds, predicted / ratio), predicted * ratio)
        alpha = self.alpha
        self._xx *= 1.0 - alpha
        self._xx += alpha * np.outer(z, z)
        self._xt *= 1.0 - alpha
        self._xt += alpha * seconds * z
        # Ridge anchored on the previous weights: directions no recent step exercised
        # keep their value; exercised ones converge to the weighted least-squares fit.
        lhs = self._xx + self.ridge * np.eye(4)
        rhs = self._xt + self.ridge * self._weights
        self._weights = self._project(np.linalg.solve(lhs, rhs))
        self.num_observations += 1




class StepBudget:
    """Each step's prefill token budget, from a step-time target and the cost model.

    ``target_ms`` is a fixed target; None is "auto": ``AUTO_BUDGET_FACTOR`` single-decode
    steps (``single_decode_ms``, measured at start-up),
    or ``AUTO_DECODE_HEADROOM`` times the step's decodes alone when that is longer. A step with no decode stalls no stream:
    its prefill is bounded only by ``max_num_batched_tokens``. Otherwise the prefill gets
    what keeps the predicted step within the target, at least ``min_prefill_tokens``,
    and never the tokens the step's decodes need.
    """

    def __init__(
        self,
        cost_model: StepCostModel,
        *,
        max_num_batched_tokens: int,
        min_prefill_tokens: int,
        target_ms: float | None = None,
        single_decode_ms: float | None = None,
    ) -> None:
        if target_ms is None and (single_decode_ms is None or single_decode_ms <= 0):
            raise ValueError("an auto step budget needs the measured single-decode step time")
        if target_ms is not None and not (math.isfinite(target_ms) and target_ms > 0):
            raise ValueError(f"the step budget must be a positive number of ms, got {target_ms}")
        if max_num_batched_tokens < 1 or min_prefill_tokens < 1:
            raise ValueError("max_num_batched_tokens and min_prefill_tokens must be >= 1")
        self.cost_model = cost_model
        self.max_num_batched_tokens = max_num_batched_tokens
        self.min_prefill_tokens = min_prefill_tokens
        self.is_auto = target_ms is None
        self.single_decode_ms = single_decode_ms
        if target_ms is None:
            assert single_decode_ms is not None
            target_ms = AUTO_BUDGET_FACTOR * single_decode_ms
        self.base_target_s = target_ms / 1000.0
        # What the last step was given (the stats line reports them).
        self.last_target_s = self.base_target_s
        self.last_prefill_token_budget = max_num_batched_tokens

    def prefill_token_budget(
        self, num_decode_reqs: int, num_decode_context_tokens: int, num_backlog_tokens: int = 0
    ) -> int:
        """Tokens the step's prefill chunks may take, all requests together.

        ``num_backlog_tokens``: the prompt tokens waiting to be computed (queued requests
        and unfinished prefills). In auto, prefill never falls further behind than
        ``AUTO_BACKLOG_STEPS`` steps: where prefill costs many decode steps' worth (a slow
        prefill kernel, a crowded CPU) the target alone would starve admissions and cut
        throughput.
        """
        room = max(self.max_num_batched_tokens - num_decode_reqs, 0)
        if num_decode_reqs == 0:
            target_s = self._target_s(0.0)
            num_tokens = room
        else:
            decode_s = self.cost_model.predict(
                StepShape(0, num_decode_reqs, num_decode_context_tokens)
            )
            target_s = self._target_s(decode_s)
            fit = int((target_s - decode_s) / self.cost_model.per_prefill_token_s)
            if self.is_auto:
                fit = max(fit, -(-num_backlog_tokens // AUTO_BACKLOG_STEPS))
            num_tokens = min(max(fit, self.min_prefill_tokens), room)
        self.last_target_s = target_s
        self.last_prefill_token_budget = num_tokens
        return num_tokens

    def _target_s(self, decode_s: float) -> float:
        """The step's target: fixed, or auto from the single-decode step measured at
        start-up and from the step's decodes as the cost model predicts them now.

        Not the model's own single-decode prediction: under steady concurrency the
        features barely vary (always ~N decodes over similar contexts), so the fit cannot
        separate its base from its per-decode cost and a one-decode step, far outside the
        data, extrapolates to several times its real cost (measured: 16 ms for a 10 ms
        step at 16 streams), which let prefill chunks stall decodes for 3.5x their step.
        The prediction for the step's actual decodes stays inside the data."""
        if not self.is_auto:
            return self.base_target_s
        return max(self.base_target_s, AUTO_DECODE_HEADROOM * decode_s)

    def observe(self, shape: StepShape, seconds: float) -> None:
        self.cost_model.observe(shape, seconds)

    def describe(self) -> str:
        """One line for the start-up banner."""
        target_ms = self.base_target_s * 1000
        if self.is_auto:
            return (
                f"{target_ms:.0f} ms (auto: {AUTO_BUDGET_FACTOR:g} x the "
                f"{self.single_decode_ms:.0f} ms single-decode step, or "
                f"{AUTO_DECODE_HEADROOM:g} x a step's decodes when longer)"
            )
        return f"{target_ms:g} ms"


# -- the start-up measurement -------------------------------------------------------

# Warm-up: a few short prompts decode together, then one of them alone, then a longer
# prompt is prefilled beside that decode (sizes capped by the KV cache, max_model_len,
# max_num_seqs and max_num_batched_tokens).
_WARM_UP_NUM_SHORT = 4
_WARM_UP_SHORT_PROMPT = 16
_WARM_UP_LONG_PROMPT = 256
# Step indices: steps before the first measured one touch memory and kernels for the first
# time; all but one short request leave before the second phase; the long prompt comes last.
_WARM_UP_FIRST_MEASURED_STEP = 2
_WARM_UP_SINGLE_DECODE_STEP = 4
_WARM_UP_LONG_PREFILL_STEP = 6
_FALLBACK_SINGLE_DECODE_S = 0.05


@dataclass(frozen=True, slots=True)
class WarmUpResult:
    """The measured warm-up steps and what they say."""

    steps: list[tuple[StepShape, float]]
    single_decode_s: float  # a step with one decode and nothing else
    per_decode_s: float  # what each further decode adds
    per_prefill_token_s: float

    def make_cost_model(self) -> StepCostModel:
        """A cost model starting from these measurements, the measured steps folded in."""
        per_decode_s = min(self.per_decode_s, self.single_decode_s)
        model = StepCostModel(
            self.single_decode_s - per_decode_s, self.per_prefill_token_s, per_decode_s
        )
        for shape, seconds in self.steps:
            model.observe(shape, seconds)
        return model


def run_warm_up(
    scheduler: Scheduler,
    execute_model: Callable[[SchedulerOutput], ModelRunnerOutput],
    vocab_size: int,
) -> WarmUpResult:
    """Time a few real steps on dummy requests through ``scheduler`` (a scratch
    :class:`~pagedserve.core.scheduler.Scheduler` over the engine's KV cache, without a
    step budget), then let the runner drop their state. Seven steps: the short prompts'
    prefill, their decodes together, one of them alone, and the long prompt's prefill
    beside that decode."""
    room = (scheduler.kv_cache_config.num_usable_blocks - 2) * scheduler.block_size
    max_len = min(scheduler.max_model_len, room // 2) - _WARM_UP_LONG_PREFILL_STEP - 1
    num_short = max(1, min(_WARM_UP_NUM_SHORT, scheduler.max_num_seqs))
    short_len = max(1, min(_WARM_UP_SHORT_PROMPT, max_len // num_short))
    long_len = max(2, min(_WARM_UP_LONG_PROMPT, max_len, scheduler.max_num_batched_tokens - 1))
    shorts = [
        _dummy_request(f"warm-up-{i}", short_len, vocab_size, i, _WARM_UP_LONG_PREFILL_STEP + 1)
        for i in range(num_short)
    ]
    for request in shorts:
        scheduler.add_request(request)
    steps: list[tuple[StepShape, float]] = []
    for step_index in range(4 * _WARM_UP_LONG_PREFILL_STEP):
        if not scheduler.has_unfinished_requests():
            break
        if step_index == _WARM_UP_SINGLE_DECODE_STEP:
            scheduler.finish_requests([r.request_id for r in shorts[1:]], RequestStatus.FINISHED_ABORTED)
        if step_index == _WARM_UP_LONG_PREFILL_STEP:
            scheduler.add_request(_dummy_request("warm-up-long", long_len, vocab_size, 99, 1))
        start = time.perf_counter()
        scheduler_output = scheduler.schedule()
        runner_output = execute_model(scheduler_output)
        scheduler.update_from_output(scheduler_output, runner_output)
        if step_index >= _WARM_UP_FIRST_MEASURED_STEP:
            steps.append((StepShape.of(scheduler_output), time.perf_counter() - start))
    # Whatever is left is aborted; an empty step tells the runner to drop all of them.
    scheduler.finish_requests(list(scheduler.requests), RequestStatus.FINISHED_ABORTED)
    execute_model(scheduler.schedule())
    return _summarize(steps)


def _summarize(steps: list[tuple[StepShape, float]]) -> WarmUpResult:
    """Each figure from the quickest step of its kind: a neighbour's burst of work only
    ever adds time."""
    def quickest(num_decode_reqs: int) -> float | None:
        return min((s for shape, s in steps if shape.num_prefill_tokens == 0
                    and shape.num_decode_reqs == num_decode_reqs), default=None)

    single_decode_s = quickest(1)
    if single_decode_s is None:
        # A KV cache or max_model_len too small for the warm-up to decode: the quickest
        # step measured, or a guess; serving steps correct the model either way.
        single_decode_s = min((s for _, s in steps), default=_FALLBACK_SINGLE_DECODE_S)
        logger.warning("the step-budget warm-up measured no single decode; assuming %.0f ms",
                       single_decode_s * 1000)
    single_decode_s = max(single_decode_s, 1e-4)
    prefill_steps = [(shape, s) for shape, s in steps if shape.num_prefill_tokens > 1]
    if prefill_steps:
        # The step with the largest prefill, less the decode beside it.
        shape, seconds = max(prefill_steps, key=lambda step: step[0].num_prefill_tokens)
        decode_s = single_decode_s if shape.num_decode_reqs else 0.0
        per_prefill_token_s = max((seconds - decode_s) / shape.num_prefill_tokens, 1e-7)
    else:
        per_prefill_token_s = single_decode_s / 16  # a guess the first serving steps correct
    batched = [(shape.num_decode_reqs, quickest(shape.num_decode_reqs)) for shape, _ in steps
               if shape.num_prefill_tokens == 0 and shape.num_decode_reqs > 1]
    if batched:
        num_decode_reqs, batch_s = batched[0]
        per_decode_s = max((batch_s - single_decode_s) / (num_decode_reqs - 1), 0.0)
    else:
        per_decode_s = 2 * per_prefill_token_s  # a guess the first serving steps correct
    return WarmUpResult(steps, single_decode_s, per_decode_s, per_prefill_token_s)


def _dummy_request(
    request_id: str, length: int, vocab_size: int, salt: int, max_tokens: int
) -> Request:
    # Any ids of the vocabulary do; spread them out to avoid a degenerate attention.
    token_ids = [(1 + 7919 * (i + 131 * salt)) % (vocab_size - 1) + 1 for i in range(length)]
    params = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=max_tokens)
    return Request(request_id, token_ids, params)
