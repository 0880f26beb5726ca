"""CPU backend (in-place paged attention: C++ kernel for decodes and chunks, SDPA over
cache views / input rows for longer chunks on AMX CPUs) vs a dense float64 reference: GQA,
sliding windows, softcap, mixed prefill + decode batches, shared prefix blocks written in
the same step, shuffled and consecutive block tables, padding rows, bf16 and fp32."""

from __future__ import annotations

import logging
import random
import sys

import numpy as np
import pytest
import torch

import pagedserve.attention.cpu_backend as cpu_backend
from pagedserve import native
from pagedserve.attention import cpu_kernels
from pagedserve.attention.backend import select_attn_backend
from pagedserve.attention.cpu_backend import CPUAttentionBackend
from pagedserve.attention.torch_backend import TorchAttentionBackend
from tests.attention.paged_cases import Case, run_case
from tests.utils.paged import make_common_metadata


@pytest.fixture(scope="module", params=[16, sys.maxsize], ids=["sdpa_beyond_16", "kernel_only"])
def backend(request: pytest.FixtureRequest) -> CPUAttentionBackend:
    """Both routings: AMX CPUs send chunks beyond 16 tokens to SDPA, others not."""
    load = cpu_kernels.load_kernel()
    if load.kernel is None:
        pytest.skip(f"paged-attention kernel unavailable: {load.reason}")
    return CPUAttentionBackend(load.kernel, max_kernel_query_len=request.param)


FP32 = {"atol": 2e-5, "rtol": 2e-5}
BF16 = {"atol": 3e-2, "rtol": 3e-2}
MIXED = [(0, 9), (5, 1), (12, 1), (7, 6), (0, 1), (30, 1), (3, 17), (0, 20)]
# Gemma 3 geometry: 4 query heads on 1 KV head, head_dim 256, block size 16.
GEMMA = {"num_heads": 4, "num_kv_heads": 1, "head_dim": 256, "block_size": 16}


def _check(backend: CPUAttentionBackend, case: Case, seed: int) -> None:
    out, expected = run_case(backend, case, seed)
    tol = FP32 if case.dtype == torch.float32 else BF16
    torch.testing.assert_close(out, expected, **tol)


@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (8, 1), (6, 3)])
@pytest.mark.parametrize("window", [None, 1, 5, 16])
@pytest.mark.parametrize("head_dim", [8, 64])
def test_mixed_batch_matches_reference(backend, heads, window, head_dim) -> None:
    case = Case(MIXED, *heads, window=window, head_dim=head_dim)
    _check(backend, case, seed=1)


@pytest.mark.parametrize("limit", [0, 1, 16, 10**6])
@pytest.mark.parametrize("window", [None, 5])
def test_kernel_and_sdpa_routes(backend, limit, window) -> None:
    # chunks longer than the limit go through SDPA tiles (0: even decodes), others the kernel
    routed = CPUAttentionBackend(backend.kernel, max_kernel_query_len=limit)
    for seed, softcap in ((2, None), (3, 2.5)):
        _check(routed, Case(MIXED, 4, 2, window=window, softcap=softcap, head_dim=32), seed)


@pytest.mark.parametrize("window", [None, 6])
@pytest.mark.parametrize("head_dim", [8, 48])
def test_softcap(backend, window, head_dim) -> None:
    _check(backend, Case(MIXED, 4, 2, window=window, softcap=3.0, head_dim=head_dim), seed=4)


@pytest.mark.parametrize("block_size", [1, 2, 16])
def test_block_sizes(backend, block_size) -> None:
    _check(backend, Case(MIXED, 4, 2, window=7, block_size=block_size, head_dim=16), seed=5)


@pytest.mark.parametrize("consecutive", [False, True])
@pytest.mark.parametrize("window", [None, 7])
def test_prefix_from_scattered_or_consecutive_blocks(backend, consecutive, window) -> None:
    # chunks with a cached prefix: gathered blocks, or a view when the ids are consecutive
    requests = [(20, 30), (33, 17), (0, 25), (9, 1)]
    case = Case(requests, 4, 2, window=window, consecutive_blocks=consecutive, head_dim=32)
    _check(backend, case, seed=6)


def test_blocks_written_this_step_are_visible_to_other_requests(backend) -> None:
    # Request 1 has 8 cached tokens living in blocks that request 0 fills in this step.
    for requests in ([(0, 10), (8, 3), (8, 1)], [(0, 40), (32, 20), (5, 1)]):
        _check(backend, Case(requests, 4, 2, share_prefix=True, head_dim=32), seed=7)


