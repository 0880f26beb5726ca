"""Token embedding and LM head."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pagedserve.layers.linear import default_weight_loader
from pagedserve.layers.logits import linear_logits


class VocabEmbedding(nn.Module):
    """Token embedding table ``[vocab, hidden]``, optionally scaled (Gemma: sqrt(hidden)).

    The scale is cast to the weight dtype before multiplying, as transformers does
    (in bf16 sqrt(640) rounds to 25.25).
    """

    def __init__(self, vocab_size: int, hidden_size: int, scale: float | None = None) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.scale = scale
        self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size), requires_grad=False)
        self.weight.weight_loader = default_weight_loader

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        embeds = F.embedding(input_ids, self.weight)
        if self.scale is not None:
            # float32 first, then the weight dtype: the same rounding as transformers.
            scale = torch.tensor(self.scale, dtype=torch.float32, device=embeds.device)
            embeds = embeds * scale.to(self.weight.dtype)
        return embeds


class LMHead(nn.Module):
    """Projection to vocabulary logits; shares the embedding weight when tied.

    With ``--quantization int8`` the head gets its own int8 copy and ``quant_method``
    (``layers/quantization/int8.py``); the embedding lookup stays exact.
    """

    quant_method: Any = None

    def __init__(
        self,
        vocab_size: int,
        hidden_size: int,
        tied_embedding: VocabEmbedding | None = None,
        final_logit_softcapping: float | None = None,
    ) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.final_logit_softcapping = final_logit_softcapping
        # A plain attribute (not a submodule) so the tied weight is not registered twice.
        self._tied = [tied_embedding] if tied_embedding is not None else []
        if tied_embedding is None:
            self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size), requires_grad=False)
            self.weight.weight_loader = default_weight_loader

    @property
    def tied(self) -> bool:
        return bool(self._tied)

    def forward(self, hidden_states: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Float32 logits ``[N, vocab]``; the unquantized head writes them into ``out``
        (float32 ``[N, vocab]``, the runner's persistent buffer) when given."""
        weight = self._tied[0].weight if self._tied else self.weight
        if self.quant_method is not None:
            logits = self.quant_method.apply(self, hidden_states, weight, out)
        else:
            logits = linear_logits(hidden_states, weight, out)
        if self.final_logit_softcapping is not None:
            cap = self.final_logit_softcapping
            logits = logits.div_(cap).tanh_().mul_(cap)  # fresh or ``out``: in place
        return logits
