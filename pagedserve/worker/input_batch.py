"""The persistent input batch: per-request rows and the flattening of one step.

Each live request owns a row (block table row and sampling parameters) from the
step it enters the batch until it finishes or is preempted; rows are reused.
``prepare_inputs`` turns a ``SchedulerOutput`` into the flat tensors of one forward
pass (design.md, "Flattening a batch") with vectorized numpy into persistent
buffers; the only Python loop is over the batch's requests, to slice token ids.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from pagedserve.attention.metadata import CommonAttentionMetadata
from pagedserve.core.request import Request
from pagedserve.core.sched_output import SchedulerOutput
from pagedserve.layers.sampler import SamplingMetadata
from pagedserve.worker.block_table import BlockTable
from pagedserve.worker.sampling_metadata import RowSamplingParams

logger = logging.getLogger(__name__)


class _StagingBuffer:
    """A persistent 1-D host buffer (numpy view) with its device twin.

    On CPU the device tensor *is* the host buffer, so "copying to the device" is a
    slice; elsewhere the used prefix is copied from pinned memory.
    """

    def __init__(self, size: int, dtype: torch.dtype, device: torch.device) -> None:
        on_cpu = device.type == "cpu"
        self.cpu = torch.zeros(size, dtype=dtype, pin_memory=not on_cpu and torch.cuda.is_available())
        self.np = self.cpu.numpy()
        self.dev = self.cpu if on_cpu else torch.zeros(size, dtype=dtype, device=device)

    def to_device(self, n: int) -> torch.Tensor:
        if self.dev is self.cpu:
            return self.cpu[:n]
        return self.dev[:n].copy_(self.cpu[:n], non_blocking=True)


@dataclass
class CachedRequestState:
    """Runner state of a request that survives preemption; dropped when it finishes."""

    generator: torch.Generator | None = None
    # Index of the next prompt token whose prompt logprobs are due (token 0 has none).
    next_prompt_logprob_index: int = 1


@dataclass
class StepInputs:
    """The flattened batch of one step and what the sampler needs to find its rows."""

    input_ids: torch.Tensor  # [T] int64, device
    positions: torch.Tensor  # [T] int64, device
    attn_metadata: CommonAttentionMetadata
    requests: list[Request]  # batch order
    rows: np.ndarray  # [num_reqs] row of each request
    num_scheduled_np: np.ndarray  # [num_reqs]
    sample_indices: np.ndarray  # [S] batch indices of requests that sample this step
    logits_indices: torch.Tensor  # [S] int64 flat index of their last scheduled token, device

    @property
    def num_reqs(self) -> int:
        return len(self.requests)


class InputBatch:
    """Rows of live requests plus the persistent buffers a step is flattened into."""

    def __init__(
        self,
        *,
        max_num_reqs: int,
        max_model_len: int,
        max_num_batched_tokens: int,
        block_size: int,
        vocab_size: int,
        device: torch.device,
        seed: int = 0,
    ) -> None:
        self.max_num_reqs = max_num_reqs
        self.max_model_len = max_model_len
        self.max_num_batched_tokens = max_num_batched_tokens
        self.block_size = block_size
        self.device = device
        max_num_blocks = -(-max_model_len // block_size)
        self.block_table = BlockTable(max_num_reqs, max_num_blocks, block_size)
        self.sampling = RowSamplingParams(max_num_reqs, vocab_size, device)
        self.req_id_to_row: dict[str, int] = {}
        self._free_rows = list(range(max_num_reqs - 1, -1, -1))
        self.request_states: dict[str, CachedRequestState] = {}
        self.default_generator = torch.Generator(device=device)
        self.default_generator.manual_seed(seed)

        self._input_ids = _StagingBuffer(max_num_batched_tokens, torch.int64, device)
        self._positions = _StagingBuffer(max_num_batched_tokens, torch.int64, device)
        self._slot_mapping = _StagingBuffer(max_num_batched_tokens, torch.int64, device)
        self._query_start_loc = _StagingBuffer(max_num_reqs + 1, torch.int32, device)
        self._seq_lens = _StagingBuffer(max_num_reqs, torch.int32, device)
        self._arange_np = np.arange(max(max_num_batched_tokens, max_num_reqs) + 1, dtype=np.int64)

    @property
    def num_reqs(self) -> int:
        """Rows in use."""
        return len(self.req_id_to_row)

    # -------------------------------------------------------------------- rows
    def _add_row(self, request: Request, block_ids: list[int]) -> int:
        if not self._free_rows:
            raise RuntimeError(
                f"input batch is full ({self.max_num_reqs} rows): the scheduler ran more "
                f"requests than max_num_seqs"
            )
        request_id = request.request_id
        row = self._free_rows.pop()
        self.req_id_to_row[request_id] = row
        self.block_table.set_row(row, block_ids)
        state = self.request_states.get(request_id)
        if state is None:
            state = CachedRequestState()
            seed = request.sampling_params.seed
            if seed is not None:
                state.generator = torch.Generator(device=self.device)
                state.generator.manual_seed(seed)
            self.request_states[request_id] = state
        self.sampling.set_row(row, request, state.generator)
        return row

    def _remove_row(self, request_id: str) -> None:
        row = self.req_id_to_row.pop(request_id, None)
        if row is None:
            return
        self.block_table.clear_row(row)
        self.sampling.clear_row(row)
        self._free_rows.append(row)

    def update_states(self, scheduler_output: SchedulerOutput) -> None:
        """Drop finished/preempted rows, (re)build rows of new requests, append new blocks."""
        for request_id in scheduler_output.finished_req_ids:
            self._remove_row(request_id)
            self.request_states.pop(request_id, None)
        for request_id in scheduler_output.preempted_req_ids:
            self._remove_row(request_id)
        new_req_ids = scheduler_output.new_req_ids
        block_ids = scheduler_output.block_ids
        req_id_to_row = self.req_id_to_row
        for request in scheduler_output.scheduled_requests:
            request_id = request.request_id
            row = req_id_to_row.get(request_id)
            if row is None or request_id in new_req_ids:
                if row is not None:
                    self._remove_row(request_id)
                self._add_row(request, block_ids[request_id])
            else:
                self.block_table.update_row(row, block_ids[request_id])

    # -------------------------------------------------------------- flattening
    def prepare_inputs(self, scheduler_output: SchedulerOutput) -> StepInputs:
        """Flatten the scheduled requests into one forward pass (call after update_states)."""
        requests = scheduler_output.scheduled_requests
        num_scheduled_tokens = scheduler_output.num_scheduled_tokens
        req_id_to_row = self.req_id_to_row
        num_reqs = len(requests)
        rows_list: list[int] = []
        computed_list: list[int] = []
        scheduled_list: list[int] = []
        total_list: list[int] = []
        token_ids: list[int] = []
        for request in requests:
            request_id = request.request_id
            num_new = num_scheduled_tokens[request_id]
            start = request.num_computed_tokens
            all_token_ids = request.all_token_ids
            if num_new == 1:
                token_ids.append(all_token_ids[start])
            else:
                token_ids.extend(all_token_ids[start : start + num_new])
            rows_list.append(req_id_to_row[request_id])
            computed_list.append(start)
            scheduled_list.append(num_new)
            total_list.append(len(all_token_ids))
        num_tokens = len(token_ids)
        if num_tokens > self.max_num_batched_tokens:
            raise ValueError(
                f"{num_tokens} scheduled tokens exceed max_num_batched_tokens="
                f"{self.max_num_batched_tokens}"
            )

        rows = np.array(rows_list, dtype=np.int64)
        num_computed = np.array(computed_list, dtype=np.int32)
        num_scheduled = np.array(scheduled_list, dtype=np.int32)
        seq_lens_np = self._seq_lens.np[:num_reqs]
        np.add(num_computed, num_scheduled, out=seq_lens_np)
        query_start_loc_np = self._query_start_loc.np[: num_reqs + 1]
        query_start_loc_np[0] = 0
        np.cumsum(num_scheduled, out=query_start_loc_np[1:])

        self._input_ids.np[:num_tokens] = token_ids
        positions_np = self._positions.np[:num_tokens]
        if num_tokens == num_reqs:  # decode-only: one token per request
            token_req_indices = self._arange_np[:num_reqs]
            positions_np[:] = num_computed
        else:
            token_req_indices = np.repeat(self._arange_np[:num_reqs], num_scheduled)
            offsets = np.repeat(num_computed - query_start_loc_np[:-1], num_scheduled)
            np.add(self._arange_np[:num_tokens], offsets, out=positions_np)

        max_seq_len = int(seq_lens_np.max()) if num_reqs else 0
        num_cols = max(1, -(-max_seq_len // self.block_size))
        if (self.block_table.num_blocks_np[rows] * self.block_size < seq_lens_np).any():
            raise RuntimeError("a scheduled request has fewer KV blocks than its tokens need")
        batch_block_table = self.block_table.gather(rows, num_cols)
        self.block_table.compute_slot_mapping(
            batch_block_table, token_req_indices, positions_np, self._slot_mapping.np[:num_tokens]
        )

        sample_indices = np.flatnonzero(seq_lens_np >= np.array(total_list, dtype=np.int32))
        logits_indices_np = query_start_loc_np[1:][sample_indices].astype(np.int64) - 1

        attn_metadata = CommonAttentionMetadata(
            query_start_loc=self._query_start_loc.to_device(num_reqs + 1),
            query_start_loc_np=query_start_loc_np,
            seq_lens=self._seq_lens.to_device(num_reqs),
            seq_lens_np=seq_lens_np,
            num_computed_tokens_np=num_computed,
            block_table=torch.from_numpy(batch_block_table).to(self.device),
            slot_mapping=self._slot_mapping.to_device(num_tokens),
            num_reqs=num_reqs,
            num_actual_tokens=num_tokens,
            max_query_len=int(num_scheduled.max()) if num_reqs else 0,
            max_seq_len=max_seq_len,
            block_size=self.block_size,
        )
        return StepInputs(
            input_ids=self._input_ids.to_device(num_tokens),
            positions=self._positions.to_device(num_tokens),
            attn_metadata=attn_metadata,
            requests=requests,
            rows=rows,
            num_scheduled_np=num_scheduled,
            sample_indices=sample_indices,
            logits_indices=torch.from_numpy(logits_indices_np).to(self.device),
        )

    def make_sampling_metadata(self, step: StepInputs) -> SamplingMetadata:
        """Sampling inputs for the requests of ``step`` that sample (logits row order)."""
        sample_indices = step.sample_indices
        requests = step.requests
        if len(sample_indices) == len(requests):
            sample_requests = requests
        else:
            sample_requests = [requests[i] for i in sample_indices.tolist()]
        return self.sampling.build(
            step.rows[sample_indices], sample_requests, self.default_generator
        )
