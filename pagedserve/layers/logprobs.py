"""Row-wise math over large-vocabulary logits: argmax, top-k, logsumexp, logprobs.

Gemma 3 has a 262144-token vocabulary, so a decode batch of 64 holds 16.7M logits.
On a 2-core CPU a single pass over that is several milliseconds, and some stock
torch kernels are far slower than a pass (``argmax`` and ``topk`` scan with index
bookkeeping, a bool ``sum`` is slow). The helpers here pick the cheap formulation:
numpy for argmax/counting on CPU, and a two-stage top-k that first ranks chunks by
their maximum.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

# Below this many elements per row the stock kernels are cheap enough.
_LARGE_ROW = 1 << 14


def _is_cpu_f32(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype == torch.float32 and x.is_contiguous()


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """Index of the largest value of each row (first one on ties), int64."""
    if _is_cpu_f32(x) and x.dim() == 2:
        # numpy's argmax is ~5x faster than torch's on CPU for long rows.
        return torch.from_numpy(x.numpy().argmax(axis=-1).astype(np.int64, copy=False))
    return x.argmax(dim=-1)


def count_greater(x: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Per row, how many entries of ``x`` [N, V] are strictly greater than ``values`` [N]."""
    if _is_cpu_f32(x) and x.dim() == 2:
        x_np = x.numpy()
        thresholds = values.to(torch.float32).contiguous().numpy()[:, None]
        counts = np.empty(x_np.shape[0], dtype=np.int64)
        # Blocks of rows keep the boolean temporary small (and its memory reused).
        for lo in range(0, x_np.shape[0], 8):
            hi = lo + 8
            counts[lo:hi] = np.count_nonzero(x_np[lo:hi] > thresholds[lo:hi], axis=-1)
        return torch.from_numpy(counts)
    return (x > values.unsqueeze(-1)).sum(dim=-1)


# exp() of inputs below this underflows to denormals/zero, which torch's CPU kernel
# handles on a slow path (10x slower for denormal results); see clamp_exp_.
LOG_TINY = -87.0


def clamp_exp_(x: torch.Tensor) -> torch.Tensor:
    """In place ``exp(max(x, LOG_TINY))``: entries below e^-87 (-inf included) come out as
    ~1.6e-38 instead of denormals or zeros, which keeps exp on its fast path."""
    return x.clamp_(min=LOG_TINY).exp_()


def row_max_finite(x: torch.Tensor) -> torch.Tensor:
    """Row maxima [N, 1], with 0 for rows that are all -inf (so x - max stays -inf, not NaN)."""
    row_max = x.amax(dim=-1, keepdim=True)
    return torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))


# Elements per block for multi-pass row operations on CPU (8 MiB of float32, 8 Gemma 3
# rows): a block stays in cache between passes, and blocks are few enough that the
# per-op cost of torch's thread pool (large when other processes share the cores)
# stays small. GPUs take all rows at once.
BLOCK_ELEMENTS = 1 << 21


