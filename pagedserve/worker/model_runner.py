"""The model runner: one SchedulerOutput in, one forward pass, one ModelRunnerOutput out."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import numpy as np
import torch

from pagedserve import platform
from pagedserve.config import EngineConfig, KVCacheConfig
from pagedserve.core.sched_output import ModelRunnerOutput, SchedulerOutput
from pagedserve.forward_context import ForwardContext, set_forward_context
from pagedserve.layers.logits import LogitsBuffer
from pagedserve.layers.logprobs import compute_logprobs
from pagedserve.layers.sampler import Sampler
from pagedserve.structured_output.bitmask import apply_token_bitmask
from pagedserve.worker.input_batch import InputBatch, StepInputs
from pagedserve.worker.kv_cache import (
    allocate_kv_caches,
    determine_kv_cache_config,
    kv_cache_bytes_per_block,
)

if TYPE_CHECKING:
    from pagedserve.attention.backend import AttentionBackend

logger = logging.getLogger(__name__)

# Prompt logprobs are computed over at most this many positions at a time: each one
# is a full-vocabulary row of logits (1 MiB for Gemma 3).
_PROMPT_LOGPROBS_SLICE = 64

TokenLogprobs = list[tuple[int, float, int]]


class ModelRunner:
    """Owns the model, the KV caches and the persistent input batch.

    Set-up: ``load_model()``, then ``determine_kv_cache_config()`` (sizes the cache
    from the backend's layout and the memory free now), then
    ``initialize_kv_cache(kv_cache_config)``.

    ``execute_model`` flattens the scheduled requests, runs one forward pass inside a
    forward context, computes logits only at the last scheduled position of each
    request that samples (a partial prefill chunk does not), samples, and returns the
    tokens keyed by request id. It works from plain data only: its own per-request
    state in the input batch, updated from the ``SchedulerOutput`` (new requests,
    appended blocks, ``num_computed_tokens`` as the scheduler reports it) and from the
    tokens it samples, which it appends itself.
    """

    def __init__(self, engine_config: EngineConfig) -> None:
        self.engine_config = engine_config
        self.model_config = engine_config.model_config
        self.cache_config = engine_config.cache_config
        self.scheduler_config = engine_config.scheduler_config
        self.device = platform.device()
        self.dtype = self.model_config.dtype
        self.max_model_len = self.model_config.max_model_len
        self.input_batch = InputBatch(
            max_num_reqs=self.scheduler_config.max_num_seqs,
            max_model_len=max(self.max_model_len, self.scheduler_config.max_model_len),
            max_num_batched_tokens=self.scheduler_config.max_num_batched_tokens,
            block_size=self.cache_config.block_size,
            vocab_size=self.model_config.vocab_size,
            device=self.device,
            seed=self.model_config.seed,
        )
        self.sampler = Sampler()
        # The LM head writes each step's float32 logits here (no fresh 32 MiB per step).
        self.logits_buffer = LogitsBuffer(self.model_config.vocab_size, self.device)
        self.model: torch.nn.Module | None = None
        self.kv_caches: list[torch.Tensor] = []
        self.kv_cache_config: KVCacheConfig | None = None
        self._attn_backend: AttentionBackend | None = None
        # Seconds spent in each phase of the last step (for profiling and benchmarks).
        self.last_step_timings: dict[str, float] = {}

    # ------------------------------------------------------------------- set-up
    def load_model(self) -> None:
        from pagedserve.models.loader import get_model

        start = time.perf_counter()
        self.model = get_model(self.model_config)
        logger.info(
            "loaded %s (%s) in %.1f s", self.model_config.architecture, self.dtype,
            time.perf_counter() - start,
        )

    def get_kv_cache_bytes_per_block(self) -> int:
        """Bytes of one KV block across all layers, in the attention backend's layout."""
        return kv_cache_bytes_per_block(
            self._backend(), self.model_config, self.cache_config.block_size, self.dtype
        )

    def determine_kv_cache_config(self) -> KVCacheConfig:
        """Size the KV cache: the user's kv_cache_memory or, by default, a share of the
        memory free now (call after ``load_model``). Raises ValueError when the budget
        holds fewer than 2 blocks."""
        return determine_kv_cache_config(
            self.cache_config.kv_cache_memory_bytes,
            self.cache_config.block_size,
            self.get_kv_cache_bytes_per_block(),
            self.scheduler_config.max_num_seqs,
            self.max_model_len,
        )

    def initialize_kv_cache(self, kv_cache_config: KVCacheConfig) -> None:
        self.kv_cache_config = kv_cache_config
        self.kv_caches = allocate_kv_caches(
            self._backend(), self.model_config, kv_cache_config, self.dtype, self.device
        )

    def _backend(self) -> AttentionBackend:
        if self._attn_backend is None:
            from pagedserve.attention.backend import get_attn_backend

            self._attn_backend = get_attn_backend()
        return self._attn_backend

    # --------------------------------------------------------------------- step
    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        """Run one step; see the class docstring."""
        assert self.model is not None, "load_model() first"
        with torch.inference_mode():
            return self._execute(scheduler_output)

    def _execute(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        model = self.model
        assert model is not None
        timings = self.last_step_timings
        start = time.perf_counter()
        self.input_batch.update_states(scheduler_output)
        if scheduler_output.is_empty:
            return ModelRunnerOutput(sampled_token_ids={})
        step = self.input_batch.prepare_inputs(scheduler_output)
        backend_metadata = self._backend().build_metadata(step.attn_metadata)
        context = ForwardContext(step.attn_metadata, self.kv_caches, backend_metadata)
        prepared = time.perf_counter()
        timings["prepare"] = prepared - start

        with set_forward_context(context):
            hidden_states = model(step.input_ids, step.positions)
        forward_done = time.perf_counter()
        timings["forward"] = forward_done - prepared

        output = ModelRunnerOutput(sampled_token_ids={})
        if len(step.sample_indices):
            if len(step.sample_indices) == hidden_states.shape[0]:
                sample_hidden = hidden_states  # decode-only: every token samples
            else:
                sample_hidden = hidden_states[step.logits_indices]
            logits = model.compute_logits(
                sample_hidden, out=self.logits_buffer.get(sample_hidden.shape[0])
            )
            if scheduler_output.grammar_bitmask is not None:
                self._apply_grammar_bitmask(scheduler_output, step, logits)
            logits_done = time.perf_counter()
            timings["logits"] = logits_done - forward_done
            sampling_metadata = self.input_batch.make_sampling_metadata(step)
            sampler_output = self.sampler(logits, sampling_metadata)
            requests = step.requests
            sample_indices = step.sample_indices.tolist()
            sampled = sampler_output.sampled_token_ids.tolist()
            sampled_token_ids = output.sampled_token_ids
            for i, token in zip(sample_indices, sampled, strict=True):
                request = requests[i]
                request.append_output_token_id(token)
                sampled_token_ids[request.req_id] = token
            if sampler_output.logprobs is not None:
                assert sampler_output.logprob_rows is not None
                rows = sampler_output.logprob_rows
                counts = sampling_metadata.num_logprobs_np[rows]  # type: ignore[index]
                entries = sampler_output.logprobs.to_lists(counts)
                for row, entry in zip(rows.tolist(), entries, strict=True):
                    output.logprobs[requests[sample_indices[row]].req_id] = entry
            timings["sample"] = time.perf_counter() - logits_done
        else:
            timings["logits"] = timings["sample"] = 0.0
        prompt_start = time.perf_counter()
        self._compute_prompt_logprobs(step, hidden_states, output)
        timings["prompt_logprobs"] = time.perf_counter() - prompt_start
        return output

    @staticmethod
    def _apply_grammar_bitmask(scheduler_output: SchedulerOutput, step: StepInputs,
                               logits: torch.Tensor) -> None:
        """Mask the logits rows of the constrained requests (structured outputs)."""
        row_of = {step.requests[i].req_id: row for row, i in enumerate(step.sample_indices.tolist())}
        rows = [row_of[req_id] for req_id in scheduler_output.structured_output_request_ids]
        bitmask = scheduler_output.grammar_bitmask
        if hasattr(bitmask, "result"):  # a Future: filled while the forward ran
            bitmask = bitmask.result()
        apply_token_bitmask(logits, bitmask, rows)

    # ----------------------------------------------------------- prompt logprobs
    def _compute_prompt_logprobs(
        self, step: StepInputs, hidden_states: torch.Tensor, output: ModelRunnerOutput
    ) -> None:
        """Logprobs of prompt tokens 1.. whose predicting position ran in this step.

        The logits at position p give the logprobs of prompt token p + 1. Entries go
        out in prompt order, chunk by chunk; positions recomputed after a preemption
        are not sent twice, and prompt tokens skipped by a prefix-cache hit get an
        empty entry so the engine's list stays aligned.
        """
        query_start_loc = step.attn_metadata.query_start_loc_np
        hidden_rows: list[np.ndarray] = []
        targets: list[np.ndarray] = []
        counts: list[int] = []
        spans: list[tuple[str, int, int]] = []  # (request id, number of gap entries, count)
        for i, state in enumerate(step.requests):
            num_prompt_logprobs = state.sampling_params.prompt_logprobs
            if num_prompt_logprobs is None:
                continue
            num_prompt = state.num_prompt_tokens
            if state.next_prompt_logprob_index >= num_prompt:
                continue  # all sent (the common case once the prompt is done)
            start = state.num_computed_tokens
            end = start + int(step.num_scheduled_np[i])
            first_target = max(start + 1, state.next_prompt_logprob_index)
            last_target = min(end + 1, num_prompt)  # exclusive
            num_gap = max(0, start + 1 - state.next_prompt_logprob_index)
            if first_target >= last_target and not num_gap:
                continue
            if first_target < last_target:
                target_ids = np.asarray(
                    state.prompt_token_ids[first_target:last_target], dtype=np.int64
                )
                base = int(query_start_loc[i]) - start
                hidden_rows.append(np.arange(first_target - 1, last_target - 1) + base)
                targets.append(target_ids)
                counts.extend([num_prompt_logprobs] * len(target_ids))
                num_entries = len(target_ids)
            else:
                num_entries = 0
            if num_gap:
                logger.warning(
                    "request %s: prompt logprobs of %d prompt tokens were not computed "
                    "(prefix cache hit); they come back empty", state.req_id, num_gap,
                )
            spans.append((state.req_id, num_gap, num_entries))
            state.next_prompt_logprob_index = max(state.next_prompt_logprob_index, last_target)
        if not spans:
            return
        entries: list[TokenLogprobs] = []
        if hidden_rows:
            assert self.model is not None
            all_rows = torch.from_numpy(np.concatenate(hidden_rows)).to(hidden_states.device)
            all_targets = torch.from_numpy(np.concatenate(targets))
            max_topk = max(counts)
            for lo in range(0, len(all_rows), _PROMPT_LOGPROBS_SLICE):
                hi = lo + _PROMPT_LOGPROBS_SLICE
                rows = hidden_states[all_rows[lo:hi]]
                logits = self.model.compute_logits(rows, out=self.logits_buffer.get(rows.shape[0]))
                tensors = compute_logprobs(logits, all_targets[lo:hi], max_topk)
                entries.extend(tensors.to_lists(counts[lo:hi]))
        offset = 0
        for request_id, num_gap, num_entries in spans:
            output.prompt_logprobs[request_id] = [[] for _ in range(num_gap)] + entries[
                offset : offset + num_entries
            ]
            offset += num_entries
