"""Input building: exact flattened tensors for a hand-made SchedulerOutput, row reuse."""

from __future__ import annotations

import numpy as np
import torch

from pagedserve.core.sched_output import CachedRequestData, NewRequestData, SchedulerOutput
from pagedserve.sampling_params import SamplingParams
from pagedserve.worker.block_table import BlockTable
from pagedserve.worker.input_batch import InputBatch

BLOCK_SIZE = 4


def make_batch(max_num_reqs: int = 4) -> InputBatch:
    return InputBatch(
        max_num_reqs=max_num_reqs,
        max_model_len=64,
        max_num_batched_tokens=32,
        block_size=BLOCK_SIZE,
        vocab_size=1000,
        device=torch.device("cpu"),
        seed=0,
    )


def new_request(request_id: str, prompt: list[int], outputs: list[int], num_computed: int,
                block_ids: list[int], **params: object) -> NewRequestData:
    return NewRequestData(
        req_id=request_id,
        prompt_token_ids=prompt,
        sampling_params=SamplingParams(**params),  # type: ignore[arg-type]
        block_ids=block_ids,
        num_computed_tokens=num_computed,
        output_token_ids=outputs,
    )


def scheduler_output(
    new: list[tuple[NewRequestData, int]] = (),  # type: ignore[assignment]
    cached: list[tuple[str, list[int], int, int]] = (),  # type: ignore[assignment]
    finished: set[str] = frozenset(),  # type: ignore[assignment]
    preempted: set[str] = frozenset(),  # type: ignore[assignment]
) -> SchedulerOutput:
    """``new``: (request, num_scheduled); ``cached``: (request id, new block ids,
    num_computed_tokens, num_scheduled). Batch order: cached, then new."""
    cached_reqs = CachedRequestData()
    num_scheduled = {}
    for request_id, new_block_ids, num_computed, n in cached:
        cached_reqs.append(request_id, new_block_ids, num_computed)
        num_scheduled[request_id] = n
    for request, n in new:
        num_scheduled[request.req_id] = n
    return SchedulerOutput(
        scheduled_new_reqs=[request for request, _ in new],
        scheduled_cached_reqs=cached_reqs,
        num_scheduled_tokens=num_scheduled,
        total_num_scheduled_tokens=sum(num_scheduled.values()),
        finished_req_ids=set(finished),
        preempted_req_ids=set(preempted),
    )


def test_mixed_prefill_chunk_and_decodes() -> None:
    batch = make_batch()
    # A: 10-token prompt, 3 tokens computed (prefix hit), a 5-token chunk: positions 3..7,
    #    crossing from block 0 into block 1; the chunk stops short of the prompt's end.
    a = new_request("a", list(range(100, 110)), [], 3, [5, 9, 6])
    # B: decode of its 8th token (position 7, last slot of block 1).
    b = new_request("b", [200, 201, 202, 203, 204], [205, 206, 207], 7, [2, 7])
    # C: decode at position 8: the first slot of a fresh block 2.
    c = new_request("c", [300, 301, 302, 303, 304, 305], [306, 307, 308], 8, [1, 3, 4])
    so = scheduler_output([(b, 1), (c, 1), (a, 5)])
    batch.update_states(so)
    step = batch.prepare_inputs(so)
    md = step.attn_metadata

    assert step.input_ids.tolist() == [207, 308, 103, 104, 105, 106, 107]
    assert step.positions.tolist() == [7, 8, 3, 4, 5, 6, 7]
    assert md.query_start_loc.tolist() == [0, 1, 2, 7]
    assert md.query_start_loc_np.tolist() == [0, 1, 2, 7]
    assert md.seq_lens.tolist() == [8, 9, 8]
    assert md.num_computed_tokens_np.tolist() == [7, 8, 3]
    # slot = block_table[req, pos // 4] * 4 + pos % 4
    assert md.slot_mapping.tolist() == [7 * 4 + 3, 4 * 4 + 0, 5 * 4 + 3, 9 * 4, 9 * 4 + 1,
                                        9 * 4 + 2, 9 * 4 + 3]
    assert md.slot_mapping.dtype == torch.int64
    assert md.block_table.tolist() == [[2, 7, 0], [1, 3, 4], [5, 9, 6]]
    assert md.block_table.dtype == torch.int32
    assert (md.num_reqs, md.num_actual_tokens, md.max_query_len, md.max_seq_len) == (3, 7, 5, 9)
    assert md.block_size == BLOCK_SIZE
    # B and C sample at their only token; A's partial chunk does not sample.
    assert step.sample_indices.tolist() == [0, 1]
    assert step.logits_indices.tolist() == [0, 1]


