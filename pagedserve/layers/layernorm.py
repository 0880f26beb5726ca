"""RMSNorm variants, numerically as transformers computes them.

float32 runs transformers' exact op sequence (mean of squares, ``rsqrt``, scale), so
fp32 greedy parity stays bit for bit; it only skips the no-op casts and keeps
``1 + weight`` (Gemma) cached instead of recomputing it per call.

Reduced precision (bf16) keeps transformers' rounding structure (normalize and scale in
float32, round to bf16 once; Llama then scales by its bf16 weight) with fewer passes and
no casts of the weight: the sum of squares is one float32-accumulating reduction straight
from bf16 (``vector_norm(dtype=float32)``, no squared temporary), the per-row factor a
``[T, 1]`` op, and the one upcast feeds in-place float32 multiplies. Results equal
transformers' up to float32 rounding order (rarely one bf16 ulp apart). A single
mixed-dtype multiply (bf16 times a float32 scale, rounded once) would save the upcast
but runs unvectorized on CPU: slower from a few hundred rows on (prefill).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from pagedserve.layers.linear import default_weight_loader
from pagedserve.layers.native_norm import MODE_GEMMA, MODE_LLAMA, RMSNormKernel, load_rms_norm

_WeightKey = tuple[int, int, torch.dtype, torch.device]


def weight_key(weight: torch.Tensor) -> _WeightKey:
    """Identifies the weight's current values: storage, in-place version, dtype, device."""
    try:
        version = weight._version
    except RuntimeError:  # inference tensors carry no version counter
        version = -1
    return (weight.data_ptr(), version, weight.dtype, weight.device)


def _inv_rms(x: torch.Tensor, consts: NormConstants) -> torch.Tensor:
    """``rsqrt(mean(x ** 2) + eps)`` over the last dim, float32 ``[..., 1]``, computed as
    ``sqrt(D) / sqrt(sum(x ** 2) + D * eps)`` from one float32-accumulating reduction."""
    norm = torch.linalg.vector_norm(x, 2, dim=-1, keepdim=True, dtype=torch.float32)
    return torch.div(consts.sqrt_d, torch.hypot(norm, consts.sqrt_d_eps))


def gemma_rms_norm(x: torch.Tensor, consts: NormConstants, eps: float) -> torch.Tensor:
    """``x * rsqrt(mean(x ** 2) + eps) * (1 + weight)`` in float32, cast to ``x.dtype``.

    ``consts.factor`` is ``1 + weight`` in float32: ``[D]``, or ``[..., D]`` broadcasting
    over leading dims (one row per head for a joint q/k norm).
    """
    assert consts.factor is not None
    if x.dtype == torch.float32:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * consts.factor
    return x.float().mul_(_inv_rms(x, consts)).mul_(consts.factor).to(x.dtype)


def _native_kernel(x: torch.Tensor) -> RMSNormKernel | None:
    """The fused kernel for bf16 CPU activations (None: use the torch ops)."""
    if x.dtype != torch.bfloat16 or x.device.type != "cpu":
        return None
    return load_rms_norm()


class NormConstants:
    """float32 tensors derived from a norm's weight, for one weight version."""

    __slots__ = ("factor", "native_factor", "sqrt_d", "sqrt_d_eps")

    def __init__(
        self,
        factor: torch.Tensor | None,
        hidden_size: int,
        eps: float,
        device: torch.device,
        native_factor: torch.Tensor | None = None,
    ) -> None:
        # Gemma: 1 + weight (float32); Llama: None (its weight scales after the cast).
        self.factor = factor
        # What the fused kernel scales by (float32, contiguous): Gemma 1 + weight, Llama weight.
        self.native_factor = (factor if native_factor is None else native_factor)
        if self.native_factor is not None:
            self.native_factor = self.native_factor.float().contiguous()
        self.sqrt_d = torch.tensor(math.sqrt(hidden_size), dtype=torch.float32, device=device)
        self.sqrt_d_eps = torch.tensor(
            math.sqrt(hidden_size * eps), dtype=torch.float32, device=device
        )


