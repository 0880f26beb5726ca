"""Reference attention backend in plain torch: works on any device.

Per layer: (1) write every token's K/V of the step into the paged cache with one
``index_copy_`` on the flattened ``[num_blocks * block_size, Hkv, D]`` view (all
writes happen before any read, so requests that share prefix blocks written in the same
step see them); (2) attend. Requests are grouped so that a step costs few SDPA calls:
decode requests (query length 1) are batched into padded groups of similar context
length, prefill chunks likewise when padding is cheap. Each group gathers whole KV blocks by block table (only the
blocks a sliding window can reach), and applies causal + sliding-window masks built
once per forward (per window size) and cached in :class:`TorchAttentionMetadata`.

GQA without copying K/V: the ``G = H / Hkv`` query heads that share a KV head are
folded into the query-length dimension, so SDPA sees ``Hkv`` heads of ``G * Tq`` queries.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from pagedserve.attention.metadata import CommonAttentionMetadata

logger = logging.getLogger(__name__)

# Batch requests together while padded score work stays within this factor of the real
# work (plus a small absolute slack so many short requests share one call), and while a
# group's gathered context (batch x padded context, in tokens) stays under a bound that
# caps the K/V gather workspace.
_PAD_WASTE_FACTOR = 1.5
_PAD_SLACK = 16384
_MAX_GATHER_TOKENS = 1 << 16


@dataclass
class _KeyView:
    """The context a group attends to under one window size."""

    block_index: torch.Tensor  # [B * num_blocks] int64 cache block ids (0 = padding)
    num_blocks: int
    mask: torch.Tensor  # [B, Tq, L] bool, True = attend
    fold_masks: dict[int, torch.Tensor] = field(default_factory=dict)

    def fold_mask(self, group_size: int) -> torch.Tensor:
        """The mask for queries folded as ``[B, Hkv, G * Tq, L]`` (broadcast over Hkv)."""
        mask = self.fold_masks.get(group_size)
        if mask is None:
            b, tq, length = self.mask.shape
            if tq == 1:
                mask = self.mask[:, None, :, :]  # broadcasts over the G folded queries
            else:
                mask = (
                    self.mask[:, None, None, :, :]
                    .expand(b, 1, group_size, tq, length)
                    .reshape(b, 1, group_size * tq, length)
                )
            self.fold_masks[group_size] = mask
        return mask


@dataclass
class _Group:
    """Requests attended together in one padded SDPA call."""

    req_indices: np.ndarray  # [B] request indices in the batch
    query_len: int  # padded query length Tq
    # Query rows: a contiguous slice of the flat batch, or an index per padded row.
    token_slice: slice | None
    token_index: torch.Tensor | None  # [B * Tq] int64
    # Where the valid rows go: None = all rows valid (then token_slice/token_index).
    valid_rows: torch.Tensor | None  # [B * Tq] bool
    dest_index: torch.Tensor | None  # [num_valid] int64 token indices
    query_pos_np: np.ndarray  # [B, Tq] positions of the (padded) query rows
    seq_lens_np: np.ndarray  # [B]
    views: dict[int | None, _KeyView] = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return len(self.req_indices)


@dataclass
class TorchAttentionMetadata:
    """Per-forward metadata of the torch backend (built once, shared by all layers)."""

    common: CommonAttentionMetadata
    groups: list[_Group]
    # True when a single group covers all tokens in batch order (output needs no scatter).
    single_identity_group: bool

    def key_view(self, group: _Group, sliding_window: int | None) -> _KeyView:
        view = group.views.get(sliding_window)
        if view is None:
            view = _build_key_view(self.common, group, sliding_window)
            group.views[sliding_window] = view
        return view


def _build_key_view(
    common: CommonAttentionMetadata, group: _Group, sliding_window: int | None
) -> _KeyView:
    block_size = common.block_size
    device = common.block_table.device
    seq_lens = group.seq_lens_np.astype(np.int64)
    first_pos = group.query_pos_np[:, 0].astype(np.int64)
    if sliding_window is None:
        start_block = np.zeros_like(seq_lens)
    else:
        # Query at position p sees keys k with p - k < window (transformers' semantics).
        start_block = np.maximum(first_pos - sliding_window + 1, 0) // block_size
    last_block = (seq_lens - 1) // block_size
    num_blocks = int((last_block - start_block + 1).max())
    cols = start_block[:, None] + np.arange(num_blocks, dtype=np.int64)[None, :]  # [B, nblk]
    max_col = common.block_table.shape[1] - 1
    cols_dev = torch.from_numpy(np.minimum(cols, max_col)).to(device)
    rows_dev = torch.from_numpy(group.req_indices.astype(np.int64)).to(device)
    block_index = common.block_table[rows_dev[:, None], cols_dev].reshape(-1).long()

    key_pos = (cols[:, :, None] * block_size + np.arange(block_size)[None, None, :]).reshape(
        len(seq_lens), num_blocks * block_size
    )
    query_pos = group.query_pos_np.astype(np.int64)
    diff = query_pos[:, :, None] - key_pos[:, None, :]  # [B, Tq, L]
    mask = diff >= 0
    if sliding_window is not None:
        mask &= diff < sliding_window
    return _KeyView(
        block_index=block_index,
        num_blocks=num_blocks,
        mask=torch.from_numpy(mask).to(device),
    )


def _make_group(
    common: CommonAttentionMetadata,
    req_indices: np.ndarray,
    query_start_np: np.ndarray,
    query_lens_np: np.ndarray,
    seq_lens_np: np.ndarray,
) -> _Group:
    device = common.block_table.device
    q_lens = query_lens_np[req_indices]
    q_starts = query_start_np[req_indices]
    s_lens = seq_lens_np[req_indices]
    tq = int(q_lens.max())
    offsets = np.arange(tq, dtype=np.int64)[None, :]
    # Padded rows repeat the request's last query (valid values, discarded afterwards).
    clipped = np.minimum(offsets, q_lens[:, None] - 1)
    token_index_np = q_starts[:, None] + clipped  # [B, Tq]
    query_pos = (s_lens - q_lens)[:, None] + clipped
    all_valid = bool((q_lens == tq).all())
    token_slice = None
    token_index = None
    flat = token_index_np.reshape(-1)
    if all_valid and bool((np.diff(flat) == 1).all()):
        token_slice = slice(int(flat[0]), int(flat[-1]) + 1)
    else:
        token_index = torch.from_numpy(flat.copy()).to(device)
    valid_rows = None
    dest_index = None
    if not all_valid:
        valid_np = (offsets < q_lens[:, None]).reshape(-1)
        valid_rows = torch.from_numpy(valid_np).to(device)
        dest_index = torch.from_numpy(flat[valid_np].copy()).to(device)
    return _Group(
        req_indices=req_indices,
        query_len=tq,
        token_slice=token_slice,
        token_index=token_index,
        valid_rows=valid_rows,
        dest_index=dest_index,
        query_pos_np=query_pos,
        seq_lens_np=s_lens,
    )


def _group_requests(
    req_indices: np.ndarray, q_lens: np.ndarray, s_lens: np.ndarray
) -> list[np.ndarray]:
    """Greedy batching of requests (sorted by context length) while padding stays cheap
    and the gathered context of a group stays bounded."""
    order = req_indices[np.argsort(s_lens[req_indices], kind="stable")]
    groups: list[list[int]] = []
    current: list[int] = []
    actual = 0
    max_q = max_s = 0
    for r in order.tolist():
        q, s = int(q_lens[r]), int(s_lens[r])
        if current:
            new_actual = actual + q * s
            new_q, new_s = max(max_q, q), max(max_s, s)
            padded = (len(current) + 1) * new_q * new_s
            gathered = (len(current) + 1) * new_s
            if padded <= _PAD_WASTE_FACTOR * new_actual + _PAD_SLACK and gathered <= _MAX_GATHER_TOKENS:
                current.append(r)
                actual, max_q, max_s = new_actual, new_q, new_s
                continue
            groups.append(current)
        current, actual, max_q, max_s = [r], q * s, q, s
    if current:
        groups.append(current)
    return [np.asarray(g, dtype=np.int64) for g in groups]


def build_metadata(common: CommonAttentionMetadata) -> TorchAttentionMetadata:
    """Group the step's requests and precompute their query indices (once per forward)."""
    num_reqs = common.num_reqs
    query_start_np = np.asarray(common.query_start_loc_np[: num_reqs + 1], dtype=np.int64)
    query_lens = np.diff(query_start_np)
    seq_lens = np.asarray(common.seq_lens_np[:num_reqs], dtype=np.int64)
    assert (query_lens >= 1).all(), "every scheduled request computes at least one token"
    assert (seq_lens >= query_lens).all(), "seq_lens includes the scheduled tokens"

    all_reqs = np.arange(num_reqs, dtype=np.int64)
    decode_reqs = all_reqs[query_lens == 1]
    prefill_reqs = all_reqs[query_lens > 1]
    # Decodes and prefill chunks are grouped apart: a decode group needs no query padding.
    index_groups: list[np.ndarray] = []
    if len(decode_reqs):
        index_groups.extend(_group_requests(decode_reqs, query_lens, seq_lens))
    if len(prefill_reqs):
        index_groups.extend(_group_requests(prefill_reqs, query_lens, seq_lens))
    groups = [_make_group(common, g, query_start_np, query_lens, seq_lens) for g in index_groups]
    single_identity = (
        len(groups) == 1
        and groups[0].token_slice is not None
        and groups[0].token_slice.start == 0
        and groups[0].token_slice.stop == common.num_actual_tokens
    )
    return TorchAttentionMetadata(common=common, groups=groups, single_identity_group=single_identity)