@pytest.mark.parametrize("window", [None, 5])
def test_padding_rows_and_strided_query(backend, window) -> None:
    case = Case(MIXED, 4, 2, window=window, num_padding_tokens=3, strided_query=True, head_dim=32)
    _check(backend, case, seed=8)
    _check(backend, Case([(3, 1), (6, 1)], 4, 2, num_padding_tokens=2, head_dim=32), seed=8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [None, 48])
def test_gemma_geometry_long_contexts(backend, monkeypatch, dtype, window) -> None:
    # contexts beyond one kernel unit (merged by log-sum-exp), windowed prefill tiles
    monkeypatch.setattr(cpu_backend, "_MIN_WINDOW_TILE", 32)
    requests = [(0, 100), (40, 70), (300, 1), (1200, 1), (17, 1), (60, 9)]
    _check(backend, Case(requests, window=window, dtype=dtype, **GEMMA), seed=9)


@pytest.mark.parametrize("head_dim", [8, 48, 64])
def test_bfloat16_close_to_reference(backend, head_dim) -> None:
    # 64: bf16 pair dot products (AVX512-BF16); 48: fp32 vectors; 8: scalar tail
    _check(backend, Case(MIXED, 4, 2, window=5, dtype=torch.bfloat16, head_dim=head_dim), 10)


@pytest.mark.parametrize("seed", range(8))
def test_random_batches(backend, seed) -> None:
    rng = random.Random(200 + seed)
    requests = []
    for _ in range(rng.randint(1, 8)):
        kind = rng.choice(["decode", "prefill", "chunk"])
        if kind == "decode":
            requests.append((rng.randint(0, 300), 1))
        elif kind == "prefill":
            requests.append((0, rng.randint(1, 40)))
        else:
            requests.append((rng.randint(1, 60), rng.randint(2, 30)))
    heads = rng.choice([(4, 4), (4, 2), (6, 3), (8, 1)])
    case = Case(
        requests, *heads, window=rng.choice([None, 2, 9, 33]),
        block_size=rng.choice([2, 4, 8, 16]), head_dim=rng.choice([8, 16, 32]),
        consecutive_blocks=rng.random() < 0.3,
    )  # fmt: skip
    _check(backend, case, seed)


def test_matches_torch_backend(backend) -> None:
    case = Case(MIXED + [(100, 1), (0, 33)], 4, 1, window=9, head_dim=32)
    out, expected = run_case(backend, case, seed=11)
    ref, _ = run_case(TorchAttentionBackend(), case, seed=11)
    torch.testing.assert_close(out, ref, **FP32)
    torch.testing.assert_close(out, expected, **FP32)


def test_works_inside_and_outside_inference_mode(backend) -> None:
    with torch.inference_mode():
        _check(backend, Case(MIXED, 4, 2, head_dim=16), seed=12)
    with torch.no_grad():
        _check(backend, Case(MIXED, 4, 2, head_dim=16), seed=13)
    _check(backend, Case(MIXED, 4, 2, head_dim=16), seed=14)


def _metadata(
    requests: list[tuple[int, int]], tables: list[list[int]], max_kernel_query_len: int = 16
) -> cpu_backend.CPUAttentionMetadata:
    common = make_common_metadata(
        [q for _, q in requests], [c + q for c, q in requests], tables, block_size=4
    )
    return cpu_backend.build_metadata(common, max_kernel_query_len)


def test_metadata_decode_only_step() -> None:
    metadata = _metadata([(3, 1), (8, 1), (0, 1)], [[1], [2, 3, 4], [5]])
    assert metadata.prefills == []
    assert metadata.token_idx.tolist() == [0, 1, 2]
    assert metadata.req_row.tolist() == [0, 1, 2]
    assert metadata.ctx_len.tolist() == [4, 9, 1]


def test_metadata_splits_short_chunks_into_kernel_tokens() -> None:
    metadata = _metadata([(2, 3), (0, 20), (5, 1)], [[1, 2], [3, 4, 5, 6, 7], [8, 9]])
    assert metadata.token_idx.tolist() == [0, 1, 2, 23]
    assert metadata.req_row.tolist() == [0, 0, 0, 2]
    assert metadata.ctx_len.tolist() == [3, 4, 5, 6]
    assert [(p.req_index, p.token_start, p.query_len) for p in metadata.prefills] == [(1, 3, 20)]


