"""`bench serve --plot FILE.png`: TTFT and ITL distributions, output throughput over time.

matplotlib is an optional dependency (``pip install pagedserve[plot]``); the Agg backend
draws without a display.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def plot_serving_result(result: dict[str, Any], tokens_per_second: list[float],
                        path: str) -> None:
    """Draw three panels from a `bench serve` result (its per-request lists) into ``path``."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ValueError("--plot needs matplotlib: pip install 'pagedserve[plot]'") from exc

    ok = [not e for e in result.get("errors", [])]
    ttfts_ms = np.array([t for t, good in zip(result["ttfts"], ok, strict=True) if good]) * 1000
    itls_ms = np.array([v for row, good in zip(result["itls"], ok, strict=True) if good
                        for v in row]) * 1000
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    _histogram(axes[0], ttfts_ms, "Time to first token", "TTFT (ms)")
    _histogram(axes[1], itls_ms, "Inter-token latency", "ITL (ms)")
    ax = axes[2]
    if tokens_per_second:
        seconds = np.arange(len(tokens_per_second))
        ax.plot(seconds, tokens_per_second, drawstyle="steps-post", label="per second")
        mean = result.get("output_throughput")
        if mean:
            ax.axhline(mean, color="tab:red", linestyle="--", label=f"mean {mean:.1f}")
        ax.legend()
    ax.set_title("Output token throughput over time")
    ax.set_xlabel("time since start (s)")
    ax.set_ylabel("tokens/s")
    ax.grid(alpha=0.3)
    title = (f"{result.get('completed', 0)} requests, {result.get('total_output_tokens', 0)} "
             f"output tokens in {result.get('duration', 0.0):.1f} s")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _histogram(ax: Any, values_ms: np.ndarray, title: str, xlabel: str) -> None:
    if values_ms.size:
        ax.hist(values_ms, bins=min(50, max(5, values_ms.size // 4)), color="tab:blue",
                alpha=0.8)
        for pct, style in ((50, "-"), (99, "--")):
            value = float(np.percentile(values_ms, pct))
            ax.axvline(value, color="tab:red", linestyle=style, label=f"p{pct} {value:.1f} ms")
        ax.legend()
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("count")
    ax.grid(alpha=0.3)
