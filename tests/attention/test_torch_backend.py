"""Torch attention backend vs a naive dense reference (GQA, sliding windows, softcap,
chunked prefill, mixed batches, blocks shared within a step, padded token rows)."""

from __future__ import annotations

import random

import pytest
import torch

from pagedserve import platform
from pagedserve.attention.backend import get_attn_backend
from pagedserve.attention.torch_backend import TorchAttentionBackend, build_metadata
from pagedserve.forward_context import ForwardContext, set_forward_context
from pagedserve.layers.attention import Attention
from tests.attention.paged_cases import Case, run_case
from tests.utils.paged import make_common_metadata, make_kv_caches


def _run_case(
    requests: list[tuple[int, int]],  # (num_computed, query_len)
    num_heads: int,
    num_kv_heads: int,
    window: int | None,
    softcap: float | None,
    block_size: int,
    seed: int,
    dtype: torch.dtype = torch.float32,
    share_prefix: bool = False,
    num_padding_tokens: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    case = Case(
        requests, num_heads, num_kv_heads, window, softcap, block_size, dtype=dtype,
        share_prefix=share_prefix, num_padding_tokens=num_padding_tokens,
    )  # fmt: skip
    return run_case(TorchAttentionBackend(), case, seed)


MIXED = [(0, 9), (5, 1), (12, 1), (7, 6), (0, 1), (30, 1), (3, 17)]


@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (4, 2), (8, 1)])
@pytest.mark.parametrize("window", [None, 1, 5, 16])
def test_mixed_batch_matches_reference(num_heads: int, num_kv_heads: int, window: int | None) -> None:
    out, expected = _run_case(MIXED, num_heads, num_kv_heads, window, None, block_size=4, seed=1)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("window", [None, 6])
def test_softcap(window: int | None) -> None:
    out, expected = _run_case(MIXED, 4, 2, window, 3.0, block_size=4, seed=2)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("block_size", [1, 2, 16])
def test_block_sizes(block_size: int) -> None:
    out, expected = _run_case(MIXED, 4, 2, 7, None, block_size=block_size, seed=3)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_decode_only_and_single_prefill() -> None:
    for requests in ([(4, 1), (9, 1), (0, 1), (33, 1)], [(0, 21)], [(10, 21)]):
        for window in (None, 4):
            out, expected = _run_case(requests, 4, 1, window, None, block_size=4, seed=4)
            torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_blocks_written_this_step_are_visible_to_other_requests() -> None:
    # Request 1 has 8 cached tokens living in blocks that request 0 fills in this step.
    requests = [(0, 10), (8, 3), (8, 1)]
    out, expected = _run_case(requests, 4, 2, None, None, block_size=4, seed=5, share_prefix=True)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_padding_tokens_beyond_num_actual_tokens() -> None:
    out, expected = _run_case(MIXED, 4, 2, 5, None, 4, seed=6, num_padding_tokens=3)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    out, expected = _run_case([(3, 1), (6, 1)], 4, 2, None, None, 4, seed=6, num_padding_tokens=2)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_many_prefills_are_batched_and_correct() -> None:
    rng = random.Random(7)
    requests = [(rng.choice([0, 0, 4, 9]), rng.randint(2, 12)) for _ in range(12)]
    requests += [(rng.randint(1, 40), 1) for _ in range(10)]
    common = make_common_metadata(
        [q for _, q in requests], [c + q for c, q in requests],
        [[1] * (-(-(c + q) // 4)) for c, q in requests], 4,
    )
    metadata = build_metadata(common)
    assert len(metadata.groups) < 12  # decodes in one group, prefills batched
    for window in (None, 3):
        out, expected = _run_case(requests, 4, 2, window, None, block_size=4, seed=7)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("seed", range(6))
def test_random_batches(seed: int) -> None:
    rng = random.Random(100 + seed)
    requests = []
    for _ in range(rng.randint(1, 7)):
        kind = rng.choice(["decode", "prefill", "chunk"])
        if kind == "decode":
            requests.append((rng.randint(0, 50), 1))
        elif kind == "prefill":
            requests.append((0, rng.randint(1, 30)))
        else:
            requests.append((rng.randint(1, 40), rng.randint(2, 20)))
    heads = rng.choice([(4, 4), (4, 2), (6, 3), (8, 1)])
    window = rng.choice([None, 2, 9, 33])
    block_size = rng.choice([2, 4, 8])
    out, expected = _run_case(requests, *heads, window, None, block_size, seed=seed)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_bfloat16_close_to_reference() -> None:
    out, expected = _run_case(MIXED, 4, 2, 5, None, 4, seed=8, dtype=torch.bfloat16)
    torch.testing.assert_close(out, expected, atol=3e-2, rtol=3e-2)


def test_attention_layer_builds_metadata_once_per_forward() -> None:
    block_size, head_dim = 4, 8
    common = make_common_metadata([3, 1], [3, 6], [[1], [2, 3]], block_size)
    caches = make_kv_caches(2, 4, block_size, 2, head_dim)
    layers = [Attention(i, 4, 2, head_dim, scale=0.3, sliding_window=w) for i, w in enumerate([None, 2])]
    assert layers[0].backend is get_attn_backend()
    query = torch.randn(4, 4 * head_dim, device=platform.device())
    key = torch.randn(4, 2 * head_dim, device=platform.device())
    with set_forward_context(ForwardContext(common, caches)) as ctx:
        out0 = layers[0](query, key, key)
        metadata = ctx.backend_metadata
        assert metadata is not None
        out1 = layers[1](query, key, key)
        assert ctx.backend_metadata is metadata
    assert out0.shape == out1.shape == (4, 4 * head_dim)
    assert torch.isfinite(out0).all() and torch.isfinite(out1).all()
    assert not torch.equal(out0[3:], out1[3:])  # the window changes the decode's result


def test_kv_cache_shape() -> None:
    assert get_attn_backend().get_kv_cache_shape(10, 16, 2, 64) == (2, 10, 16, 2, 64)


def test_decodes_split_by_length_and_gather_bound(monkeypatch) -> None:
    import pagedserve.attention.torch_backend as torch_backend

    monkeypatch.setattr(torch_backend, "_MAX_GATHER_TOKENS", 64)
    monkeypatch.setattr(torch_backend, "_PAD_SLACK", 0)
    requests = [(c, 1) for c in (3, 40, 7, 25, 1, 33, 12, 18)] + [(0, 9), (5, 6)]
    common = make_common_metadata(
        [q for _, q in requests], [c + q for c, q in requests],
        [[1] * (-(-(c + q) // 4)) for c, q in requests], 4,
    )
    groups = build_metadata(common).groups
    assert len(groups) > 3
    for group in groups:
        assert group.batch_size == 1 or group.batch_size * group.seq_lens_np.max() <= 64
    for window in (None, 6):
        out, expected = _run_case(requests, 4, 2, window, None, block_size=4, seed=9)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_works_inside_and_outside_inference_mode(monkeypatch) -> None:
    import pagedserve.attention.torch_backend as torch_backend

    # fresh scratch buffers, first allocated inside inference mode
    monkeypatch.setattr(torch_backend, "_WORKSPACE", torch_backend._Workspace())
    with torch.inference_mode():
        out, expected = _run_case(MIXED, 4, 2, None, None, 4, seed=10)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        out, expected = _run_case(MIXED, 4, 2, None, None, 4, seed=11)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    out, expected = _run_case(MIXED, 4, 2, None, None, 4, seed=12)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
