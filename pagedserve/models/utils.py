"""Helpers shared by the model definitions: default dtype scope, weight routing."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from pagedserve.layers.linear import default_weight_loader
from pagedserve.transformers_utils.utils import cache_root  # noqa: F401 (re-exported)

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def default_torch_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Create parameters in ``dtype`` inside this scope."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def layer_sliding_window(config: Any, layer_idx: int) -> int | None:
    """The sliding window of a layer per transformers' conventions, or None (full attention).

    ``layer_types`` decides when present (Gemma 3, Qwen2/3); otherwise a non-null
    ``sliding_window`` applies to every layer (Mistral).
    """
    window = getattr(config, "sliding_window", None)
    if not window:
        return None
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return int(window) if layer_types[layer_idx] == "sliding_attention" else None
    return int(window)


def load_weights_into(
    model: nn.Module,
    weights: Iterable[tuple[str, torch.Tensor]],
    packed_modules_mapping: Mapping[str, Sequence[str]],
    skip_prefixes: Sequence[str] = (),
    ignore_suffixes: Sequence[str] = ("rotary_emb.inv_freq",),
) -> set[str]:
    """Route checkpoint ``(name, tensor)`` pairs into ``model``'s parameters.

    ``packed_modules_mapping`` maps a fused module name to the checkpoint module names it
    stacks (``{"qkv_proj": ["q_proj", "k_proj", "v_proj"]}``); a part is loaded with
    ``weight_loader(param, tensor, shard_index)``. Raises ``ValueError`` for an unknown
    checkpoint tensor or a parameter that no tensor filled.
    """
    params = dict(model.named_parameters())
    part_to_packed: dict[str, tuple[str, int]] = {}
    for packed, parts in packed_modules_mapping.items():
        for index, part in enumerate(parts):
            part_to_packed[part] = (packed, index)
    loaded: set[str] = set()
    filled_shards: dict[str, set[int]] = {}
    for name, tensor in weights:
        if any(name.startswith(p) for p in skip_prefixes) or any(
            name.endswith(s) for s in ignore_suffixes
        ):
            continue
        target, shard_id = name, None
        module_path, _, leaf = name.rpartition(".")
        parent, _, module_name = module_path.rpartition(".")
        if module_name in part_to_packed:
            packed, shard_id = part_to_packed[module_name]
            target = f"{parent}.{packed}.{leaf}" if parent else f"{packed}.{leaf}"
        param = params.get(target)
        if param is None:
            raise ValueError(f"checkpoint tensor {name!r} matches no parameter of {type(model).__name__}")
        loader = getattr(param, "weight_loader", default_weight_loader)
        if shard_id is None:
            loader(param, tensor)
        else:
            loader(param, tensor, shard_id)
            filled_shards.setdefault(target, set()).add(shard_id)
        loaded.add(target)
    missing = sorted(set(params) - loaded)
    if missing:
        raise ValueError(f"checkpoint lacks weights for: {', '.join(missing[:10])}"
                         + (f" (+{len(missing) - 10} more)" if len(missing) > 10 else ""))
    for target, shards in filled_shards.items():
        module_name = target.rsplit(".", 2)[-2]
        expected = len(packed_modules_mapping[module_name])
        if len(shards) != expected:
            raise ValueError(f"{target}: loaded shards {sorted(shards)} of {expected}")
    return loaded


class CausalLMBase(nn.Module):
    """What every ``*ForCausalLM`` shares: ``self.model`` gives hidden states,
    ``self.lm_head`` turns them into logits, and checkpoint names load through
    ``packed_modules_mapping`` (a tied head skips ``lm_head.*`` in the checkpoint)."""

    packed_modules_mapping: dict[str, list[str]] = {
        "qkv_proj": ["q_proj", "k_proj", "v_proj"],
        "gate_up_proj": ["gate_proj", "up_proj"],
    }
    model: nn.Module
    lm_head: nn.Module
    tie_word_embeddings: bool

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Hidden states ``[T, hidden]`` for the flattened batch (inside a forward context)."""
        return self.model(input_ids, positions)

    def compute_logits(
        self, hidden_states: torch.Tensor, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Float32 logits ``[N, vocab]`` (final softcapping applied where configured),
        possibly written into ``out`` (a float32 ``[N, vocab]`` buffer; use the result)."""
        return self.lm_head(hidden_states, out=out)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        skip = ("lm_head.",) if self.tie_word_embeddings else ()
        return load_weights_into(self, weights, self.packed_modules_mapping, skip_prefixes=skip)