def test_prefill_completing_prompt_samples_at_last_token() -> None:
    batch = make_batch()
    a = new_request("a", list(range(10)), [], 8, [1, 2, 3])
    d = new_request("d", [1, 2, 3], [], 0, [4])
    so = scheduler_output([(a, 2), (d, 3)])
    batch.update_states(so)
    step = batch.prepare_inputs(so)
    assert step.positions.tolist() == [8, 9, 0, 1, 2]
    assert step.attn_metadata.slot_mapping.tolist() == [3 * 4, 3 * 4 + 1, 16, 17, 18]
    assert step.sample_indices.tolist() == [0, 1]
    assert step.logits_indices.tolist() == [1, 4]


def test_rows_reused_and_block_tables_rebuilt_or_appended() -> None:
    batch = make_batch(max_num_reqs=2)
    a = new_request("a", [1, 2, 3, 4], [], 0, [3])
    b = new_request("b", [5, 6, 7, 8, 9, 10, 11, 12, 13], [], 0, [4, 5, 6])
    so = scheduler_output([(a, 4), (b, 9)])
    batch.update_states(so)
    batch.prepare_inputs(so)
    row_b = batch.req_id_to_row["b"]
    # The model runner appends the token it sampled for a (the scheduler does not send it).
    batch.request_states["a"].append_output_token_id(50)

    # Step 2: a decodes into a new block (only the new block id comes); b finished and
    # its row goes to c.
    c = new_request("c", [7, 7], [], 0, [2], temperature=0.5, seed=3)
    so = scheduler_output([(c, 2)], cached=[("a", [8], 4, 1)], finished={"b"})
    batch.update_states(so)
    assert batch.req_id_to_row["c"] == row_b
    assert "b" not in batch.request_states
    step = batch.prepare_inputs(so)
    assert step.input_ids.tolist() == [50, 7, 7]
    assert step.positions.tolist() == [4, 0, 1]
    # a's row was appended to (block 8), c's row rebuilt: no stale blocks of b.
    assert batch.block_table.block_table_np[row_b].tolist()[:3] == [2, 0, 0]
    assert step.attn_metadata.block_table.tolist() == [[3, 8], [2, 0]]
    assert step.attn_metadata.slot_mapping.tolist() == [8 * 4, 2 * 4, 2 * 4 + 1]
    md = batch.make_sampling_metadata(step)
    assert md.num_rows == 2 and md.all_random  # default temperature is 1
    assert md.temperature_np.tolist() == [1.0, 0.5]
    assert list(md.generators) == [1]

    # Step 3: a is preempted (row dropped, state kept), c continues.
    batch.request_states["c"].append_output_token_id(9)
    so = scheduler_output(cached=[("c", [], 2, 1)], preempted={"a"})
    batch.update_states(so)
    assert "a" not in batch.req_id_to_row and "a" in batch.request_states
    step = batch.prepare_inputs(so)
    assert step.input_ids.tolist() == [9]
    assert step.attn_metadata.slot_mapping.tolist() == [2 * 4 + 2]
    # Resumed a gets a fresh row with its new blocks and its tokens so far; the
    # generator state of c survives.
    resumed = new_request("a", [1, 2, 3, 4], [50], 0, [1, 4])
    so = scheduler_output([(resumed, 5)], cached=[("c", [], 2, 1)])
    batch.update_states(so)
    step = batch.prepare_inputs(so)
    assert step.input_ids.tolist() == [9, 1, 2, 3, 4, 50]
    assert step.attn_metadata.block_table.tolist() == [[2, 0], [1, 4]]
    assert step.attn_metadata.slot_mapping.tolist() == [10, 4, 5, 6, 7, 16]
    assert step.sample_indices.tolist() == [0, 1]  # the resumed a samples its next token


def test_block_table_slot_mapping_vectorized_matches_formula() -> None:
    rng = np.random.default_rng(0)
    table = BlockTable(max_num_reqs=8, max_num_blocks_per_req=16, block_size=16)
    rows = rng.permutation(8)[:5]
    for row in rows:
        table.set_row(int(row), rng.integers(1, 1000, size=16).tolist())
    batch_table = table.gather(rows, 16)
    req_indices = rng.integers(0, 5, size=100)
    positions = rng.integers(0, 256, size=100)
    out = np.empty(100, dtype=np.int64)
    table.compute_slot_mapping(batch_table, req_indices, positions, out)
    expected = [
        table.block_table_np[rows[r], p // 16] * 16 + p % 16
        for r, p in zip(req_indices, positions, strict=True)
    ]
    assert out.tolist() == expected
