"""Where a decode step's time goes, offline, on the default model (issue 8, item 4).

    .venv/bin/python benchmarks/step_overhead.py [--concurrency 1 32] [--steps 40] [engine kwargs as JSON]

For each concurrency: that many requests of 256 random prompt tokens decode together
(ignore_eos); over the decode-only steps it reports the median wall time of
``LLMEngine.step()`` (schedule, run, sample, detokenize, outputs: the whole offline step)
split into the model runner's ``prepare`` (input tensors), ``forward`` (decoder layers),
``logits`` (LM head) and ``sample``, and the rest: scheduling, output processing and
detokenization. Overhead = everything but forward and logits.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

from pagedserve import LLM, SamplingParams


def profile(llm: LLM, concurrency: int, num_steps: int, prompt_len: int = 256) -> dict[str, float]:
    engine = llm.llm_engine
    runner = engine.engine_core.engine_core.model_runner
    rng = np.random.default_rng(concurrency)
    params = SamplingParams(temperature=0.0, max_tokens=num_steps + 8, ignore_eos=True)
    for i in range(concurrency):
        ids = rng.integers(1000, 200000, size=prompt_len).tolist()
        engine.add_request(f"p{concurrency}-{i}", {"prompt_token_ids": ids}, params)
    rows: list[dict[str, float]] = []
    scheduled: list[int] = []
    execute_model = runner.execute_model

    def recording_execute_model(scheduler_output):  # noqa: ANN001, ANN202
        scheduled.append(scheduler_output.total_num_scheduled_tokens)
        return execute_model(scheduler_output)

    runner.execute_model = recording_execute_model
    while engine.has_unfinished_requests():
        scheduled.clear()
        start = time.perf_counter()
        engine.step()
        total = time.perf_counter() - start
        if scheduled == [concurrency] and engine.get_stats().num_running_reqs == concurrency:
            row = dict(runner.last_step_timings)
            row["total"] = total
            rows.append(row)
    runner.execute_model = execute_model
    rows = rows[2:]  # the first decode steps touch fresh memory
    keys = ("total", "prepare", "forward", "logits", "sample")
    median = {k: statistics.median(r.get(k, 0.0) for r in rows) for k in keys}
    median["other"] = median["total"] - sum(median[k] for k in keys[1:])
    median["overhead"] = median["total"] - median["forward"] - median["logits"]
    median["steps"] = len(rows)
    return median


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("engine_kwargs", nargs="?", default="{}")
    args = parser.parse_args()
    kwargs = {"max_model_len": 1024, "max_num_seqs": max(args.concurrency), **json.loads(args.engine_kwargs)}
    llm = LLM(**kwargs)
    print("| concurrency | step (ms) | prepare | forward | logits | sample | sched+outputs+detok | overhead share |")
    print("|---|---|---|---|---|---|---|---|")
    for concurrency in args.concurrency:
        m = profile(llm, concurrency, args.steps)
        ms = {k: v * 1000 for k, v in m.items() if k != "steps"}
        print(f"| {concurrency} | {ms['total']:.2f} | {ms['prepare']:.2f} | {ms['forward']:.2f} | "
              f"{ms['logits']:.2f} | {ms['sample']:.2f} | {ms['other']:.2f} | "
              f"{m['overhead'] / m['total']:.1%} ({m['steps']} steps) |")


if __name__ == "__main__":
    main()
