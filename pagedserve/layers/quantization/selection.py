"""Choosing the int8 kernels per CPU at start-up: a short micro-benchmark on the model's
own quantized weights, unless ``PAGEDSERVE_INT8_KERNELS`` names them.

Which kernel is fastest at a given number of rows differs from CPU to CPU (AMX, AVX512-BF16
+ VNNI, AVX-512 only) and with the thread count, so it is measured here, with the engine's
threads, rather than decided from CPU flags. Each candidate runs on real weights at
M = 1, 2, 4, ..., 64 rows, interleaved, best of a few repetitions; at small M it streams
several layers (or a large slice of the LM head) so that, as in a real step, the weights
come from memory rather than cache. One run takes ~0.3-0.7 s on an idle 2-core machine.

Candidates respect the quality budget: decoder linears choose between ``dense``,
``int8_wo`` and (with the native GEMV, up to 16 rows) ``w8a16``, never per-token W8A8
(+6% perplexity on Gemma 3 270M); the LM head may also run ``w8a8`` (+0.4%).

The measurement runs twice (a third time on a near-tie); a plan two runs agree on is cached (``cache_path``, keyed by CPU
model, ISA, threads, torch version, dtype and shapes), so later starts skip it. On a
machine too busy to measure (a run overruns its budget, or the two disagree) a default
plan is used and nothing is cached. Among kernels within 5% of the fastest, the more exact one wins
(dense, then weight-only, then W8A16, then W8A8), and a switch between row counts must pay for itself
(:func:`smooth_choices`).
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from pagedserve.layers.quantization import gemv
from pagedserve.layers.quantization.kernels import (
    KERNEL_DENSE,
    KERNEL_W8A8,
    KERNEL_W8A16,
    KERNEL_WEIGHT_ONLY,
    KERNELS,
    Int8KernelPlan,
    KernelSchedule,
    w8a8_mm,
    w8a16_mm,
    weight_only_mm,
    weight_only_supported,
)

logger = logging.getLogger(__name__)

ROW_COUNTS = (1, 2, 4, 8, 16, 32, 64)
# Repetitions per row count: at least _MIN_REPEATS, more while under _BUDGET_S (best of
# them counts: on a shared machine a thread descheduled mid-call inflates single timings).
_MIN_REPEATS, _MAX_REPEATS, _BUDGET_S = 3, 10, 0.02
_TIE_MARGIN = 1.05  # a more exact kernel within 5% of the fastest is preferred
# The whole measurement takes ~0.3-0.7 s on an idle 2-core machine; past this it is noise.
_TOTAL_BUDGET_S = 3.0
_SWITCH_PENALTY = 0.15  # a kernel switch must win ~15% (summed over row counts) to happen
# Most weights one timed call streams at M=1 (halved as M doubles): ~20 MiB of int8 rows...
_STREAM_ROWS_M1 = 1 << 15
# ... but never fewer int8 bytes than this, more than a CPU's last-level cache: in a real
# step every layer's weights come from memory (the other layers evicted them), and a
# measurement from cache favours the float weights at 8+ rows where int8 wins from memory.
_MIN_STREAM_BYTES = 48 << 20
# Bumped when the way plans are measured changes: cached plans from before are not reused.
_MEASUREMENT_VERSION = 2
_EXACTNESS = {KERNEL_DENSE: 0, KERNEL_WEIGHT_ONLY: 1, KERNEL_W8A16: 2, KERNEL_W8A8: 3}
ENV_VAR = "PAGEDSERVE_INT8_KERNELS"


@dataclass(frozen=True)
class QuantizedWeight:
    """One quantized matrix as the benchmark sees it (views, nothing copied)."""

    qweight: torch.Tensor  # int8 [N, K]
    weight_scale: torch.Tensor  # float32 [N]
    weight_scale_bf16: torch.Tensor
    dense: torch.Tensor  # the unquantized weight [N, K], model dtype
    weight_sum: torch.Tensor | None = None  # int32 [N] row sums (the native GEMV's)

    def rows(self, start: int, stop: int) -> QuantizedWeight:
        return QuantizedWeight(
            self.qweight[start:stop], self.weight_scale[start:stop],
            self.weight_scale_bf16[start:stop], self.dense[start:stop],
            None if self.weight_sum is None else self.weight_sum[start:stop],
        )


def _runner(kernel: str, weight: QuantizedWeight) -> Callable[[torch.Tensor], torch.Tensor]:
    if kernel == KERNEL_DENSE:
        return lambda x: F.linear(x, weight.dense)
    if kernel == KERNEL_WEIGHT_ONLY:
        return lambda x: weight_only_mm(x, weight.qweight, weight.weight_scale_bf16)
    if kernel == KERNEL_W8A16:
        return lambda x: w8a16_mm(x, weight.qweight, weight.weight_scale, weight.weight_sum)
    return lambda x: w8a8_mm(x, weight.qweight, weight.weight_scale, weight_sum=weight.weight_sum)


def _weights_for_rows(weights: Sequence[QuantizedWeight], num_rows: int) -> list[QuantizedWeight]:
    """Enough weights that a call at ``num_rows`` streams ~_STREAM_ROWS_M1 / M rows, and at
    least _MIN_STREAM_BYTES (as many as there are, up to that)."""
    input_size = weights[0].qweight.shape[1]
    target = max(1, _STREAM_ROWS_M1 // num_rows, _MIN_STREAM_BYTES // input_size)
    chosen: list[QuantizedWeight] = []
    total = 0
    for weight in weights:
        if total >= target:
            break
        chosen.append(weight)
        total += weight.qweight.shape[0]
    return chosen


class MeasurementOverrun(RuntimeError):
    """The measurement ran past its deadline."""


def measure_schedule(
    weights: Sequence[QuantizedWeight],
    candidates: Sequence[str],
    dtype: torch.dtype,
    row_counts: Sequence[int] = ROW_COUNTS,
    deadline: float | None = None,
) -> tuple[KernelSchedule, dict[int, dict[str, float]]]:
    """The fastest candidate at each row count (seconds per call in the second value);
    raises :class:`MeasurementOverrun` once ``deadline`` (``time.perf_counter()``) passes."""
    input_size = weights[0].qweight.shape[1]
    timings: dict[int, dict[str, float]] = {}
    generator = torch.Generator().manual_seed(0)
    for num_rows in row_counts:
        if deadline is not None and time.perf_counter() > deadline:
            raise MeasurementOverrun
        # w8a16 (the native GEMV) takes at most gemv.MAX_ROWS rows.
        active = [k for k in candidates if k != KERNEL_W8A16 or num_rows <= gemv.MAX_ROWS]
        x = torch.randn(num_rows, input_size, generator=generator).to(dtype)
        chosen = _weights_for_rows(weights, num_rows)
        runs = {k: [_runner(k, w) for w in chosen] for k in active}
        best = dict.fromkeys(active, float("inf"))
        began = time.perf_counter()
        for repeat in range(_MAX_REPEATS):
            if repeat >= _MIN_REPEATS and time.perf_counter() - began > _BUDGET_S:
                break
            for kernel in active:
                start = time.perf_counter()
                for run in runs[kernel]:
                    run(x)
                best[kernel] = min(best[kernel], time.perf_counter() - start)
        timings[num_rows] = best
    choices = list(zip(row_counts, smooth_choices([timings[m] for m in row_counts]), strict=True))
    return KernelSchedule.from_choices(choices), timings


def smooth_choices(timings: Sequence[dict[str, float]]) -> list[str]:
    """A kernel per measured row count: the fastest, with few switches.

    Minimises the summed relative slowdown (``t / fastest - 1``, zero within the 5% tie
    margin, where the more exact kernel is preferred) plus a penalty per switch between
    neighbouring row counts, by dynamic programming. One noisy timing on a loaded machine
    then cannot turn ``int8_wo:8,dense`` into ``int8_wo:8,dense:16,int8_wo:32,dense``.
    """
    kernels = sorted({k for row in timings for k in row}, key=_EXACTNESS.__getitem__)

    def cost(row: dict[str, float], kernel: str) -> float:
        if kernel not in row:
            return float("inf")
        slowdown = row[kernel] / min(row.values())
        penalty = 0.0 if slowdown <= _TIE_MARGIN else slowdown - 1.0
        return penalty + 1e-3 * _EXACTNESS[kernel]

    totals = {k: cost(timings[0], k) for k in kernels}
    paths = {k: [k] for k in kernels}
    for row in timings[1:]:
        new_totals, new_paths = {}, {}
        for kernel in kernels:
            previous = min(kernels, key=lambda p: totals[p] + (0 if p == kernel else _SWITCH_PENALTY))
            switch = 0 if previous == kernel else _SWITCH_PENALTY
            new_totals[kernel] = totals[previous] + switch + cost(row, kernel)
            new_paths[kernel] = [*paths[previous], kernel]
        totals, paths = new_totals, new_paths
    return paths[min(kernels, key=totals.__getitem__)]


def _format_timings(timings: dict[int, dict[str, float]]) -> str:
    return "; ".join(
        f"M={m}: " + " ".join(f"{k} {t * 1e3:.2f}ms" for k, t in row.items())
        for m, row in timings.items()
    )


def default_plan(source: str) -> Int8KernelPlan:
    """The plan when no measurement can be trusted (what AVX512-BF16/VNNI measured, 2
    threads). With the native GEMV: decoder linears w8a16 at 1-2 rows, weight-only int8 up
    to 8, float weights beyond; the LM head W8A8 (the GEMV up to 16 rows). Without it:
    weight-only int8 for small decode batches, float weights for larger steps; the LM head
    W8A8 at one row (``_int_mm``'s GEMV: ~6x weight-only there), weight-only up to 8 rows,
    W8A8 beyond (1.2-1.5x bf16)."""
    if gemv.load_gemv() is not None:
        return Int8KernelPlan.parse(
            f"linear={KERNEL_W8A16}:2,{KERNEL_WEIGHT_ONLY}:8,{KERNEL_DENSE};"
            f"lm_head={KERNEL_W8A8}",
            source=source,
        )
    return Int8KernelPlan.parse(
        f"linear={KERNEL_WEIGHT_ONLY}:8,{KERNEL_DENSE};"
        f"lm_head={KERNEL_W8A8}:1,{KERNEL_WEIGHT_ONLY}:8,{KERNEL_W8A8}",
        source=source,
    )


def _plan_key(
    linear_weights: Sequence[QuantizedWeight], lm_head: QuantizedWeight | None, dtype: torch.dtype
) -> str:
    """What a measured plan depends on: CPU, threads, torch, dtype, the measured shapes."""
    from pagedserve import platform

    linear = linear_weights[0].qweight.shape if linear_weights else ()
    head = tuple(lm_head.qweight.shape) if lm_head is not None else ()
    return (
        f"{platform.cpu_model_name()}|{platform.cpu_isa()}|threads={torch.get_num_threads()}|"
        f"torch={torch.__version__}|{dtype}|linear={tuple(linear)}x{len(linear_weights)}|"
        f"head={head}|gemv={'on' if gemv.load_gemv() is not None else 'off'}|"
        f"kernels={','.join(KERNELS)}|measurement={_MEASUREMENT_VERSION}"
    )


def _read_cached(path: Path | None, key: str) -> Int8KernelPlan | None:
    if path is None:
        return None
    try:
        entry = json.loads(path.read_text()).get(key)
        return None if entry is None else Int8KernelPlan.parse(entry["plan"], source="measured, cached")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _write_cached(path: Path | None, key: str, plan: Int8KernelPlan, timings: str) -> None:
    if path is None:
        return
    from pagedserve import platform

    entry = {"plan": str(plan), "measured_at": time.strftime("%Y-%m-%d %H:%M:%S"),
             "timings_ms": timings}
    platform.store_measurement(path, key, entry, "the int8 kernel plan")


def choose_int8_plan(
    linear_weights: Sequence[QuantizedWeight],
    lm_head: QuantizedWeight | None,
    dtype: torch.dtype,
    override: str | None = None,
    cache_path: Path | None = None,
) -> Int8KernelPlan:
    """The kernel plan: ``override`` (PAGEDSERVE_INT8_KERNELS) when given; else the plan
    measured before for this CPU, thread count, torch, dtype and shapes (``cache_path``);
    else measured now, twice, and cached when both agree. On a busy machine every timing is
    inflated and the ranking is noise: a measurement that overruns its time budget, or two
    that disagree, give :func:`default_plan`, not cached.

    ``linear_weights``: decoder linears of one shape, one per layer (streamed at small M);
    ``lm_head``: the LM head's weights (measured on row slices of it).
    """
    if override:
        return Int8KernelPlan.parse(override, source=ENV_VAR)
    key = _plan_key(linear_weights, lm_head, dtype)
    cached = _read_cached(cache_path, key)
    if cached is not None:
        return cached
    start = time.perf_counter()
    plans: list[tuple[Int8KernelPlan, str]] = []
    problem = ""
    try:
        # Two runs that agree settle it; on a near-tie between kernels a third run decides
        # (a plan two of three runs chose).
        for _ in range(3):
            plans.append(_measure_plan(
                linear_weights, lm_head, dtype, time.perf_counter() + _TOTAL_BUDGET_S
            ))
            counts = Counter(str(p) for p, _ in plans)
            if counts.most_common(1)[0][1] >= 2:
                break
    except MeasurementOverrun:
        problem = f"the measurement overran {_TOTAL_BUDGET_S:.0f} s"
    if not problem:
        chosen, votes = Counter(str(p) for p, _ in plans).most_common(1)[0]
        if votes >= 2:
            plan, timings = next((p, t) for p, t in plans if str(p) == chosen)
        else:
            problem = f"three measurements disagreed ({', '.join(str(p) for p, _ in plans)})"
    if problem:
        logger.warning(
            "int8 kernels: %s (machine busy?): default kernels, nothing cached; set %s to "
            "choose", problem, ENV_VAR,
        )
        return default_plan("default: machine too busy to measure")
    logger.info(
        "int8 kernels: %s (measured %d times in %.2f s)", plan, len(plans),
        time.perf_counter() - start,
    )
    logger.debug("int8 kernel timings: %s", timings)
    _write_cached(cache_path, key, plan, timings)
    return plan


def _measure_plan(
    linear_weights: Sequence[QuantizedWeight],
    lm_head: QuantizedWeight | None,
    dtype: torch.dtype,
    deadline: float,
) -> tuple[Int8KernelPlan, str]:
    linear = KernelSchedule.single(KERNEL_DENSE)
    notes = []
    if linear_weights and weight_only_supported(linear_weights[0].qweight.shape[1]):
        candidates = [KERNEL_DENSE, KERNEL_WEIGHT_ONLY]
        if gemv.load_gemv() is not None and linear_weights[0].weight_sum is not None:
            candidates.append(KERNEL_W8A16)
        linear, timings = measure_schedule(linear_weights, candidates, dtype, deadline=deadline)
        notes.append("linear: " + _format_timings(timings))
    head = KernelSchedule.single(KERNEL_DENSE)
    if lm_head is not None:
        candidates = [KERNEL_DENSE, KERNEL_W8A8]
        if weight_only_supported(lm_head.qweight.shape[1]):
            candidates.insert(1, KERNEL_WEIGHT_ONLY)
        chunk = 8192
        slices = [
            lm_head.rows(i, min(i + chunk, lm_head.qweight.shape[0]))
            for i in range(0, lm_head.qweight.shape[0], chunk)
        ]
        head, timings = measure_schedule(slices, candidates, dtype, deadline=deadline)
        notes.append("LM head: " + _format_timings(timings))
    return Int8KernelPlan(linear=linear, lm_head=head, source="measured"), " | ".join(notes)