class RMSNorm(nn.Module):
    """Llama-style RMSNorm: normalize in float32, cast back, then scale by ``weight``.

    bf16 on CPU runs the fused native kernel (:mod:`pagedserve.layers.native_norm`), one
    call instead of several torch ops, rounding as the torch path does.
    """

    native_mode = MODE_LLAMA

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(hidden_size), requires_grad=False)
        self.weight.weight_loader = default_weight_loader
        self._constants_key: _WeightKey | None = None
        self._constants: NormConstants | None = None

    def weight_factor(self) -> torch.Tensor | None:
        """What scales the normalized values in float32 (Gemma: ``1 + weight``); None when
        the weight scales after the cast back (Llama)."""
        return None

    def constants(self) -> NormConstants:
        """The float32 constants of the current weight (recomputed when it changes)."""
        key = weight_key(self.weight)
        if self._constants is None or key != self._constants_key:
            self._constants = NormConstants(
                self.weight_factor(), self.hidden_size, self.eps, self.weight.device,
                native_factor=self.weight.detach(),
            )
            self._constants_key = key
        return self._constants

    def forward_add(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """``norm(x) + residual`` with the norm's output rounded to x's dtype before the
        add (``self(x).add_(residual)``), fused into the kernel for bf16 on CPU."""
        kernel = _native_kernel(x)
        if kernel is not None:
            constants = self.constants()
            return kernel(x, constants.native_factor, self.eps, self.native_mode, residual)
        return self(x).add_(residual)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel = _native_kernel(x)
        if kernel is not None:
            return kernel(x, self.constants().native_factor, self.eps, self.native_mode)
        if x.dtype == torch.float32:
            return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))
        return self.weight * x.float().mul_(_inv_rms(x, self.constants())).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class GemmaRMSNorm(RMSNorm):
    """Gemma RMSNorm: ``x_norm * (1 + weight)`` all in float32, then cast back.

    The checkpoint stores ``weight`` centred on 0 (transformers' convention).
    """

    native_mode = MODE_GEMMA

    def weight_factor(self) -> torch.Tensor:
        return 1.0 + self.weight.float()

    def constants(self) -> NormConstants:
        key = weight_key(self.weight)
        if self._constants is None or key != self._constants_key:
            self._constants = NormConstants(
                self.weight_factor(), self.hidden_size, self.eps, self.weight.device
            )
            self._constants_key = key
        return self._constants

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel = _native_kernel(x)
        if kernel is not None:
            return kernel(x, self.constants().native_factor, self.eps, self.native_mode)
        return gemma_rms_norm(x, self.constants(), self.eps)


class StackedGemmaNorms:
    """Several Gemma norms over the same size applied in one call, one factor row per head.

    ``norms`` pairs each norm with the number of heads it covers, in order: q and k heads
    of ``[T, H + Hkv, D]`` are normalized together (per row, so the values are those of
    the separate norms). The stacked factors are rebuilt when a weight changes.
    """

    def __init__(self, norms: list[tuple[GemmaRMSNorm, int]]) -> None:
        self.norms = norms
        self._key: tuple[_WeightKey, ...] | None = None
        self._constants: NormConstants | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        first = self.norms[0][0]
        kernel = _native_kernel(x)
        if kernel is not None:
            return kernel(x, self.constants().native_factor, first.eps, MODE_GEMMA)
        return gemma_rms_norm(x, self.constants(), first.eps)

    def constants(self) -> NormConstants:
        key = tuple(weight_key(norm.weight) for norm, _ in self.norms)
        if self._constants is None or key != self._key:
            first = self.norms[0][0]
            rows = [norm.weight_factor().expand(count, -1) for norm, count in self.norms]
            self._constants = NormConstants(
                torch.cat(rows), first.hidden_size, first.eps, first.weight.device
            )
            self._key = key
        return self._constants
