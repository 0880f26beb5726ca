"""Per-row sampling parameters kept across steps, and the per-step SamplingMetadata."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from pagedserve.layers.sampler import SamplingMetadata, SparseLogitsEdit
from pagedserve.sampling_params import SamplingParams

# Feature bits of a row: which sparse logits edits it may need.
_LOGIT_BIAS = 1
_ALLOWED = 2
_PENALTIES = 4
_MIN_TOKENS = 8


class _RowExtras:
    """Token-id arrays of one row's rarer parameters (numpy, cached when the row is set)."""

    __slots__ = ("allowed_tokens", "logit_bias_tokens", "logit_bias_values", "prompt_tokens",
                 "stop_token_ids")

    def __init__(self) -> None:
        self.logit_bias_tokens: np.ndarray | None = None
        self.logit_bias_values: np.ndarray | None = None
        self.allowed_tokens: np.ndarray | None = None
        self.stop_token_ids: np.ndarray | None = None
        self.prompt_tokens: np.ndarray | None = None  # unique prompt ids (repetition penalty)


class RowSamplingParams:
    """SamplingParams of every live row as arrays, so a step gathers them vectorized.

    Rows are the input batch's rows. ``build`` turns the rows of a step's sampling
    requests into a ``SamplingMetadata``; for the all-greedy batch without extras it
    is a handful of numpy gathers over the batch.
    """

    def __init__(self, max_num_reqs: int, vocab_size: int, device: torch.device) -> None:
        self.vocab_size = vocab_size
        self.device = device
        self.temperature_np = np.zeros(max_num_reqs, dtype=np.float32)
        self.top_k_np = np.zeros(max_num_reqs, dtype=np.int64)  # 0 = off
        self.top_p_np = np.ones(max_num_reqs, dtype=np.float32)
        self.min_p_np = np.zeros(max_num_reqs, dtype=np.float32)
        self.repetition_penalty_np = np.ones(max_num_reqs, dtype=np.float32)
        self.frequency_penalty_np = np.zeros(max_num_reqs, dtype=np.float32)
        self.presence_penalty_np = np.zeros(max_num_reqs, dtype=np.float32)
        self.min_tokens_np = np.zeros(max_num_reqs, dtype=np.int64)
        self.num_logprobs_np = np.full(max_num_reqs, -1, dtype=np.int64)
        self.features_np = np.zeros(max_num_reqs, dtype=np.int8)
        self.generators: list[torch.Generator | None] = [None] * max_num_reqs
        self.extras: list[_RowExtras | None] = [None] * max_num_reqs

    def _token_array(self, token_ids: Sequence[int] | set[int] | frozenset[int]) -> np.ndarray:
        tokens = np.fromiter(token_ids, dtype=np.int64, count=len(token_ids))
        # The engine validates ids against the vocabulary; never index out of range here.
        return tokens[(tokens >= 0) & (tokens < self.vocab_size)]

    def set_row(
        self,
        row: int,
        params: SamplingParams,
        prompt_token_ids: Sequence[int],
        generator: torch.Generator | None,
    ) -> None:
        """Set ``row`` from a request's parameters (its prompt feeds the repetition penalty)."""
        self.temperature_np[row] = params.temperature
        self.top_k_np[row] = params.top_k if 0 < params.top_k < self.vocab_size else 0
        self.top_p_np[row] = params.top_p
        self.min_p_np[row] = params.min_p
        self.repetition_penalty_np[row] = params.repetition_penalty
        self.frequency_penalty_np[row] = params.frequency_penalty
        self.presence_penalty_np[row] = params.presence_penalty
        self.num_logprobs_np[row] = -1 if params.logprobs is None else params.logprobs
        self.generators[row] = generator

        features = 0
        extras = _RowExtras()
        if params.logit_bias:
            tokens = np.fromiter(params.logit_bias.keys(), dtype=np.int64)
            values = np.fromiter(params.logit_bias.values(), dtype=np.float32)
            valid = (tokens >= 0) & (tokens < self.vocab_size)
            extras.logit_bias_tokens, extras.logit_bias_values = tokens[valid], values[valid]
            features |= _LOGIT_BIAS
        if params.allowed_token_ids:
            extras.allowed_tokens = np.unique(self._token_array(params.allowed_token_ids))
            features |= _ALLOWED
        if (
            params.repetition_penalty != 1.0
            or params.frequency_penalty != 0.0
            or params.presence_penalty != 0.0
        ):
            if params.repetition_penalty != 1.0:
                extras.prompt_tokens = np.unique(self._token_array(prompt_token_ids))
            features |= _PENALTIES
        if params.min_tokens > 0 and params.all_stop_token_ids:
            extras.stop_token_ids = self._token_array(params.all_stop_token_ids)
            features |= _MIN_TOKENS
        self.min_tokens_np[row] = params.min_tokens
        self.features_np[row] = features
        self.extras[row] = extras if features else None

    def clear_row(self, row: int) -> None:
        self.generators[row] = None
        self.extras[row] = None
        self.features_np[row] = 0
        self.num_logprobs_np[row] = -1

    def build(
        self,
        rows: np.ndarray,
        output_token_ids: Sequence[Sequence[int]],
        default_generator: torch.Generator,
    ) -> SamplingMetadata:
        """Metadata for sampling rows ``rows`` (one per logits row); ``output_token_ids``
        aligned: each row's tokens generated so far (penalties, min_tokens)."""
        num_rows = len(rows)
        temperature = self.temperature_np[rows]
        greedy = temperature == 0.0
        all_greedy = bool(greedy.all())
        md = SamplingMetadata(
            num_rows=num_rows, all_greedy=all_greedy, all_random=not greedy.any()
        )
        if not all_greedy:
            md.temperature_np = temperature
            # Greedy rows never divide; 1 keeps the tensor finite.
            md.temperature = torch.from_numpy(np.where(greedy, 1.0, temperature)).to(self.device)
            top_k = self.top_k_np[rows]
            if top_k.any():
                md.top_k_np = top_k
            top_p = self.top_p_np[rows]
            if (top_p < 1.0).any():
                md.top_p_np = top_p
            min_p = self.min_p_np[rows]
            if (min_p > 0.0).any():
                md.min_p_np = min_p
            md.default_generator = default_generator
            for i, row in enumerate(rows.tolist()):
                generator = self.generators[row]
                if generator is not None and not greedy[i]:
                    md.generators[i] = generator
        num_logprobs = self.num_logprobs_np[rows]
        if (num_logprobs >= 0).any():
            md.num_logprobs_np = num_logprobs
        features = self.features_np[rows]
        if features.any():
            self._add_sparse_edits(md, rows, output_token_ids, features)
        return md

    def _add_sparse_edits(
        self,
        md: SamplingMetadata,
        rows: np.ndarray,
        output_token_ids: Sequence[Sequence[int]],
        features: np.ndarray,
    ) -> None:
        bias_rows, bias_tokens, bias_values = [], [], []
        allowed_rows, allowed_entry_rows, allowed_tokens = [], [], []
        rep_rows, rep_tokens, rep_values = [], [], []
        out_rows, out_tokens, out_values = [], [], []
        stop_rows, stop_tokens = [], []
        for i in np.flatnonzero(features).tolist():
            row = int(rows[i])
            extras = self.extras[row]
            assert extras is not None
            flags = int(features[i])
            if flags & _LOGIT_BIAS:
                assert extras.logit_bias_tokens is not None
                bias_rows.append(np.full(len(extras.logit_bias_tokens), i, dtype=np.int64))
                bias_tokens.append(extras.logit_bias_tokens)
                bias_values.append(extras.logit_bias_values)
            if flags & _ALLOWED:
                assert extras.allowed_tokens is not None
                allowed_rows.append(i)
                allowed_entry_rows.append(np.full(len(extras.allowed_tokens), i, dtype=np.int64))
                allowed_tokens.append(extras.allowed_tokens)
            if flags & _PENALTIES:
                output = np.asarray(output_token_ids[i], dtype=np.int64)
                repetition = float(self.repetition_penalty_np[row])
                if repetition != 1.0:
                    assert extras.prompt_tokens is not None
                    seen = np.union1d(extras.prompt_tokens, output)
                    rep_rows.append(np.full(len(seen), i, dtype=np.int64))
                    rep_tokens.append(seen)
                    rep_values.append(np.full(len(seen), repetition, dtype=np.float32))
                frequency = float(self.frequency_penalty_np[row])
                presence = float(self.presence_penalty_np[row])
                if len(output) and (frequency != 0.0 or presence != 0.0):
                    tokens, counts = np.unique(output, return_counts=True)
                    out_rows.append(np.full(len(tokens), i, dtype=np.int64))
                    out_tokens.append(tokens)
                    out_values.append((frequency * counts + presence).astype(np.float32))
            if flags & _MIN_TOKENS and len(output_token_ids[i]) < self.min_tokens_np[row]:
                assert extras.stop_token_ids is not None
                stop_rows.append(np.full(len(extras.stop_token_ids), i, dtype=np.int64))
                stop_tokens.append(extras.stop_token_ids)

        md.logit_bias = self._edit(bias_rows, bias_tokens, bias_values)
        if allowed_rows:
            md.allowed_rows = torch.tensor(allowed_rows, dtype=torch.int64, device=self.device)
            md.allowed_tokens = self._edit(allowed_entry_rows, allowed_tokens)
        md.repetition = self._edit(rep_rows, rep_tokens, rep_values)
        md.output_penalty = self._edit(out_rows, out_tokens, out_values)
        md.min_tokens_mask = self._edit(stop_rows, stop_tokens)

    def _edit(
        self,
        rows: list[np.ndarray],
        tokens: list[np.ndarray],
        values: list[np.ndarray] | None = None,
    ) -> SparseLogitsEdit | None:
        if not rows:
            return None
        device = self.device
        return SparseLogitsEdit(
            rows=torch.from_numpy(np.concatenate(rows)).to(device),
            tokens=torch.from_numpy(np.concatenate(tokens)).to(device),
            values=None if values is None else torch.from_numpy(np.concatenate(values)).to(device),
        )
