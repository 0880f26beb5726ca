"""CPU attention backend that reads the paged KV cache in place.

Per layer: (1) write the step's K/V into the cache by slot mapping (all writes before any
read, so requests sharing prefix blocks written this step see them); (2) attend, with no
padded copy of anyone's context:

- **Decodes and chunks** up to ``max_kernel_query_len`` tokens: one call of the C++
  kernel (``csrc/paged_attention.cpp``) for all their tokens. Each query token walks its
  own context block by block through the block table, reading K and V where they lie
  (flash-decoding: contexts are split into chunks that spread over the threads, merged by
  log-sum-exp). A sliding-window layer starts at the window's first key. Without AMX
  every token goes this way: on AVX512-BF16 the kernel measured 1.2-2.4x faster than
  torch's CPU SDPA even for 512-2048-token prefill chunks (bf16 pair dot products).
- **Longer prefill chunks** (CPUs with AMX, whose SDPA runs on AMX tiles): per request,
  ``scaled_dot_product_attention`` over key tiles taken without copying when they can be:
  a chunk with no cached context attends to this step's own ``key``/``value`` rows
  (causal, ``is_causal``: no mask); cached context comes from a view of the cache when its
  blocks are consecutive, else from a gather of exactly its blocks (not padded to other
  requests). Under a sliding window the queries are cut into tiles of about one window,
  each reading only the keys its window reaches.

Masks (per request and window) are built once per forward and shared by the layers. GQA
without copying K/V: SDPA sees queries ``[Hkv, G, Tq, D]`` and K/V ``[Hkv, 1, L, D]``
expanded (stride 0) over the ``G = H / Hkv`` query heads that share a KV head.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from pagedserve import platform
from pagedserve.attention.cpu_kernels import PagedAttentionKernel
from pagedserve.attention.metadata import CommonAttentionMetadata
from pagedserve.attention.torch_backend import softcap_attention, write_kv_cache

# With AMX, chunks longer than this go through SDPA (AMX matmul tiles); without, through
# the kernel too.
_AMX_MAX_KERNEL_QUERY_LEN = 16
# Under a sliding window, prefill queries are tiled by max(window, this) tokens.
_MIN_WINDOW_TILE = 256


@dataclass
class _Tile:
    """Queries of one prefill chunk attending to one run of keys."""

    query_rows: slice  # rows of the flat batch
    # Keys: rows of this step's key/value input, or cache blocks (a consecutive run is a
    # view; scattered blocks are gathered by block_index).
    input_rows: slice | None
    first_block: int
    num_blocks: int
    block_index: torch.Tensor | None
    mask: torch.Tensor | None  # [Tq, L] bool (True = attend); None: causal square


@dataclass
class _PrefillChunk:
    req_index: int
    token_start: int
    query_len: int
    num_computed: int


@dataclass
class CPUAttentionMetadata:
    """Per-forward metadata of the CPU backend (built once, shared by all layers)."""

    common: CommonAttentionMetadata
    # Kernel items: query row, block-table row and context length (position + 1) per token.
    token_idx: torch.Tensor | None
    req_row: torch.Tensor | None
    ctx_len: torch.Tensor | None
    prefills: list[_PrefillChunk]
    block_table_np: np.ndarray
    tiles: dict[int | None, list[_Tile]] = field(default_factory=dict)

    def prefill_tiles(self, sliding_window: int | None) -> list[_Tile]:
        tiles = self.tiles.get(sliding_window)
        if tiles is None:
            tiles = [
                tile for chunk in self.prefills for tile in _chunk_tiles(self, chunk, sliding_window)
            ]
            self.tiles[sliding_window] = tiles
        return tiles


def _chunk_tiles(
    metadata: CPUAttentionMetadata, chunk: _PrefillChunk, window: int | None
) -> list[_Tile]:
    block_size = metadata.common.block_size
    device = metadata.common.block_table.device
    computed, query_len = chunk.num_computed, chunk.query_len
    tile_len = query_len if window is None else max(window, _MIN_WINDOW_TILE)
    tiles = []
    for start in range(0, query_len, tile_len):
        end = min(query_len, start + tile_len)
        first_q = computed + start
        first_k = 0 if window is None else max(0, first_q - window + 1)
        query_rows = slice(chunk.token_start + start, chunk.token_start + end)
        input_rows, first_block, num_blocks, block_index = None, 0, 0, None
        if first_k >= computed:  # all keys are this step's own rows
            input_rows = slice(chunk.token_start + first_k - computed, chunk.token_start + end)
            key_pos = np.arange(first_k, computed + end)
        else:
            blocks = metadata.block_table_np[
                chunk.req_index, first_k // block_size : (computed + end - 1) // block_size + 1
            ]
            num_blocks = len(blocks)
            if num_blocks > 1 and not (np.diff(blocks) == 1).all():
                block_index = torch.from_numpy(blocks.astype(np.int64)).to(device)
            first_block = int(blocks[0])
            first_key_pos = first_k // block_size * block_size
            key_pos = np.arange(first_key_pos, first_key_pos + num_blocks * block_size)
        query_pos = np.arange(first_q, computed + end)
        mask = None
        square = input_rows is not None and first_k == first_q
        if not square or (window is not None and end - start > window):
            diff = query_pos[:, None] - key_pos[None, :]
            allowed = diff >= 0
            if window is not None:
                allowed &= diff < window
            mask = torch.from_numpy(allowed).to(device)
        tiles.append(_Tile(query_rows, input_rows, first_block, num_blocks, block_index, mask))
    return tiles


def default_max_kernel_query_len() -> int:
    """Longest chunk the kernel takes on this CPU (longer ones: SDPA)."""
    return _AMX_MAX_KERNEL_QUERY_LEN if "amx_bf16" in platform.cpu_flags() else sys.maxsize


def build_metadata(
    common: CommonAttentionMetadata, max_kernel_query_len: int
) -> CPUAttentionMetadata:
    """Kernel items for decodes and chunks up to ``max_kernel_query_len`` tokens, the
    longer prefill chunks for SDPA."""
    num_reqs = common.num_reqs
    query_start = np.asarray(common.query_start_loc_np[: num_reqs + 1], dtype=np.int64)
    query_lens = np.diff(query_start)
    seq_lens = np.asarray(common.seq_lens_np[:num_reqs], dtype=np.int64)
    assert (query_lens >= 1).all(), "every scheduled request computes at least one token"
    assert (seq_lens >= query_lens).all(), "seq_lens includes the scheduled tokens"
    device = common.block_table.device

    in_kernel = query_lens <= max_kernel_query_len
    token_idx = req_row = ctx_len = None
    if in_kernel.all() and (query_lens == 1).all():  # decode-only step
        token_idx_np, req_row_np, ctx_len_np = query_start[:-1], np.arange(num_reqs), seq_lens
    else:
        kernel_reqs = np.flatnonzero(in_kernel)
        lens = query_lens[kernel_reqs]
        req_row_np = np.repeat(kernel_reqs, lens)
        offsets = np.arange(int(lens.sum())) - np.repeat(np.cumsum(lens) - lens, lens)
        token_idx_np = query_start[req_row_np] + offsets
        ctx_len_np = (seq_lens - query_lens)[req_row_np] + offsets + 1
    if len(token_idx_np):
        token_idx, req_row, ctx_len = (
            torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64)).to(device)
            for a in (token_idx_np, req_row_np, ctx_len_np)
        )
    prefills = [
        _PrefillChunk(int(i), int(query_start[i]), int(query_lens[i]), int(seq_lens[i] - query_lens[i]))
        for i in np.flatnonzero(~in_kernel)
    ]
    return CPUAttentionMetadata(
        common=common,
        token_idx=token_idx,
        req_row=req_row,
        ctx_len=ctx_len,
        prefills=prefills,
        block_table_np=common.block_table.cpu().numpy(),
    )


def _attend(
    query: torch.Tensor,  # [Hkv, G, Tq, D]
    key: torch.Tensor,  # [Hkv, G, L, D] (expanded over G)
    value: torch.Tensor,
    mask: torch.Tensor | None,  # [Tq, L]
    scale: float,
    logit_softcap: float | None,
) -> torch.Tensor:
    if logit_softcap is None:
        return F.scaled_dot_product_attention(
            query, key, value, attn_mask=mask, is_causal=mask is None, scale=scale
        )
    if mask is None:  # causal square
        length = key.shape[2]
        mask = torch.ones(length, length, dtype=torch.bool, device=query.device).tril()
    return softcap_attention(query, key, value, mask, scale, logit_softcap)


def _tile_keys(
    tile: _Tile, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``[L, Hkv, D]`` keys and values of a tile: input rows, a cache view or a gather."""
    if tile.input_rows is not None:
        return key[tile.input_rows], value[tile.input_rows]
    _, _, block_size, num_kv_heads, head_dim = kv_cache.shape
    shape = (tile.num_blocks * block_size, num_kv_heads, head_dim)
    if tile.block_index is None:
        blocks = kv_cache[:, tile.first_block : tile.first_block + tile.num_blocks]
        return blocks[0].view(shape), blocks[1].view(shape)
    return (
        kv_cache[0].index_select(0, tile.block_index).view(shape),
        kv_cache[1].index_select(0, tile.block_index).view(shape),
    )


