"""The persistent input batch: per-request rows and the flattening of one step.

The runner keeps its own state per request (:class:`CachedRequestState`), built from
the scheduler's plain ``NewRequestData`` and updated from ``CachedRequestData`` and
the tokens it samples; it never sees the scheduler's ``Request`` objects. Each live
request owns a row (block table row and sampling parameters) from the step it
enters the batch until it finishes or is preempted; rows are reused.
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
from pagedserve.core.sched_output import NewRequestData, SchedulerOutput
from pagedserve.layers.sampler import SamplingMetadata
from pagedserve.sampling_params import SamplingParams
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


@dataclass(eq=False, slots=True)
class CachedRequestState:
    """The runner's own copy of one request.

    Built from ``NewRequestData``; ``num_computed_tokens`` is set from the scheduler
    each step and sampled tokens are appended by the runner. It survives preemption
    (the generator's state, the prompt logprobs already sent) and is dropped when
    the request finishes.
    """

    req_id: str
    prompt_token_ids: list[int]  # read-only (may be shared with the scheduler)
    sampling_params: SamplingParams
    num_computed_tokens: int
    output_token_ids: list[int]
    token_ids: list[int]  # prompt + output
    generator: torch.Generator | None = None
    # Index of the next prompt token whose prompt logprobs are due (token 0 has none).
    next_prompt_logprob_index: int = 1

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    def reset(self, new_request: NewRequestData) -> None:
        """Take the scheduler's view of a request that (re)enters the batch."""
        self.prompt_token_ids = new_request.prompt_token_ids
        self.sampling_params = new_request.sampling_params
        self.num_computed_tokens = new_request.num_computed_tokens
        self.output_token_ids = list(new_request.output_token_ids)
        self.token_ids = new_request.prompt_token_ids + self.output_token_ids

    def append_output_token_id(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.token_ids.append(token_id)


@dataclass
class StepInputs:
    """The flattened batch of one step and what the sampler needs to find its rows."""

    input_ids: torch.Tensor  # [T] int64, device
    positions: torch.Tensor  # [T] int64, device
    attn_metadata: CommonAttentionMetadata
    requests: list[CachedRequestState]  # batch order
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
    def _add_row(self, state: CachedRequestState, block_ids: list[int]) -> int:
        if not self._free_rows:
            raise RuntimeError(
                f"input batch is full ({self.max_num_reqs} rows): the scheduler ran more "
                f"requests than max_num_seqs"
            )
        row = self._free_rows.pop()
        self.req_id_to_row[state.req_id] = row
        self.block_table.set_row(row, block_ids)
        self.sampling.set_row(row, state.sampling_params, state.prompt_token_ids, state.generator)
        return row

    def _remove_row(self, request_id: str) -> None:
        row = self.req_id_to_row.pop(request_id, None)
        if row is None:
            return
        self.block_table.clear_row(row)
        self.sampling.clear_row(row)
        self._free_rows.append(row)

    def _make_state(self, new_request: NewRequestData) -> CachedRequestState:
        """The state of a request entering the batch; a resumed one keeps its generator."""
        state = self.request_states.get(new_request.req_id)
        if state is not None:
            state.reset(new_request)
            return state
        output_token_ids = list(new_request.output_token_ids)
        state = CachedRequestState(
            req_id=new_request.req_id,
            prompt_token_ids=new_request.prompt_token_ids,
            sampling_params=new_request.sampling_params,
            num_computed_tokens=new_request.num_computed_tokens,
            output_token_ids=output_token_ids,
            token_ids=new_request.prompt_token_ids + output_token_ids,
        )
        seed = new_request.sampling_params.seed
        if seed is not None:
            state.generator = torch.Generator(device=self.device)
            state.generator.manual_seed(seed)
        self.request_states[new_request.req_id] = state
        return state

    def update_states(self, scheduler_output: SchedulerOutput) -> None:
        """Drop finished/preempted rows, (re)build rows of new requests, append new blocks."""
        for request_id in scheduler_output.finished_req_ids:
            self._remove_row(request_id)
            self.request_states.pop(request_id, None)
        for request_id in scheduler_output.preempted_req_ids:
            self._remove_row(request_id)
        for new_request in scheduler_output.scheduled_new_reqs:
            self._remove_row(new_request.req_id)
            self._add_row(self._make_state(new_request), new_request.block_ids)
        cached = scheduler_output.scheduled_cached_reqs
        states = self.request_states
        for request_id, new_block_ids, num_computed_tokens in zip(
            cached.req_ids, cached.new_block_ids, cached.num_computed_tokens, strict=True
        ):
            row = self.req_id_to_row.get(request_id)
            if row is None:
                raise RuntimeError(f"request {request_id} was scheduled without entering the batch")
            if new_block_ids:
                self.block_table.append_row(row, new_block_ids)
            states[request_id].num_computed_tokens = num_computed_tokens

    # -------------------------------------------------------------- flattening
    def _gather_tokens(
        self, requests: list[CachedRequestState], num_scheduled_tokens: dict[str, int]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
        """Write the scheduled token ids into the input-ids buffer, in batch order.

        Returns per request its row, num_computed_tokens, scheduled and total token
        counts, and the number of tokens written.
        """
        req_id_to_row = self.req_id_to_row
        rows_list: list[int] = []
        computed_list: list[int] = []
        scheduled_list: list[int] = []
        total_list: list[int] = []
        token_ids: list[int] = []
        for request in requests:
            request_id = request.req_id
            num_new = num_scheduled_tokens[request_id]
            start = request.num_computed_tokens
            all_token_ids = request.token_ids
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
        self._input_ids.np[:num_tokens] = token_ids
        return (
            np.array(rows_list, dtype=np.int64),
            np.array(computed_list, dtype=np.int32),
            np.array(scheduled_list, dtype=np.int32),
            np.array(total_list, dtype=np.int32),
            num_tokens,
        )

    def prepare_inputs(self, scheduler_output: SchedulerOutput) -> StepInputs:
        """Flatten the scheduled requests into one forward pass (call after update_states)."""
        request_states = self.request_states
        requests = [request_states[rid] for rid in scheduler_output.scheduled_req_ids]
        num_reqs = len(requests)
        rows, num_computed, num_scheduled, num_tokens_total, num_tokens = self._gather_tokens(
            requests, scheduler_output.num_scheduled_tokens
        )
        seq_lens_np = self._seq_lens.np[:num_reqs]
        np.add(num_computed, num_scheduled, out=seq_lens_np)
        query_start_loc_np = self._query_start_loc.np[: num_reqs + 1]
        query_start_loc_np[0] = 0
        np.cumsum(num_scheduled, out=query_start_loc_np[1:])

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

        sample_indices = np.flatnonzero(seq_lens_np >= num_tokens_total)
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
            output_token_ids = [request.output_token_ids for request in requests]
        else:
            output_token_ids = [requests[i].output_token_ids for i in sample_indices.tolist()]
        return self.sampling.build(
            step.rows[sample_indices], output_token_ids, self.default_generator
        )
