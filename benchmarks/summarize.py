"""Table of benchmarks/vs_llama_server.sh results: pagedserve vs llama-server, per round.

    python benchmarks/summarize.py /tmp/bench-vs-llama
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

FIELDS = [("output_throughput", "out tok/s"), ("p50_ttft_ms", "TTFT p50"), ("p99_ttft_ms", "TTFT p99"),
          ("p50_tpot_ms", "TPOT p50"), ("p50_itl_ms", "ITL p50"), ("p99_itl_ms", "ITL p99")]


def main(folder: str) -> None:
    results = {p.stem: json.loads(p.read_text()) for p in sorted(Path(folder).glob("*.json"))}
    workloads = sorted({name.split("-", 1)[1] for name in results})
    print("| workload | " + " | ".join(f"ours / llama {label} (ratio)" for _, label in FIELDS) + " | ITL p99/p50 ours |")
    print("|---" * (len(FIELDS) + 2) + "|")
    for workload in workloads:
        ours, peer = results.get(f"pagedserve-{workload}"), results.get(f"llama-{workload}")
        if ours is None or peer is None:
            continue
        cells = []
        for key, _ in FIELDS:
            a, b = ours.get(key) or 0.0, peer.get(key) or 0.0
            cells.append(f"{a:.4g} / {b:.4g} ({a / b:.2f}x)" if b else f"{a:.4g} / {b:.4g}")
        itl_ratio = (ours["p99_itl_ms"] / ours["p50_itl_ms"]) if ours.get("p50_itl_ms") else 0.0
        failed = f" failed {ours['failed']}/{peer['failed']}" if ours["failed"] or peer["failed"] else ""
        print(f"| {workload}{failed} | " + " | ".join(cells) + f" | {itl_ratio:.1f} |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/tmp/bench-vs-llama")