def test_metadata_without_limit_sends_every_token_to_the_kernel() -> None:
    metadata = _metadata([(2, 3), (0, 20)], [[1, 2], [3, 4, 5, 6, 7]], sys.maxsize)
    assert metadata.prefills == [] and metadata.token_idx.tolist() == list(range(23))
    assert metadata.ctx_len.tolist() == [3, 4, 5, *range(1, 21)]


def test_prefill_tiles_read_in_place_and_only_the_window(monkeypatch) -> None:
    monkeypatch.setattr(cpu_backend, "_MIN_WINDOW_TILE", 8)
    fresh = _metadata([(0, 20)], [[9, 3, 7, 1, 2]], 0)
    (tile,) = fresh.prefill_tiles(None)
    assert tile.input_rows == slice(0, 20) and tile.mask is None  # this step's rows, causal
    # consecutive prefix blocks: a view; scattered: a gather of exactly those blocks
    consecutive = _metadata([(8, 12)], [[4, 5, 6, 7, 8]], 0).prefill_tiles(None)[0]
    assert consecutive.block_index is None and consecutive.first_block == 4
    assert consecutive.num_blocks == 5 and consecutive.mask.shape == (12, 20)
    scattered = _metadata([(8, 12)], [[4, 9, 6, 7, 8]], 0).prefill_tiles(None)[0]
    assert scattered.block_index.tolist() == [4, 9, 6, 7, 8]
    # window 8 over 40 new tokens after 16 cached: 5 tiles, each reads <= window + tile keys
    tiles = _metadata([(16, 40)], [list(range(1, 15))], 0).prefill_tiles(8)
    assert len(tiles) == 5
    for tile in tiles:
        num_keys = tile.num_blocks * 4 if tile.input_rows is None else tile.mask.shape[1]
        assert num_keys <= 8 + 8 - 1 + 2 * 3
    assert tiles[0].input_rows is None and tiles[-1].input_rows is not None


def test_kernel_reads_only_the_window(backend) -> None:
    # Blocks outside the window hold NaN: reading one would poison the output.
    block_size, head_dim = 4, 16
    cache = torch.full((2, 12, block_size, 1, head_dim), float("nan"))
    table = list(range(1, 11))  # 40 tokens
    window = 6
    for pos in range(40 - window, 40):
        cache[:, table[pos // block_size], pos % block_size] = torch.randn(2, 1, head_dim)
    common = make_common_metadata([1], [40], [table], block_size)
    metadata = backend.build_metadata(common)
    query = torch.randn(1, 2, head_dim)
    key_value = cache[:, table[39 // block_size], 39 % block_size].clone()  # [2, Hkv, D]
    out = backend.forward(query, key_value[0:1], key_value[1:2], cache, metadata, window, 0.25)
    assert torch.isfinite(out).all()


def test_loaded_library_keeps_denormals() -> None:
    # -ffast-math at link time would flush denormals for the whole process on load.
    assert cpu_kernels.load_kernel().kernel is not None
    tiny = torch.tensor([1e-39], dtype=torch.float32)
    assert (tiny / 2).item() != 0.0
    assert np.float32(1e-39) / np.float32(2) != 0


def test_kernel_is_cached_and_reused(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("PAGEDSERVE_CACHE_DIR", str(tmp_path))
    first = cpu_kernels._load()
    assert first.kernel is not None, first.reason
    (built,) = (tmp_path / "kernels").glob("paged_attention-*.so")
    mtime = built.stat().st_mtime_ns
    again = cpu_kernels._load()
    assert again.kernel.path == built and built.stat().st_mtime_ns == mtime


def test_selection_and_fallback(monkeypatch, caplog) -> None:
    cpu = torch.device("cpu")
    assert select_attn_backend("torch", cpu).name == "torch"
    assert select_attn_backend("auto", torch.device("cuda")).name == "torch"
    with pytest.raises(ValueError, match="CPU only"):
        select_attn_backend("cpu", torch.device("cuda"))
    unavailable = cpu_kernels.KernelLoad(None, "no C++ compiler found (set CXX)")
    monkeypatch.setattr(cpu_kernels, "load_kernel", lambda: unavailable)
    with caplog.at_level(logging.WARNING):
        assert select_attn_backend("auto", cpu).name == "torch"
    assert "no C++ compiler" in caplog.text
    with pytest.raises(RuntimeError, match="no C\\+\\+ compiler"):
        select_attn_backend("cpu", cpu)


def test_no_compiler_means_no_kernel(monkeypatch) -> None:
    monkeypatch.setattr(native, "find_compiler", lambda: None)
    load = cpu_kernels._load()
    assert load.kernel is None and "compiler" in load.reason
