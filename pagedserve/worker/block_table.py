"""Persistent block table rows and the slot mapping of a flattened batch."""

from __future__ import annotations

import numpy as np


class BlockTable:
    """One row of block ids per live request, kept on the host across steps.

    Rows are rebuilt for a request that (re)enters the batch (the scheduler hands its
    full block list) and only appended to afterwards (the scheduler hands the blocks
    allocated since the previous step).
    """

    def __init__(self, max_num_reqs: int, max_num_blocks_per_req: int, block_size: int) -> None:
        assert block_size > 0 and block_size & (block_size - 1) == 0
        self.max_num_reqs = max_num_reqs
        self.max_num_blocks_per_req = max_num_blocks_per_req
        self.block_size = block_size
        self._block_shift = block_size.bit_length() - 1
        self.block_table_np = np.zeros((max_num_reqs, max_num_blocks_per_req), dtype=np.int32)
        self.num_blocks_np = np.zeros(max_num_reqs, dtype=np.int32)

    def _check_len(self, num_blocks: int) -> None:
        if num_blocks > self.max_num_blocks_per_req:
            raise ValueError(
                f"a request holds {num_blocks} blocks, more than the "
                f"{self.max_num_blocks_per_req} that max_model_len allows"
            )

    def set_row(self, row: int, block_ids: list[int]) -> None:
        """Rebuild ``row`` from a request's full block list."""
        num_blocks = len(block_ids)
        self._check_len(num_blocks)
        old = int(self.num_blocks_np[row])
        if num_blocks:
            self.block_table_np[row, :num_blocks] = block_ids
        if old > num_blocks:
            self.block_table_np[row, num_blocks:old] = 0
        self.num_blocks_np[row] = num_blocks

    def append_row(self, row: int, new_block_ids: list[int]) -> None:
        """Append the blocks a running request got this step to ``row``."""
        old = int(self.num_blocks_np[row])
        num_blocks = old + len(new_block_ids)
        self._check_len(num_blocks)
        self.block_table_np[row, old:num_blocks] = new_block_ids
        self.num_blocks_np[row] = num_blocks

    def clear_row(self, row: int) -> None:
        old = int(self.num_blocks_np[row])
        self.block_table_np[row, :old] = 0
        self.num_blocks_np[row] = 0

    def gather(self, rows: np.ndarray, num_cols: int) -> np.ndarray:
        """The batch's block table: ``rows`` in batch order, first ``num_cols`` columns."""
        return self.block_table_np[rows, :num_cols]

    def compute_slot_mapping(
        self,
        batch_block_table: np.ndarray,
        token_req_indices: np.ndarray,
        positions: np.ndarray,
        out: np.ndarray,
    ) -> None:
        """``out[t] = block_table[req(t), pos(t) // block_size] * block_size + pos(t) % block_size``."""
        num_cols = batch_block_table.shape[1]
        flat_index = token_req_indices * num_cols + (positions >> self._block_shift)
        block_numbers = batch_block_table.ravel()[flat_index]
        np.multiply(block_numbers, self.block_size, out=out, casting="unsafe")
        out += positions & (self.block_size - 1)