def row_block(x: torch.Tensor) -> int:
    """How many rows of ``x`` [N, V] to process per block (see BLOCK_ELEMENTS)."""
    if x.device.type != "cpu":
        return max(1, x.shape[0])
    return max(1, BLOCK_ELEMENTS // max(1, x.shape[1]))


def logsumexp_rows(x: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """log(sum(exp(x * scale))) per row; ``scale`` [N] (e.g. 1 / temperature) is optional.

    Terms below e^-87 of the row maximum are rounded up to it (a relative error below
    1e-32 per vocabulary entry). Works in blocks of rows to stay in cache.
    """
    num_rows = x.shape[0]
    step = row_block(x)
    out = torch.empty(num_rows, dtype=torch.float32, device=x.device)
    scratch = torch.empty((min(step, num_rows), x.shape[1]), dtype=torch.float32, device=x.device)
    for lo in range(0, num_rows, step):
        block = x[lo : lo + step]
        shifted = scratch[: block.shape[0]]
        row_max = row_max_finite(block)
        shifted.copy_(block).sub_(row_max)  # faster than a broadcasting out= sub
        if scale is not None:
            block_scale = scale[lo : lo + step].unsqueeze(1)
            shifted.mul_(block_scale)
            row_max = row_max * block_scale
        out[lo : lo + step] = clamp_exp_(shifted).sum(dim=-1).log_() + row_max.squeeze(1)
    return out


def topk_rows(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest values of each row of ``x`` [N, V], sorted descending, and their indices.

    For long rows and small ``k`` this ranks chunks of ``c`` consecutive entries by
    their maximum, keeps the ``k`` best chunks (every top-``k`` value lies in one of
    them: a chunk left out has a maximum no larger than ``k`` chunk maxima that are
    kept) and runs ``torch.topk`` on those ``k * c`` candidates only. The values are
    exactly ``torch.topk``'s; among tied values the indices may differ.
    """
    num_rows, vocab = x.shape
    k = min(k, vocab)
    if vocab < _LARGE_ROW or k * 16 > vocab:
        return torch.topk(x, k, dim=-1)
    # sqrt(V / k) balances the chunk maxima against the candidates.
    chunk = 1 << max(2, round(math.log2(math.sqrt(vocab / k))))
    num_chunks = vocab // chunk
    main = num_chunks * chunk
    chunk_max = x[:, :main].reshape(num_rows, num_chunks, chunk).amax(dim=-1)
    _, best_chunks = torch.topk(chunk_max, k, dim=-1, sorted=False)
    offsets = torch.arange(chunk, device=x.device)
    candidates = (best_chunks.unsqueeze(-1) * chunk + offsets).reshape(num_rows, k * chunk)
    if main < vocab:
        # The tail that does not fill a chunk is always a candidate.
        tail = torch.arange(main, vocab, device=x.device).expand(num_rows, vocab - main)
        candidates = torch.cat([candidates, tail], dim=1)
    values, order = torch.topk(x.gather(1, candidates), k, dim=-1)
    return values, candidates.gather(1, order)


@dataclass
class LogprobsTensors:
    """Logprobs of given tokens plus the top-N of each row (all on the host).

    ``token_ranks`` is 1 + the number of vocabulary entries with a strictly larger
    logprob (compared on the logits, which log_softmax maps monotonically).
    """

    token_ids: torch.Tensor  # [N] int64
    token_logprobs: torch.Tensor  # [N] float32
    token_ranks: torch.Tensor  # [N] int64
    topk_ids: torch.Tensor  # [N, K] int64 (K may be 0)
    topk_logprobs: torch.Tensor  # [N, K] float32

    def to_lists(self, num_logprobs: list[int] | np.ndarray) -> list[list[tuple[int, float, int]]]:
        """Per row: [(token, logprob, rank)] for the given token, then its top-``num_logprobs[i]``."""
        token_ids = self.token_ids.tolist()
        token_logprobs = self.token_logprobs.tolist()
        token_ranks = self.token_ranks.tolist()
        topk_ids = self.topk_ids.tolist()
        topk_logprobs = self.topk_logprobs.tolist()
        result: list[list[tuple[int, float, int]]] = []
        for i, count in enumerate(num_logprobs):
            entry = [(token_ids[i], token_logprobs[i], token_ranks[i])]
            row_ids = topk_ids[i]
            row_logprobs = topk_logprobs[i]
            for j in range(min(int(count), len(row_ids))):
                entry.append((row_ids[j], row_logprobs[j], j + 1))
            result.append(entry)
        return result


def compute_logprobs(
    logits: torch.Tensor, token_ids: torch.Tensor, num_topk: int
) -> LogprobsTensors:
    """log_softmax-based logprob and rank of ``token_ids`` [N] plus the top-``num_topk`` per row.

    ``logits`` [N, V] are the raw model logits (vLLM v1's default ``raw_logprobs``).
    The full log_softmax is never materialized: logprob = logit - logsumexp.
    """
    logits = logits.float()
    token_ids = token_ids.to(device=logits.device, dtype=torch.int64)
    log_norm = logsumexp_rows(logits)
    chosen = logits.gather(1, token_ids.unsqueeze(1)).squeeze(1)
    ranks = count_greater(logits, chosen).to(logits.device) + 1
    if num_topk > 0:
        topk_values, topk_ids = topk_rows(logits, num_topk)
        topk_logprobs = topk_values - log_norm.unsqueeze(1)
    else:
        topk_ids = torch.empty((logits.shape[0], 0), dtype=torch.int64, device=logits.device)
        topk_logprobs = torch.empty((logits.shape[0], 0), dtype=torch.float32, device=logits.device)
    return LogprobsTensors(
        token_ids=token_ids.cpu(),
        token_logprobs=(chosen - log_norm).cpu(),
        token_ranks=ranks.cpu(),
        topk_ids=topk_ids.cpu(),
        topk_logprobs=topk_logprobs.cpu(),
    )
