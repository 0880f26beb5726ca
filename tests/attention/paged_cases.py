"""A dense reference for paged attention, and a case builder that runs any backend on a
hand-built paged batch (shuffled or consecutive block ids, shared prefix blocks, padding
rows) and returns (backend output, reference output)."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch

from pagedserve import platform
from pagedserve.attention.backend import AttentionBackend
from tests.utils.paged import make_common_metadata, make_kv_caches


def reference_attention(
    query: torch.Tensor,  # [Tq, H, D]
    keys: torch.Tensor,  # [S, Hkv, D] the whole context
    values: torch.Tensor,
    first_pos: int,
    window: int | None,
    scale: float,
    softcap: float | None,
) -> torch.Tensor:
    """Dense causal attention of one request in float64 (GQA by repeating K/V heads)."""
    num_q, num_heads, _ = query.shape
    group = num_heads // keys.shape[1]
    k = keys.double().repeat_interleave(group, dim=1).transpose(0, 1)  # [H, S, D]
    v = values.double().repeat_interleave(group, dim=1).transpose(0, 1)
    scores = torch.matmul(query.double().transpose(0, 1), k.transpose(1, 2)) * scale  # [H, Tq, S]
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    q_pos = torch.arange(first_pos, first_pos + num_q)[:, None]
    k_pos = torch.arange(keys.shape[0])[None, :]
    allowed = k_pos <= q_pos
    if window is not None:
        allowed &= (q_pos - k_pos) < window
    scores = scores.masked_fill(~allowed, -math.inf)
    return torch.matmul(torch.softmax(scores, dim=-1), v).transpose(0, 1)  # [Tq, H, D]


@dataclass
class Case:
    """A batch of requests ``(num_computed, query_len)`` and the attention geometry."""

    requests: list[tuple[int, int]]
    num_heads: int = 4
    num_kv_heads: int = 2
    window: int | None = None
    softcap: float | None = None
    block_size: int = 4
    head_dim: int = 8
    dtype: torch.dtype = torch.float32
    share_prefix: bool = False  # request 1 reuses request 0's blocks, written this step
    consecutive_blocks: bool = False  # each request's blocks are consecutive ids
    num_padding_tokens: int = 0
    strided_query: bool = False  # query rows are a slice of a wider tensor


def run_case(backend: AttentionBackend, case: Case, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``backend`` on the case; returns float32 (output, reference) on the CPU, and
    checks that every token's K/V landed in its slot."""
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    requests, block_size, dtype = case.requests, case.block_size, case.dtype
    num_kv_heads, head_dim = case.num_kv_heads, case.head_dim
    scale = head_dim**-0.5 * 1.7
    num_blocks = 1 + sum(-(-(c + q) // block_size) for c, q in requests) + 4
    free = list(range(1, num_blocks))
    if not case.consecutive_blocks:
        rng.shuffle(free)
    free.reverse()  # pop() takes ascending ids when not shuffled
    (kv_cache,) = make_kv_caches(1, num_blocks, block_size, num_kv_heads, head_dim, dtype)

    keys, values, queries, tables = [], [], [], []
    for i, (computed, q_len) in enumerate(requests):
        seq_len = computed + q_len
        k = torch.randn(seq_len, num_kv_heads, head_dim, generator=gen)
        v = torch.randn(seq_len, num_kv_heads, head_dim, generator=gen)
        table = [free.pop() for _ in range(-(-seq_len // block_size))]
        shared = 0
        if case.share_prefix and i == 1:
            # Request 1 reuses request 0's full blocks, which request 0 writes in this same
            # step: its cached prefix is exactly request 0's first tokens.
            computed0, q_len0 = requests[0]
            assert computed0 == 0
            shared = min(q_len0 // block_size, computed // block_size)
            table[:shared] = tables[0][:shared]
            k[: shared * block_size] = keys[0][: shared * block_size]
            v[: shared * block_size] = values[0][: shared * block_size]
        for pos in range(shared * block_size, computed):  # the already-cached context
            block, offset = table[pos // block_size], pos % block_size
            kv_cache[0, block, offset] = k[pos].to(kv_cache.device, dtype)
            kv_cache[1, block, offset] = v[pos].to(kv_cache.device, dtype)
        keys.append(k)
        values.append(v)
        queries.append(torch.randn(q_len, case.num_heads, head_dim, generator=gen))
        tables.append(table)

    common = make_common_metadata(
        [q for _, q in requests], [c + q for c, q in requests], tables, block_size
    )
    new_k = torch.cat([k[c:] for k, (c, _) in zip(keys, requests, strict=True)])
    new_v = torch.cat([v[c:] for v, (c, _) in zip(values, requests, strict=True)])
    query = torch.cat(queries)
    if case.num_padding_tokens:
        pad = torch.randn(case.num_padding_tokens, case.num_heads, head_dim, generator=gen)
        query = torch.cat([query, pad])
        new_k = torch.cat([new_k, pad[:, :num_kv_heads]])
        new_v = torch.cat([new_v, pad[:, :num_kv_heads]])
    device = platform.device()
    query = query.to(device, dtype)
    if case.strided_query:  # rows of a wider tensor, as after a fused qkv projection
        wide = torch.zeros(query.shape[0], query.shape[1] + 3, head_dim, dtype=dtype, device=device)
        wide[:, 1 : 1 + case.num_heads] = query
        query = wide[:, 1 : 1 + case.num_heads]
    out = backend.forward(
        query, new_k.to(device, dtype), new_v.to(device, dtype), kv_cache,
        backend.build_metadata(common), case.window, scale, case.softcap,
    ).cpu()  # fmt: skip
    kv_cache = kv_cache.cpu()
    expected = torch.cat([
        reference_attention(q, k, v, c, case.window, scale, case.softcap)
        for q, k, v, (c, _) in zip(queries, keys, values, requests, strict=True)
    ])
    if case.num_padding_tokens:
        expected = torch.cat(
            [expected, torch.zeros(case.num_padding_tokens, case.num_heads, head_dim)]
        )
    for k, table in zip(keys, tables, strict=True):
        for pos in range(k.shape[0]):
            stored = kv_cache[0, table[pos // block_size], pos % block_size].float()
            torch.testing.assert_close(stored, k[pos].to(dtype).float())
    return out.float(), expected.float()