class _Workspace(threading.local):
    """Grow-only scratch buffers for gathered K/V, reused across layers and steps.

    A fresh multi-MiB tensor per gather costs page faults (on CPU about 3x the copy
    itself); layers run one after another, so one K and one V buffer suffice (per thread:
    two engines in one process must not share them).
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, torch.device, torch.dtype], torch.Tensor] = {}

    def get(self, slot: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        numel = 1
        for size in shape:
            numel *= size
        key = (slot, like.device, like.dtype)
        buffer = self._buffers.get(key)
        if buffer is None or buffer.numel() < numel:
            # A normal tensor (not an inference tensor), so it can be written both inside
            # and outside torch.inference_mode().
            with torch.inference_mode(False):
                buffer = torch.empty(numel, dtype=like.dtype, device=like.device)
            self._buffers[key] = buffer
        return buffer[:numel].view(shape)


_WORKSPACE = _Workspace()


def _gather_blocks(
    blocks: torch.Tensor, block_index: torch.Tensor, slot: str
) -> torch.Tensor:
    out = _WORKSPACE.get(slot, (block_index.numel(), blocks.shape[1]), blocks)
    return torch.index_select(blocks, 0, block_index, out=out)


def write_kv_cache(
    key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Store ``key``/``value`` ``[N, Hkv, D]`` at ``slot_mapping [N]`` of ``kv_cache``."""
    _, num_blocks, block_size, num_kv_heads, head_dim = kv_cache.shape
    num_slots = num_blocks * block_size
    kv_cache[0].view(num_slots, num_kv_heads, head_dim).index_copy_(0, slot_mapping, key)
    kv_cache[1].view(num_slots, num_kv_heads, head_dim).index_copy_(0, slot_mapping, value)


