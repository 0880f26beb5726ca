"""Attention metadata shared by every backend for one flattened forward pass."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class CommonAttentionMetadata:
    """Describes the flattened batch of one step.

    Tokens of request ``i`` occupy ``[query_start_loc[i], query_start_loc[i+1])`` of
    the flattened batch. ``seq_lens[i]`` is the context length after this step
    (``num_computed_tokens + num_scheduled_tokens``); query token ``j`` of request
    ``i`` sits at position ``seq_lens[i] - query_len_i + j``.
    ``slot_mapping[t]`` is the KV-cache slot (``block * block_size + offset``) where
    token ``t``'s K and V are written. Rows of ``block_table`` are padded with 0 (the
    null block).
    """

    query_start_loc: torch.Tensor  # [num_reqs + 1] int32, on device
    query_start_loc_np: np.ndarray  # same, host copy
    seq_lens: torch.Tensor  # [num_reqs] int32, on device
    seq_lens_np: np.ndarray
    num_computed_tokens_np: np.ndarray  # [num_reqs] context before this step
    block_table: torch.Tensor  # [num_reqs, max_num_blocks] int32, on device
    slot_mapping: torch.Tensor  # [num_actual_tokens] int64, on device
    num_reqs: int
    num_actual_tokens: int
    max_query_len: int
    max_seq_len: int
    block_size: int
