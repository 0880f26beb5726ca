"""Token embedding and LM head."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pagedserve.layers.linear import default_weight_loader


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
    """Projection to vocabulary logits; shares the embedding weight when tied."""

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

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Float32 logits ``[N, vocab]``."""
        weight = self._tied[0].weight if self._tied else self.weight
        logits = F.linear(hidden_states, weight).float()
        if self.final_logit_softcapping is not None:
            cap = self.final_logit_softcapping
            logits = torch.tanh(logits / cap) * cap
        return logits