def forward(
    kernel: PagedAttentionKernel,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    kv_cache: torch.Tensor,
    attn_metadata: CPUAttentionMetadata,
    sliding_window: int | None,
    scale: float,
    logit_softcap: float | None = None,
) -> torch.Tensor:
    """Paged attention for one layer: ``query [T, H, D]``, ``key/value [T, Hkv, D]``."""
    common = attn_metadata.common
    num_tokens, num_heads, head_dim = query.shape
    num_kv_heads = key.shape[1]
    group_size = num_heads // num_kv_heads
    num_actual = common.num_actual_tokens
    write_kv_cache(
        key[:num_actual], value[:num_actual], kv_cache, common.slot_mapping[:num_actual]
    )
    output = query.new_empty(num_tokens, num_heads, head_dim)
    if num_actual < num_tokens:
        output[num_actual:] = 0
    if attn_metadata.token_idx is not None:
        if query.stride(2) != 1 or query.stride(1) != head_dim:
            query = query.contiguous()
        kernel(
            query, output, kv_cache, common.block_table, attn_metadata.token_idx,
            attn_metadata.req_row, attn_metadata.ctx_len, scale, logit_softcap, sliding_window,
        )  # fmt: skip
    for tile in attn_metadata.prefill_tiles(sliding_window):
        k, v = _tile_keys(tile, key, value, kv_cache)
        q = query[tile.query_rows]
        tq, length = q.shape[0], k.shape[0]
        q = q.transpose(0, 1).view(num_kv_heads, group_size, tq, head_dim)
        expanded = (num_kv_heads, group_size, length, head_dim)
        k = k.transpose(0, 1)[:, None].expand(expanded)
        v = v.transpose(0, 1)[:, None].expand(expanded)
        out = _attend(q, k, v, tile.mask, scale, logit_softcap)  # [Hkv, G, Tq, D]
        output[tile.query_rows].view(tq, num_kv_heads, group_size, head_dim).copy_(
            out.permute(2, 0, 1, 3)
        )
    return output


class CPUAttentionBackend:
    """Reads the paged cache in place (C++ kernel + SDPA); the torch backend's layout
    ``[2, num_blocks, block_size, num_kv_heads, head_dim]``."""

    name = "cpu"

    def __init__(
        self, kernel: PagedAttentionKernel, max_kernel_query_len: int | None = None
    ) -> None:
        self.kernel = kernel
        self.max_kernel_query_len = (
            default_max_kernel_query_len() if max_kernel_query_len is None else max_kernel_query_len
        )

    @staticmethod
    def get_kv_cache_shape(
        num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int
    ) -> tuple[int, ...]:
        return (2, num_blocks, block_size, num_kv_heads, head_dim)

    def build_metadata(self, common: CommonAttentionMetadata) -> CPUAttentionMetadata:
        return build_metadata(common, self.max_kernel_query_len)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata: CPUAttentionMetadata,
        sliding_window: int | None,
        scale: float,
        logit_softcap: float | None = None,
    ) -> torch.Tensor:
        return forward(
            self.kernel, query, key, value, kv_cache, attn_metadata, sliding_window, scale,
            logit_softcap,
        )  # fmt: skip