def _attend(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor,
    scale: float,
    logit_softcap: float | None,
) -> torch.Tensor:
    if logit_softcap is None:
        return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale)
    return softcap_attention(query, key, value, mask, scale, logit_softcap)


def softcap_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor,
    scale: float,
    logit_softcap: float,
) -> torch.Tensor:
    """Attention with tanh-capped scores (Gemma 2 style), which SDPA cannot do; ``mask``
    is bool (True = attend), broadcasting over the scores."""
    scores = torch.matmul(query, key.transpose(-1, -2)) * scale
    scores = torch.tanh(scores / logit_softcap) * logit_softcap
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).to(query.dtype)
    return torch.matmul(probs, value)


def forward(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    kv_cache: torch.Tensor,
    attn_metadata: TorchAttentionMetadata,
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

    _, num_cache_blocks, block_size, _, _ = kv_cache.shape
    k_blocks = kv_cache[0].view(num_cache_blocks, block_size * num_kv_heads * head_dim)
    v_blocks = kv_cache[1].view(num_cache_blocks, block_size * num_kv_heads * head_dim)

    output: torch.Tensor | None = None
    if not attn_metadata.single_identity_group:
        if num_actual < num_tokens:
            output = query.new_zeros(num_tokens, num_heads, head_dim)
        else:
            output = torch.empty_like(query)
    for group in attn_metadata.groups:
        view = attn_metadata.key_view(group, sliding_window)
        batch, tq = group.batch_size, group.query_len
        if group.token_slice is not None:
            q = query[group.token_slice]
        else:
            q = query.index_select(0, group.token_index)
        # [B*Tq, H, D] -> [B, Hkv, G*Tq, D]: heads sharing a KV head become extra queries.
        q = q.reshape(batch, tq, num_kv_heads, group_size, head_dim)
        q = q.permute(0, 2, 3, 1, 4).reshape(batch, num_kv_heads, group_size * tq, head_dim)
        context_len = view.num_blocks * block_size
        k = _gather_blocks(k_blocks, view.block_index, "k")
        k = k.view(batch, context_len, num_kv_heads, head_dim).transpose(1, 2)
        v = _gather_blocks(v_blocks, view.block_index, "v")
        v = v.view(batch, context_len, num_kv_heads, head_dim).transpose(1, 2)
        out = _attend(q, k, v, view.fold_mask(group_size), scale, logit_softcap)
        out = out.view(batch, num_kv_heads, group_size, tq, head_dim)
        out = out.permute(0, 3, 1, 2, 4).reshape(batch * tq, num_heads, head_dim)
        if output is None:  # one group, all tokens in order
            if num_actual < num_tokens:
                output = query.new_zeros(num_tokens, num_heads, head_dim)
                output[:num_actual] = out
                return output
            return out
        if group.valid_rows is not None:
            output.index_copy_(0, group.dest_index, out[group.valid_rows])
        elif group.token_slice is not None:
            output[group.token_slice] = out
        else:
            output.index_copy_(0, group.token_index, out)
    assert output is not None
    return output


class TorchAttentionBackend:
    """Torch reference backend (any device); the default layout
    ``[2, num_blocks, block_size, num_kv_heads, head_dim]``."""

    name = "torch"

    @staticmethod
    def get_kv_cache_shape(
        num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int
    ) -> tuple[int, ...]:
        return (2, num_blocks, block_size, num_kv_heads, head_dim)

    def build_metadata(self, common: CommonAttentionMetadata) -> TorchAttentionMetadata:
        return build_metadata(common)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata: TorchAttentionMetadata,
        sliding_window: int | None,
        scale: float,
        logit_softcap: float | None = None,
    ) -> torch.Tensor:
        return forward(
            query, key, value, kv_cache, attn_metadata, sliding_window, scale, logit_softcap
        )
