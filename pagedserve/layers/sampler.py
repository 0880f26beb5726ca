"""Token sampling, vectorized over the batch.

Order (design.md, "Sampling order"): logit bias and allowed tokens -> penalties
(repetition, presence, frequency) -> min_tokens masking of stop ids -> temperature
-> top-k -> top-p -> min-p -> sample. Greedy rows (temperature 0) take exactly the
argmax of the processed logits. Random rows draw one uniform number per sampled
token and invert the CDF of their filtered distribution; a request with a seed
draws from its own ``torch.Generator``, so its tokens do not depend on what else is
in the batch.

Why not vLLM's ``probs / Exponential(1)`` trick: it needs one random number per
vocabulary entry, and on a 2-core CPU filling 64 x 262144 exponentials takes
~400 ms, more than the model step. One uniform per row and a two-level CDF (chunk
sums, then one chunk) is exact and costs a few passes over the logits, run in
cache-sized blocks of rows. Top-k rows never touch more than their candidates, and
top-p rows try the best few dozen/hundred tokens before sorting a whole row.

CPU habits that matter here (measured on 2 cores, 64 x 262144 logits): numpy's argmax
is ~5x faster than torch's; a fresh 64 MiB tensor costs ~20 ms of page faults, so
row copies go to persistent scratch buffers; torch's exp is ~10x slower on inputs
that underflow, so exponents are clamped at -87 first.

Logprobs are taken from the raw model logits (vLLM v1's default
``logprobs_mode="raw_logprobs"``): the chosen token's logprob and rank, plus the
top-N of the row.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from pagedserve.layers.logprobs import (
    LogprobsTensors,
    argmax_rows,
    clamp_exp_,
    compute_logprobs,
    logsumexp_rows,
    row_block,
    row_max_finite,
    topk_rows,
)

# Candidate-set sizes tried for top-p without top-k before sorting the whole row.
_TOP_P_CANDIDATES = (64, 512, 8192)
# Chunk length of the two-level CDF over a full vocabulary row.
_CDF_CHUNK = 1024
# Uniform draws are clamped to at least this (see _sample_full_vocab).
_MIN_UNIFORM = 2.0**-24


@dataclass
class SparseLogitsEdit:
    """Entries (row, token) of the logits, with one value each (meaning depends on use)."""

    rows: torch.Tensor  # int64, on the logits' device
    tokens: torch.Tensor  # int64
    values: torch.Tensor | None = None  # float32


@dataclass
class SamplingMetadata:
    """Per-step sampling inputs for the rows of the logits, built by the input batch.

    Rows follow the logits. Tensors are on the logits' device; ``*_np`` are host
    copies used to choose code paths without a device sync. Every optional field is
    None when no row of the step needs it, so the all-greedy step touches nothing but
    one argmax.
    """

    num_rows: int
    all_greedy: bool
    all_random: bool
    temperature: torch.Tensor | None = None  # [R] float32, 0 for greedy rows
    temperature_np: np.ndarray | None = None
    top_k_np: np.ndarray | None = None  # [R] int; 0 = off
    top_p_np: np.ndarray | None = None  # [R] float; 1 = off
    min_p_np: np.ndarray | None = None  # [R] float; 0 = off
    # row -> generator for rows of seeded requests; other random rows use default_generator.
    generators: dict[int, torch.Generator] = field(default_factory=dict)
    default_generator: torch.Generator | None = None
    logit_bias: SparseLogitsEdit | None = None  # values: bias to add
    allowed_rows: torch.Tensor | None = None  # rows restricted to allowed_tokens
    allowed_tokens: SparseLogitsEdit | None = None  # entries kept in those rows
    # Repetition penalty: entries of tokens seen in prompt or output; values: the penalty.
    repetition: SparseLogitsEdit | None = None
    # Frequency + presence: entries of output tokens; values: freq * count + presence.
    output_penalty: SparseLogitsEdit | None = None
    min_tokens_mask: SparseLogitsEdit | None = None  # entries forced to -inf
    # Logprobs: -1 for rows without, else N (0 = only the sampled token).
    num_logprobs_np: np.ndarray | None = None


@dataclass
class SamplerOutput:
    """Sampled token per row (host int64) and, when asked, their logprobs."""

    sampled_token_ids: torch.Tensor  # [R] int64, on the host
    logprobs: LogprobsTensors | None = None
    logprob_rows: np.ndarray | None = None  # rows of ``logprobs`` within the batch


class Sampler(torch.nn.Module):
    """Turns last-position logits [R, V] into one token per row; see the module docstring."""

    def __init__(self) -> None:
        super().__init__()
        # Persistent scratch for row copies: a fresh 64 x 262144 float32 tensor costs
        # ~20 ms of page faults per step on CPU, reusing one costs nothing.
        self._scratch: dict[str, torch.Tensor] = {}

    def _scratch_rows(self, name: str, num_rows: int, like: torch.Tensor) -> torch.Tensor:
        numel = num_rows * like.shape[1]
        buffer = self._scratch.get(name)
        if buffer is None or buffer.numel() < numel or buffer.device != like.device:
            buffer = torch.empty(numel, dtype=torch.float32, device=like.device)
            self._scratch[name] = buffer
        return buffer[:numel].view(num_rows, like.shape[1])

    def _gather_rows(self, name: str, logits: torch.Tensor, rows: np.ndarray) -> torch.Tensor:
        out = self._scratch_rows(name, len(rows), logits)
        torch.index_select(logits, 0, torch.from_numpy(rows).to(logits.device), out=out)
        return out

    def forward(self, logits: torch.Tensor, metadata: SamplingMetadata) -> SamplerOutput:
        assert logits.dim() == 2 and logits.shape[0] == metadata.num_rows
        md = metadata
        logits = logits.float()
        raw_logits, logprob_rows = None, None
        if md.num_logprobs_np is not None:
            logprob_rows = np.flatnonzero(md.num_logprobs_np >= 0)
            # Greedy argmax and the mixed path (random rows are copied out) leave the
            # logits as they are; only edits and the all-random path write to them.
            edited = _has_edits(md) or md.all_random
            if not edited and len(logprob_rows) == md.num_rows:
                raw_logits = logits  # nothing below writes to the logits
            else:
                # Processing below edits the logits in place; keep the raw rows.
                raw_logits = self._gather_rows("raw", logits, logprob_rows)

        self._apply_logits_edits(logits, md)

        if md.all_greedy:
            sampled = argmax_rows(logits)
        elif md.all_random:
            sampled = self._sample_random(logits, np.arange(md.num_rows), md)
        else:
            assert md.temperature_np is not None
            sampled = argmax_rows(logits)
            random_rows = np.flatnonzero(md.temperature_np > 0)
            random_logits = self._gather_rows("random", logits, random_rows)
            sampled[torch.from_numpy(random_rows).to(sampled.device)] = self._sample_random(
                random_logits, random_rows, md
            ).to(sampled.device)
        sampled = sampled.cpu()

        logprobs = None
        if raw_logits is not None and logprob_rows is not None:
            assert md.num_logprobs_np is not None
            max_topk = int(md.num_logprobs_np.max())
            chosen = sampled[torch.from_numpy(logprob_rows)]
            logprobs = compute_logprobs(raw_logits, chosen, max_topk)
        return SamplerOutput(sampled, logprobs, logprob_rows)

    # -------------------------------------------------------------- logits edits
    @staticmethod
    def _apply_logits_edits(logits: torch.Tensor, md: SamplingMetadata) -> None:
        """Bias, allowed tokens, penalties and min_tokens, in place, as sparse edits."""
        vocab = logits.shape[1]
        flat = logits.view(-1)
        if md.logit_bias is not None:
            index = md.logit_bias.rows * vocab + md.logit_bias.tokens
            assert md.logit_bias.values is not None
            flat.index_add_(0, index, md.logit_bias.values)
        if md.allowed_rows is not None and md.allowed_tokens is not None:
            index = md.allowed_tokens.rows * vocab + md.allowed_tokens.tokens
            kept = flat[index]
            logits[md.allowed_rows] = float("-inf")
            flat[index] = kept
        if md.repetition is not None:
            index = md.repetition.rows * vocab + md.repetition.tokens
            values = flat[index]
            penalty = md.repetition.values
            assert penalty is not None
            flat[index] = torch.where(values > 0, values / penalty, values * penalty)
        if md.output_penalty is not None:
            index = md.output_penalty.rows * vocab + md.output_penalty.tokens
            assert md.output_penalty.values is not None
            flat.index_add_(0, index, -md.output_penalty.values)
        if md.min_tokens_mask is not None:
            index = md.min_tokens_mask.rows * vocab + md.min_tokens_mask.tokens
            flat[index] = float("-inf")

    # ------------------------------------------------------------ random sampling
    def _sample_random(
        self, logits: torch.Tensor, rows: np.ndarray, md: SamplingMetadata
    ) -> torch.Tensor:
        """Sample batch rows ``rows``; ``logits`` holds exactly those rows, before temperature.

        Rows split by their filters: top-k rows work on their top-k candidates, top-p rows
        on the best few thousand tokens when those hold top_p of the mass, the rest over
        the full vocabulary. Temperature is applied where each path needs it (top-k and
        sorting are invariant under it). ``logits`` may be overwritten.
        """
        assert md.temperature is not None
        device = logits.device
        num_rows, vocab = logits.shape
        temperature = md.temperature
        if num_rows != md.num_rows:
            temperature = temperature[torch.from_numpy(rows).to(device)]
        inv_temperature = temperature.reciprocal()
        uniforms = self._draw_uniforms(rows, md, device)

        top_k = md.top_k_np[rows] if md.top_k_np is not None else np.zeros(num_rows, np.int64)
        top_k = np.where((top_k > 0) & (top_k < vocab), top_k, 0)
        top_p = md.top_p_np[rows] if md.top_p_np is not None else np.ones(num_rows, np.float32)
        min_p = md.min_p_np[rows] if md.min_p_np is not None else np.zeros(num_rows, np.float32)
        with_top_k = top_k > 0
        with_top_p = ~with_top_k & (top_p < 1.0)
        plain = ~with_top_k & ~with_top_p

        sampled = torch.empty(num_rows, dtype=torch.int64, device=device)
        for group, sample_group in (
            (with_top_k, _sample_top_k),
            (with_top_p, _sample_top_p),
            (plain, _sample_full_vocab),
        ):
            if not group.any():
                continue
            if group.all():
                return sample_group(logits, inv_temperature, top_k, top_p, min_p, uniforms)
            index_np = np.flatnonzero(group)
            index = torch.from_numpy(index_np).to(device)
            sampled[index] = sample_group(
                logits[index], inv_temperature[index], top_k[index_np], top_p[index_np],
                min_p[index_np], uniforms[index],
            )
        return sampled

    @staticmethod
    def _draw_uniforms(rows: np.ndarray, md: SamplingMetadata, device: torch.device) -> torch.Tensor:
        """One U(0, 1) per row: from the request's own generator if seeded, else the default.

        Bounded away from 0 so the CDF target is never 0 (see _sample_full_vocab).
        """
        uniforms = torch.rand(len(rows), generator=md.default_generator, device=device)
        if md.generators:
            for i, row in enumerate(rows.tolist()):
                generator = md.generators.get(row)
                if generator is not None:
                    uniforms[i] = torch.rand(1, generator=generator, device=device)[0]
        return uniforms.clamp_(min=_MIN_UNIFORM)


def _sample_top_k(
    logits: torch.Tensor,
    inv_temperature: torch.Tensor,
    top_k: np.ndarray,
    top_p: np.ndarray,
    min_p: np.ndarray,
    uniforms: torch.Tensor,
) -> torch.Tensor:
    device = logits.device
    values, indices = topk_rows(logits, int(top_k.max()))
    values = values * inv_temperature.unsqueeze(1)
    if (top_k < values.shape[1]).any():
        positions = torch.arange(values.shape[1], device=device)
        cut = positions >= torch.from_numpy(top_k).to(device).unsqueeze(1)
        values = values.masked_fill(cut, float("-inf"))
    # Top-p after top-k renormalizes over the top-k set.
    log_norm = logsumexp_rows(values)
    return _sample_sorted_candidates(values, indices, log_norm, top_p, min_p, uniforms)


def _sample_top_p(
    logits: torch.Tensor,
    inv_temperature: torch.Tensor,
    top_k: np.ndarray,
    top_p: np.ndarray,
    min_p: np.ndarray,
    uniforms: torch.Tensor,
) -> torch.Tensor:
    """Top-p over the full vocabulary: try the best 64, 512, 8192 tokens, then sort.

    The kept set is the smallest prefix (in descending probability) whose mass
    reaches top_p; if the best C candidates already hold top_p of the mass, the set
    lies within them and sorting the whole row is unnecessary.
    """
    device = logits.device
    num_rows, vocab = logits.shape
    log_norm = logsumexp_rows(logits, inv_temperature)
    sampled = torch.empty(num_rows, dtype=torch.int64, device=device)
    pending = np.arange(num_rows)
    for num_candidates in (*_TOP_P_CANDIDATES, vocab):
        num_candidates = min(num_candidates, vocab)
        index = torch.from_numpy(pending).to(device)
        if num_candidates == vocab:
            values, indices = torch.sort(logits[index], dim=-1, descending=True)
        elif 2 * len(pending) > num_rows:
            # Cheaper to rank every row than to copy most of them out.
            values, indices = topk_rows(logits, num_candidates)
            if len(pending) < num_rows:
                values, indices = values[index], indices[index]
        else:
            values, indices = topk_rows(logits[index], num_candidates)
        values = values * inv_temperature[index].unsqueeze(1)
        if num_candidates == vocab:
            done = np.ones(len(pending), dtype=bool)
        else:
            mass = torch.exp(values - log_norm[index].unsqueeze(1)).sum(dim=-1)
            done = (mass >= torch.from_numpy(top_p[pending]).to(device)).cpu().numpy()
        if done.any():
            selected = torch.from_numpy(np.flatnonzero(done)).to(device)
            rows_np = pending[done]
            rows = torch.from_numpy(rows_np).to(device)
            sampled[rows] = _sample_sorted_candidates(
                values[selected], indices[selected], log_norm[rows], top_p[rows_np],
                min_p[rows_np], uniforms[rows],
            )
        pending = pending[~done]
        if not len(pending):
            break
    return sampled


def _sample_sorted_candidates(
    values: torch.Tensor,
    indices: torch.Tensor,
    log_norm: torch.Tensor,
    top_p: np.ndarray,
    min_p: np.ndarray,
    uniforms: torch.Tensor,
) -> torch.Tensor:
    """Sample from candidates sorted by descending (temperature-scaled) logit, after top-p
    and min-p.

    ``exp(values - log_norm)`` are the probabilities top-p is measured with. Both
    filters keep a prefix of the sorted candidates, so the result is a prefix too.
    """
    device = values.device
    probs = torch.exp(values - log_norm.unsqueeze(1))
    keep = None
    if (top_p < 1.0).any():
        exclusive_mass = probs.cumsum(dim=-1) - probs
        keep = exclusive_mass < torch.from_numpy(top_p).to(device).unsqueeze(1)
        keep[:, 0] = True
    if (min_p > 0).any():
        # min-p: keep p >= min_p * p_max, i.e. logit >= max logit + log(min_p).
        log_min_p = np.log(min_p, out=np.full_like(min_p, -np.inf), where=min_p > 0)
        threshold = values[:, :1] + torch.from_numpy(log_min_p).to(device).unsqueeze(1)
        keep_min_p = values >= threshold
        keep = keep_min_p if keep is None else keep & keep_min_p
    if keep is not None:
        probs = probs * keep
    cdf = probs.cumsum(dim=-1)
    total = cdf[:, -1]
    target = torch.minimum(uniforms * total, torch.nextafter(total, torch.zeros_like(total)))
    chosen = torch.searchsorted(cdf, target.unsqueeze(1), right=True)
    chosen = chosen.clamp_(max=values.shape[1] - 1)
    return indices.gather(1, chosen).squeeze(1)


def _sample_full_vocab(
    logits: torch.Tensor,
    inv_temperature: torch.Tensor,
    top_k: np.ndarray,
    top_p: np.ndarray,
    min_p: np.ndarray,
    uniforms: torch.Tensor,
) -> torch.Tensor:
    """Sample each row of ``logits`` [N, V] over the whole vocabulary (min-p allowed).

    Two-level inverse CDF: pick a chunk from the chunk sums, then a token inside it.
    ``logits`` is overwritten with unnormalized probabilities exp((x - max) / T), max 1,
    block by block of rows so the passes run in cache.

    Masked (-inf) tokens come out as e^-87 (1.6e-38) instead of 0, which keeps exp off
    its slow path: they can never be drawn. The target ``u * total`` is at least
    2^-24 (total >= 1, u >= 2^-24), so a token is drawn only where the float CDF steps
    across the target, and a 1.6e-38 step either does not change a float sum above
    ~1e-31 or stays far below the target.
    """
    device = logits.device
    num_rows, vocab = logits.shape
    chunk = _CDF_CHUNK if vocab >= 4 * _CDF_CHUNK else vocab
    num_full = vocab // chunk
    main = num_full * chunk
    num_chunks = num_full + (main < vocab)
    chunk_sums = torch.empty((num_rows, num_chunks), dtype=torch.float32, device=device)
    # min-p: keep p >= min_p * p_max, and p_max is 1 here.
    min_p_rows = [int(i) for i in np.flatnonzero(min_p > 0)]
    min_p_dev = None
    if min_p_rows and device.type != "cpu":
        min_p_dev = torch.from_numpy(min_p.astype(np.float32)).to(device).unsqueeze(1)
    # On CPU a scalar threshold_ per row beats a broadcast comparison by far.
    min_p_bounds = np.nextafter(min_p.astype(np.float32), np.float32(0)).tolist()
    same_min_p = bool(min_p_rows) and bool((min_p == min_p[0]).all())
    step = row_block(logits)
    for lo in range(0, num_rows, step):
        hi = min(lo + step, num_rows)
        block = logits[lo:hi]
        block.sub_(row_max_finite(block)).mul_(inv_temperature[lo:hi].unsqueeze(1))
        clamp_exp_(block)  # exp((x - max) / T)
        if min_p_dev is not None:
            block.masked_fill_(block < min_p_dev[lo:hi], 0.0)
        elif same_min_p:  # threshold_ keeps x > bound, i.e. x >= min_p
            torch.nn.functional.threshold_(block, min_p_bounds[0], 0.0)
        else:
            for row in min_p_rows:
                if lo <= row < hi:
                    torch.nn.functional.threshold_(logits[row], min_p_bounds[row], 0.0)
        torch.sum(block[:, :main].reshape(hi - lo, num_full, chunk), dim=-1,
                  out=chunk_sums[lo:hi, :num_full])
        if main < vocab:
            chunk_sums[lo:hi, num_full] = block[:, main:].sum(dim=-1)
    probs = logits

    chunk_cdf = chunk_sums.cumsum(dim=-1)
    total = chunk_cdf[:, -1]
    zero = torch.zeros_like(total)
    target = torch.minimum(uniforms * total, torch.nextafter(total, zero))
    chunk_index = torch.searchsorted(chunk_cdf, target.unsqueeze(1), right=True)
    chunk_index.clamp_(max=num_chunks - 1)
    before = torch.where(
        chunk_index > 0, chunk_cdf.gather(1, (chunk_index - 1).clamp_(min=0)), zero.unsqueeze(1)
    )
    remainder = (target.unsqueeze(1) - before).clamp_(min=0)

    columns = chunk_index * chunk + torch.arange(chunk, device=device)
    valid = columns < vocab
    columns.clamp_(max=vocab - 1)
    chunk_probs = probs.gather(1, columns) * valid
    inner_cdf = chunk_probs.cumsum(dim=-1)
    inner_total = inner_cdf[:, -1:]
    remainder = torch.minimum(remainder, torch.nextafter(inner_total, torch.zeros_like(inner_total)))
    inner = torch.searchsorted(inner_cdf, remainder, right=True).clamp_(max=chunk - 1)
    return columns.gather(1, inner).squeeze(1)


def _has_edits(md: SamplingMetadata) -> bool:
    return (
        md.logit_bias is not None
        or md.allowed_rows is not None
        or md.repetition is not None
        or md.output_penalty is not None
        or md.min_tokens_mask is not None
    )
