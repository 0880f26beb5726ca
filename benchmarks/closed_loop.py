"""Offline replica of `bench serve --max-concurrency C` on the random 32-512 / 15-240 mix:
C requests decode together and each finished one is replaced at once, through
`LLMEngine.step()` (no HTTP). Prints throughput, ITL and TTFT percentiles and, with the
step-time budget on, how its cost model predicted the steps it measured.

    .venv/bin/python benchmarks/closed_loop.py CONCURRENCY NUM_REQUESTS ['{"engine": "kwargs"}']
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np

from pagedserve import LLM, SamplingParams
from pagedserve.core.step_cost import StepShape


def main() -> None:
    concurrency, total = int(sys.argv[1]), int(sys.argv[2])
    kwargs = {"max_model_len": 1024, "max_num_seqs": 64, **json.loads(sys.argv[3] if len(sys.argv) > 3 else "{}")}
    engine = LLM(**kwargs).llm_engine
    scheduler = engine.engine_core.engine_core.scheduler
    budget = scheduler.step_budget
    rng = np.random.default_rng(1)
    arrival: dict[str, float] = {}

    def add(i: int) -> None:
        prompt = rng.integers(1000, 200000, int(rng.integers(32, 513))).tolist()
        params = SamplingParams(max_tokens=int(rng.integers(15, 241)), ignore_eos=True, temperature=0)
        arrival[str(i)] = time.perf_counter()
        engine.add_request(str(i), {"prompt_token_ids": prompt}, params)

    steps: list[tuple[float, float, float]] = []  # (prefill tokens, predicted s, measured s)
    record = scheduler.record_step_time

    def recording(scheduler_output, seconds: float) -> None:  # noqa: ANN001
        shape = StepShape.of(scheduler_output)
        predicted = budget.cost_model.predict(shape) if budget else 0.0
        steps.append((shape.num_prefill_tokens, predicted, seconds))
        record(scheduler_output, seconds)

    scheduler.record_step_time = recording
    next_id = 0
    for _ in range(concurrency):
        add(next_id)
        next_id += 1
    itl: list[float] = []
    ttft: list[float] = []
    last: dict[str, float] = {}
    generated = 0
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        outputs = engine.step()
        now = time.perf_counter()
        for output in outputs:
            if output.request_id in last:
                itl.append(now - last[output.request_id])
            else:
                ttft.append(now - arrival[output.request_id])
            last[output.request_id] = now
            if output.finished:
                generated += len(output.outputs[0].token_ids)
                if next_id < total:
                    add(next_id)
                    next_id += 1
    elapsed = time.perf_counter() - start
    itl_ms = np.array(itl) * 1000
    p50, p99 = np.percentile(itl_ms, [50, 99])
    print(f"concurrency {concurrency}: {generated / elapsed:.1f} output tok/s; ITL p50 {p50:.1f} "
          f"p99 {p99:.1f} ms (p99/p50 {p99 / p50:.2f}); TTFT p50 {np.percentile(ttft, 50):.2f} "
          f"p99 {np.percentile(ttft, 99):.2f} s")
    if budget is not None:
        rows = np.array(steps)
        for name, part in (("decode-only", rows[rows[:, 0] == 0]), ("with prefill", rows[rows[:, 0] > 0])):
            if len(part):
                print(f"  {name}: {len(part)} steps, measured p50 {np.median(part[:, 2]) * 1000:.1f} ms "
                      f"(p99 {np.percentile(part[:, 2], 99) * 1000:.0f}), measured/predicted p50 "
                      f"{np.median(part[:, 2] / part[:, 1]):.2f}")


if __name__ == "__main__":
    main()
