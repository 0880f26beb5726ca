"""Hand-built paged-attention inputs for model and backend tests.

``make_common_metadata`` builds a :class:`CommonAttentionMetadata` from per-request query
lengths, context lengths and block tables. ``PagedSequenceRunner`` drives a model step by
step over several sequences with its own block allocation (shuffled block ids, so blocks
are not contiguous) and a real paged KV cache, returning every token's logits.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from pagedserve import platform
from pagedserve.attention.backend import get_attn_backend
from pagedserve.attention.metadata import CommonAttentionMetadata
from pagedserve.forward_context import ForwardContext, set_forward_context


def make_common_metadata(
    query_lens: Sequence[int],
    seq_lens: Sequence[int],
    block_tables: Sequence[Sequence[int]],
    block_size: int,
    device: torch.device | str | None = None,
) -> CommonAttentionMetadata:
    """Metadata for requests whose ``query_lens[i]`` new tokens end at ``seq_lens[i]``."""
    device = device if device is not None else platform.device()
    num_reqs = len(query_lens)
    assert len(seq_lens) == num_reqs == len(block_tables)
    query_start_np = np.zeros(num_reqs + 1, dtype=np.int32)
    query_start_np[1:] = np.cumsum(query_lens)
    seq_lens_np = np.asarray(seq_lens, dtype=np.int32)
    num_computed_np = seq_lens_np - np.asarray(query_lens, dtype=np.int32)
    width = max(1, max(len(row) for row in block_tables))
    table_np = np.zeros((num_reqs, width), dtype=np.int32)
    for i, row in enumerate(block_tables):
        table_np[i, : len(row)] = row
    slots = []
    for i in range(num_reqs):
        positions = np.arange(num_computed_np[i], seq_lens_np[i])
        slots.append(table_np[i, positions // block_size] * block_size + positions % block_size)
    slot_mapping = np.concatenate(slots).astype(np.int64) if slots else np.zeros(0, np.int64)
    return CommonAttentionMetadata(
        query_start_loc=torch.from_numpy(query_start_np).to(device),
        query_start_loc_np=query_start_np,
        seq_lens=torch.from_numpy(seq_lens_np).to(device),
        seq_lens_np=seq_lens_np,
        num_computed_tokens_np=num_computed_np,
        block_table=torch.from_numpy(table_np).to(device),
        slot_mapping=torch.from_numpy(slot_mapping).to(device),
        num_reqs=num_reqs,
        num_actual_tokens=int(query_start_np[-1]),
        max_query_len=int(max(query_lens)),
        max_seq_len=int(seq_lens_np.max()),
        block_size=block_size,
    )


def make_kv_caches(
    num_layers: int,
    num_blocks: int,
    block_size: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> list[torch.Tensor]:
    """Per-layer caches in the attention backend's layout (``[2, num_blocks, block_size,
    Hkv, D]`` for the torch backend) filled with large finite garbage, so attending to a
    slot that was never written changes the result visibly (masked slots contribute
    exactly 0, as with a real, reused cache)."""
    device = device if device is not None else platform.device()
    generator = torch.Generator().manual_seed(1234)
    shape = get_attn_backend().get_kv_cache_shape(num_blocks, block_size, num_kv_heads, head_dim)
    return [
        (torch.randn(shape, generator=generator) * 50).to(dtype=dtype, device=device)
        for _ in range(num_layers)
    ]


@dataclass
class _Sequence:
    token_ids: list[int]
    num_computed: int = 0
    blocks: list[int] = field(default_factory=list)


class PagedSequenceRunner:
    """Runs a model over several sequences in flattened, paged steps (test driver)."""

    def __init__(
        self,
        model: torch.nn.Module,
        hf_config: object,
        block_size: int = 4,
        num_blocks: int = 128,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        seed: int = 0,
    ) -> None:
        self.model = model
        self.block_size = block_size
        self.device = torch.device(device) if device is not None else platform.device()
        num_heads = hf_config.num_attention_heads
        num_kv_heads = getattr(hf_config, "num_key_value_heads", None) or num_heads
        head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // num_heads
        self.kv_caches = make_kv_caches(
            hf_config.num_hidden_layers, num_blocks, block_size, num_kv_heads, head_dim, dtype, device
        )
        free = list(range(1, num_blocks))  # block 0 is the null block
        random.Random(seed).shuffle(free)
        self.free_blocks = free
        self.sequences: dict[str, _Sequence] = {}

    def add(self, seq_id: str, token_ids: Sequence[int]) -> None:
        self.sequences[seq_id] = _Sequence(list(token_ids))

    def append(self, seq_id: str, token_id: int) -> None:
        self.sequences[seq_id].token_ids.append(int(token_id))

    def step(self, schedule: Sequence[tuple[str, int]]) -> dict[str, torch.Tensor]:
        """Compute ``n`` new tokens of each ``(seq_id, n)``; returns their float32 logits (CPU)."""
        input_ids, positions, query_lens, seq_lens, tables = [], [], [], [], []
        for seq_id, n in schedule:
            seq = self.sequences[seq_id]
            start, end = seq.num_computed, seq.num_computed + n
            assert n >= 1 and end <= len(seq.token_ids), (seq_id, start, end)
            while len(seq.blocks) * self.block_size < end:
                seq.blocks.append(self.free_blocks.pop())
            input_ids.extend(seq.token_ids[start:end])
            positions.extend(range(start, end))
            query_lens.append(n)
            seq_lens.append(end)
            tables.append(seq.blocks)
        common = make_common_metadata(query_lens, seq_lens, tables, self.block_size, self.device)
        ids = torch.tensor(input_ids, dtype=torch.long, device=self.device)
        pos = torch.tensor(positions, dtype=torch.long, device=self.device)
        with torch.inference_mode(), set_forward_context(ForwardContext(common, self.kv_caches)):
            hidden = self.model(ids, pos)
        logits = self.model.compute_logits(hidden).float().cpu()
        out: dict[str, torch.Tensor] = {}
        offset = 0
        for seq_id, n in schedule:
            out[seq_id] = logits[offset : offset + n]
            offset += n
            self.sequences[seq_id].num_computed += n
        return out
