"""Micro-benchmark: one step of paged attention, torch (gather) vs cpu (in place) backend.

``python -m pagedserve.attention.benchmark [--threads N] [--repeats R]``

Each case builds the step's metadata once and runs ``--layers`` attention layers, each
with its own KV cache (as in a model, so the cache is not warm from the previous layer),
over shuffled block tables. Backends alternate within each repetition; the table reports
the median milliseconds per layer and the ratio torch / cpu. Gemma 3 270M geometry by
default: 4 query heads, 1 KV head, head_dim 256, block size 16, bfloat16.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass

import numpy as np
import torch

from pagedserve.attention.backend import AttentionBackend, select_attn_backend
from pagedserve.attention.metadata import CommonAttentionMetadata


@dataclass(frozen=True)
class Geometry:
    num_heads: int = 4
    num_kv_heads: int = 1
    head_dim: int = 256
    block_size: int = 16
    dtype: torch.dtype = torch.bfloat16


def make_step(
    requests: list[tuple[int, int]], geometry: Geometry, rng: np.random.Generator
) -> tuple[CommonAttentionMetadata, int]:
    """Metadata for ``(num_computed, query_len)`` requests on shuffled blocks; returns it
    and the number of cache blocks needed."""
    block_size = geometry.block_size
    num_blocks_per_req = [-(-(c + q) // block_size) for c, q in requests]
    num_blocks = 1 + sum(num_blocks_per_req)
    ids = rng.permutation(np.arange(1, num_blocks))
    width = max(num_blocks_per_req)
    table = np.zeros((len(requests), width), dtype=np.int32)
    query_lens = np.array([q for _, q in requests], dtype=np.int32)
    seq_lens = np.array([c + q for c, q in requests], dtype=np.int32)
    offset = 0
    slots = []
    for i, n in enumerate(num_blocks_per_req):
        table[i, :n] = ids[offset : offset + n]
        offset += n
        pos = np.arange(seq_lens[i] - query_lens[i], seq_lens[i])
        slots.append(table[i, pos // block_size].astype(np.int64) * block_size + pos % block_size)
    query_start = np.zeros(len(requests) + 1, dtype=np.int32)
    query_start[1:] = np.cumsum(query_lens)
    common = CommonAttentionMetadata(
        query_start_loc=torch.from_numpy(query_start),
        query_start_loc_np=query_start,
        seq_lens=torch.from_numpy(seq_lens),
        seq_lens_np=seq_lens,
        num_computed_tokens_np=seq_lens - query_lens,
        block_table=torch.from_numpy(table),
        slot_mapping=torch.from_numpy(np.concatenate(slots)),
        num_reqs=len(requests),
        num_actual_tokens=int(query_start[-1]),
        max_query_len=int(query_lens.max()),
        max_seq_len=int(seq_lens.max()),
        block_size=block_size,
    )
    return common, num_blocks


def time_step(
    backend: AttentionBackend,
    common: CommonAttentionMetadata,
    caches: list[torch.Tensor],
    inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    window: int | None,
    scale: float,
) -> float:
    """Seconds per layer: build the metadata once, run every layer."""
    query, key, value = inputs
    start = time.perf_counter()
    metadata = backend.build_metadata(common)
    for cache in caches:
        backend.forward(query, key, value, cache, metadata, window, scale)
    return (time.perf_counter() - start) / len(caches)


def run_case(
    name: str,
    requests: list[tuple[int, int]],
    window: int | None,
    backends: dict[str, AttentionBackend],
    geometry: Geometry,
    num_layers: int,
    repeats: int,
) -> dict[str, float]:
    rng = np.random.default_rng(0)
    common, num_blocks = make_step(requests, geometry, rng)
    shape = (2, num_blocks, geometry.block_size, geometry.num_kv_heads, geometry.head_dim)
    caches = [torch.randn(shape).to(geometry.dtype) for _ in range(num_layers)]
    num_tokens = common.num_actual_tokens
    query = torch.randn(num_tokens, geometry.num_heads, geometry.head_dim).to(geometry.dtype)
    key = torch.randn(num_tokens, geometry.num_kv_heads, geometry.head_dim).to(geometry.dtype)
    inputs = (query, key, key.clone())
    scale = geometry.head_dim**-0.5
    times: dict[str, list[float]] = {label: [] for label in backends}
    for backend in backends.values():  # warm-up
        time_step(backend, common, caches, inputs, window, scale)
    for _ in range(repeats):
        for label, backend in backends.items():
            times[label].append(time_step(backend, common, caches, inputs, window, scale))
    result = {label: statistics.median(t) * 1e3 for label, t in times.items()}
    labels = list(backends)
    ratio = result[labels[0]] / result[labels[1]]
    cells = "  ".join(f"{label} {result[label]:8.3f} ms" for label in labels)
    print(f"{name:<44} {cells}  {labels[0]}/{labels[1]} {ratio:5.2f}x", flush=True)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--window", type=int, default=512, help="sliding window of local layers")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    geometry = Geometry()
    cpu = torch.device("cpu")
    backends = {"torch": select_attn_backend("torch", cpu), "cpu": select_attn_backend("cpu", cpu)}
    print(f"threads {torch.get_num_threads()}, {args.layers} layers, {geometry}")
    cases: list[tuple[str, list[tuple[int, int]]]] = []
    for batch in (1, 16, 64):
        for context in (128, 512, 2048):
            cases.append((f"decode {batch:2d} x ctx {context:4d}", [(context - 1, 1)] * batch))
    cases.append(("prefill 512 over 1024 cached", [(1024, 512)]))
    cases.append(("prefill 512 fresh", [(0, 512)]))
    cases.append(("prefill 2048 fresh", [(0, 2048)]))
    cases.append(("mixed: 512 over 1024 + 32 decodes x 512", [(1024, 512)] + [(511, 1)] * 32))
    for name, requests in cases:
        for window in (None, args.window):
            label = f"{name} {'global' if window is None else f'win {window}'}"
            run_case(label, requests, window, backends, geometry, args.layers, args.repeats)


if __name__ == "__main__":
    main()
