"""Int8 linear layers and LM head: the quantized tensors on the layer and the per-call
kernel choice.

A layer is quantized after its checkpoint weights are loaded (the fused-shard loaders of
``layers/linear.py`` are untouched): :func:`quantize_layer_weight` gives symmetric
per-output-channel int8 weights, and :func:`install_int8` puts them on the layer as
buffers (``qweight`` int8 [N, K], ``weight_scale`` float32 [N], ``weight_scale_bf16``,
``weight_sum`` int32 [N] where it runs ``w8a8``/``w8a16``)
together with the method that runs it. The unquantized weight stays only where the
layer's schedule still runs ``dense`` at some row count.

Scales are rounded to bf16 values before quantizing, so every kernel dequantizes to the
very same weights (``_weight_int8pack_mm`` takes bf16 scales; an fp32 scale rounded after
the fact would be a systematic per-channel gain error of up to 0.4%).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pagedserve.layers.logits import linear_logits
from pagedserve.layers.quantization import gemv
from pagedserve.layers.quantization.kernels import (
    KERNEL_DENSE,
    KERNEL_W8A8,
    KERNEL_W8A16,
    KERNEL_WEIGHT_ONLY,
    KernelSchedule,
    w8a8_mm,
    w8a16_mm,
    weight_only_mm,
    weight_only_supported,
    weight_row_sums,
)


def quantize_layer_weight(
    weight: torch.Tensor, chunk_rows: int = 16384
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(qweight int8 [N, K], weight_scale float32 [N])``, symmetric per output channel,
    with scales that are exact bf16 values (row blocks at a time: a 262k-row LM head in
    float32 would need 0.7 GB of temporaries at once)."""
    num_rows = weight.shape[0]
    qweight = torch.empty(weight.shape, dtype=torch.int8)
    scale = torch.empty(num_rows, dtype=torch.float32)
    for start in range(0, num_rows, chunk_rows):
        w = weight[start : start + chunk_rows].detach().float()
        s = (w.abs().amax(dim=1) / 127.0).clamp_(min=1e-30).to(torch.bfloat16).float()
        qweight[start : start + chunk_rows] = torch.round(w / s[:, None]).clamp_(-127, 127)
        scale[start : start + chunk_rows] = s
    return qweight, scale


def dequantize(qweight: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
    """The float32 weights an int8 layer computes with."""
    return qweight.float() * weight_scale[:, None]


def _check_schedule(schedule: KernelSchedule, input_size: int, name: str) -> KernelSchedule:
    """Kernels this layer and CPU cannot run are replaced: ``w8a16`` without the native
    GEMV by ``int8_wo``; ``int8_wo`` where K does not suit torch's kernel by ``dense``."""
    replace = {}
    if gemv.load_gemv() is None:
        replace[KERNEL_W8A16] = KERNEL_WEIGHT_ONLY
    if not weight_only_supported(input_size):
        replace[KERNEL_WEIGHT_ONLY] = KERNEL_DENSE
        if KERNEL_W8A16 in replace:
            replace[KERNEL_W8A16] = KERNEL_DENSE
    if not any(schedule.uses(kernel) for kernel in replace):
        return schedule
    steps: list[tuple[int | None, str]] = []
    for max_m, kernel in schedule.steps:
        kernel = replace.get(kernel, kernel)
        if steps and steps[-1][1] == kernel:
            steps[-1] = (max_m, kernel)  # merge runs: int8_wo:8,dense -> dense
        else:
            steps.append((max_m, kernel))
    return KernelSchedule(tuple(steps))


class Int8LinearMethod:
    """Runs a quantized ``Linear`` (``layer.qweight`` & co.) on the kernel its schedule
    names for the call's row count; output in the input's dtype."""

    def __init__(self, schedule: KernelSchedule) -> None:
        self.schedule = schedule

    def apply(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        kernel = self.schedule.kernel_for(x2.shape[0])
        if kernel == KERNEL_DENSE:
            return F.linear(x, layer.weight, layer.bias)
        if kernel == KERNEL_WEIGHT_ONLY:
            out = weight_only_mm(x2, layer.qweight, layer.weight_scale_bf16)
        elif kernel == KERNEL_W8A16:
            out = w8a16_mm(x2, layer.qweight, layer.weight_scale, layer.weight_sum)
        else:
            out = w8a8_mm(x2, layer.qweight, layer.weight_scale, weight_sum=layer.weight_sum)
            out = out.to(x.dtype)
        if layer.bias is not None:
            out.add_(layer.bias)
        return out.reshape(*shape[:-1], out.shape[-1])


class Int8LMHeadMethod:
    """Runs a quantized LM head; float32 logits, written into ``out`` (the runner's
    persistent float32 ``[N, vocab]`` buffer) when given, else into a new tensor.

    W8A8 lands its int32 products in that very memory and converts them in place; the
    weight-only path goes through a small staging chunk at a time, so no call makes a
    full-size temporary (whose fresh pages cost more than the conversion).
    """

    _STAGING_COLUMNS = 8192

    def __init__(self, schedule: KernelSchedule) -> None:
        self.schedule = schedule

    def apply(
        self,
        layer: nn.Module,
        hidden_states: torch.Tensor,
        dense_weight: torch.Tensor | None,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        kernel = self.schedule.kernel_for(hidden_states.shape[0])
        if kernel == KERNEL_W8A8:
            acc = out.view(torch.int32) if out is not None else None
            return w8a8_mm(
                hidden_states, layer.qweight, layer.weight_scale, out=acc,
                weight_sum=layer.weight_sum,
            )
        if kernel == KERNEL_DENSE:
            return linear_logits(hidden_states, dense_weight, out)
        if out is None:
            return weight_only_mm(hidden_states, layer.qweight, layer.weight_scale_bf16).float()
        vocab = out.shape[1]
        for start in range(0, vocab, self._STAGING_COLUMNS):
            end = min(start + self._STAGING_COLUMNS, vocab)
            part = weight_only_mm(
                hidden_states, layer.qweight[start:end], layer.weight_scale_bf16[start:end]
            )
            out[:, start:end].copy_(part)
        return out


def install_int8(
    layer: nn.Module,
    qweight: torch.Tensor,
    weight_scale: torch.Tensor,
    schedule: KernelSchedule,
    *,
    lm_head: bool = False,
    name: str = "",
) -> None:
    """Give ``layer`` its int8 tensors and method; drop its own unquantized weight when
    no row count runs ``dense`` (a tied LM head keeps the embedding's, which it does not own)."""
    num_rows, input_size = qweight.shape
    if qweight.dtype != torch.int8 or weight_scale.shape != (num_rows,):
        raise ValueError(f"{name}: expected int8 [N, K] weights and [N] scales")
    schedule = _check_schedule(schedule, input_size, name)
    layer.register_buffer("qweight", qweight, persistent=False)
    layer.register_buffer("weight_scale", weight_scale.float(), persistent=False)
    layer.register_buffer("weight_scale_bf16", weight_scale.to(torch.bfloat16), persistent=False)
    # Row sums for the native GEMV (None where no row count runs w8a8 or w8a16).
    needs_sum = schedule.uses(KERNEL_W8A8) or schedule.uses(KERNEL_W8A16)
    weight_sum = weight_row_sums(qweight) if needs_sum else None
    layer.register_buffer("weight_sum", weight_sum, persistent=False)
    layer.quant_method = Int8LMHeadMethod(schedule) if lm_head else Int8LinearMethod(schedule)
    own_weight = layer._parameters.get("weight")
    if own_weight is not None and not schedule.uses(KERNEL_DENSE):
        layer.weight = None
