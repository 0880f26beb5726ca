"""Int8 matmul kernels and which one runs at which number of rows.

Three ways to compute ``x @ W^T`` for a layer quantized to int8 per output channel
(symmetric, ``W ~= qweight * weight_scale[:, None]``):

- ``dense``: ``F.linear`` with the layer's unquantized weight in the model dtype.
- ``int8_wo`` (weight-only): ``torch._weight_int8pack_mm``, int8 weights and bf16
  activations (fp32 activations are converted to bf16 and back: its fp32 path runs at a
  few GFLOP/s). Reads half the bytes of bf16: the fast path where a step is memory-bound.
- ``w8a8``: activations quantized per token to int8 on the fly, ``torch._int_mm`` against
  the same int8 weights (transposed view: its M=1 path is a fast GEMV), int32 products
  scaled to float in place; up to 16 rows on AVX512-VNNI CPUs, the native GEMV of
  :mod:`~pagedserve.layers.quantization.gemv` instead (same integers, memory speed). The fastest where compute-bound, but activation rounding costs
  quality: on Gemma 3 270M it is fine for the LM head only (see docs/design.md).

- ``w8a16`` (AVX512-VNNI CPUs with the native GEMV only, up to 16 rows): activations as
  16-bit fixed point per token, two exact integer passes against the int8 weights at
  memory speed: weight-only int8 quality (a 16-bit row keeps finer steps than bf16's
  mantissa for all but its smallest entries), ~2x ``int8_wo``'s speed at one row.

Which kernel runs is a :class:`KernelSchedule` per layer kind (decoder linears, LM head):
a step function of the rows ``M`` in the call, chosen per CPU at start-up by
:func:`pagedserve.layers.quantization.selection.choose_int8_plan` or given by
``PAGEDSERVE_INT8_KERNELS``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pagedserve.layers.quantization import gemv

KERNEL_DENSE = "dense"
KERNEL_WEIGHT_ONLY = "int8_wo"
KERNEL_W8A8 = "w8a8"
KERNEL_W8A16 = "w8a16"
KERNELS = (KERNEL_DENSE, KERNEL_WEIGHT_ONLY, KERNEL_W8A16, KERNEL_W8A8)

# torch._weight_int8pack_mm's AVX-512 kernel reads past the row for K % 16 != 0 (garbage or
# a crash, measured on torch 2.13); stay well inside what it handles.
_WEIGHT_ONLY_K_MULTIPLE = 32


@dataclass(frozen=True)
class KernelSchedule:
    """Kernel per row count: ``steps[i] = (max_m, kernel)`` with increasing ``max_m``; the
    last step has ``max_m=None`` (every larger M). Written ``int8_wo:8,dense`` (int8_wo for
    M <= 8, dense above) or just ``w8a8`` (every M)."""

    steps: tuple[tuple[int | None, str], ...]

    def __post_init__(self) -> None:
        if not self.steps:
            raise ValueError("a kernel schedule needs at least one kernel")
        previous = 0
        for i, (max_m, kernel) in enumerate(self.steps):
            if kernel not in KERNELS:
                raise ValueError(
                    f"unknown int8 kernel {kernel!r}; choose from {', '.join(KERNELS)}"
                )
            last = i == len(self.steps) - 1
            if last != (max_m is None):
                raise ValueError(
                    "only the last kernel of a schedule is unbounded (kernel:max_m,...,kernel)"
                )
            if max_m is not None:
                if max_m <= previous:
                    raise ValueError(
                        f"row bounds must increase and be >= 1, got {max_m} after {previous}"
                    )
                previous = max_m

    @classmethod
    def single(cls, kernel: str) -> KernelSchedule:
        return cls(((None, kernel),))

    @classmethod
    def from_choices(cls, choices: list[tuple[int, str]]) -> KernelSchedule:
        """From the best kernel measured at increasing row counts: each M runs the kernel
        chosen at the smallest measured count >= M (the last choice beyond), runs merged."""
        steps: list[tuple[int | None, str]] = []
        for max_m, kernel in choices:
            if steps and steps[-1][1] == kernel:
                steps[-1] = (max_m, kernel)
            else:
                steps.append((max_m, kernel))
        steps[-1] = (None, steps[-1][1])
        return cls(tuple(steps))

    @classmethod
    def parse(cls, text: str) -> KernelSchedule:
        steps: list[tuple[int | None, str]] = []
        items = [item.strip() for item in text.split(",") if item.strip()]
        for i, item in enumerate(items):
            kernel, sep, bound = item.partition(":")
            if i == len(items) - 1:
                if sep:
                    raise ValueError(
                        f"the last kernel of {text!r} takes no bound (it runs every larger M)"
                    )
                steps.append((None, kernel.strip()))
                continue
            if not sep:
                raise ValueError(f"{item!r} in {text!r}: write kernel:max_m")
            try:
                steps.append((int(bound), kernel.strip()))
            except ValueError:
                raise ValueError(f"{item!r} in {text!r}: max_m must be an integer") from None
        return cls(tuple(steps))

    def kernel_for(self, num_rows: int) -> str:
        for max_m, kernel in self.steps:
            if max_m is None or num_rows <= max_m:
                return kernel
        raise AssertionError("unreachable: the last step is unbounded")

    def uses(self, kernel: str) -> bool:
        return any(k == kernel for _, k in self.steps)

    def __str__(self) -> str:
        return ",".join(k if m is None else f"{k}:{m}" for m, k in self.steps)


@dataclass(frozen=True)
class Int8KernelPlan:
    """The kernel schedules of one engine: decoder linears and the LM head."""

    linear: KernelSchedule
    lm_head: KernelSchedule
    source: str = "measured"  # or the environment variable that set it

    @classmethod
    def parse(cls, text: str, source: str) -> Int8KernelPlan:
        """``linear=int8_wo:8,dense;lm_head=w8a8`` (a part left out: that layer kind's default)."""
        parts: dict[str, KernelSchedule] = {}
        for part in text.split(";"):
            if not part.strip():
                continue
            name, sep, schedule = part.partition("=")
            name = name.strip()
            if not sep or name not in ("linear", "lm_head"):
                raise ValueError(f"{part!r}: write linear=<schedule> and/or lm_head=<schedule>")
            parts[name] = KernelSchedule.parse(schedule)
        return cls(
            linear=parts.get(
                "linear", KernelSchedule.parse(f"{KERNEL_WEIGHT_ONLY}:8,{KERNEL_DENSE}")
            ),
            lm_head=parts.get("lm_head", KernelSchedule.single(KERNEL_W8A8)),
            source=source,
        )

    def __str__(self) -> str:
        return f"linear={self.linear};lm_head={self.lm_head}"


def weight_only_supported(input_size: int) -> bool:
    """Whether ``torch._weight_int8pack_mm`` handles rows of ``input_size`` (K)."""
    return input_size % _WEIGHT_ONLY_K_MULTIPLE == 0


# ---------------------------------------------------------------------------------------
# Kernels. ``x`` is [M, K]; ``qweight`` is int8 [N, K]; scales are per output channel.


def weight_only_mm(
    x: torch.Tensor, qweight: torch.Tensor, scale_bf16: torch.Tensor
) -> torch.Tensor:
    """``x @ dequant(qweight)^T`` in x's dtype, through bf16 activations."""
    if x.stride(-1) != 1:  # the kernel needs unit stride along K (rows may be strided)
        x = x.contiguous()
    if x.dtype == torch.bfloat16:
        return torch._weight_int8pack_mm(x, qweight, scale_bf16)
    return torch._weight_int8pack_mm(x.to(torch.bfloat16), qweight, scale_bf16).to(x.dtype)


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8 activations: ``(xq int8 [M, K], scale float32 [M, 1])``."""
    xf = x.float()
    scale = (xf.abs().amax(dim=1, keepdim=True) / 127.0).clamp_(min=1e-12)
    return torch.round(xf / scale).to(torch.int8), scale


def w8a8_mm(
    x: torch.Tensor,
    qweight: torch.Tensor,
    weight_scale: torch.Tensor,
    out: torch.Tensor | None = None,
    weight_sum: torch.Tensor | None = None,
) -> torch.Tensor:
    """Float32 ``x @ dequant(qweight)^T`` with per-token int8 activations.

    Up to :data:`gemv.MAX_ROWS` rows, with ``weight_sum`` (int32 row sums of ``qweight``)
    and where the native GEMV is available (AVX512-VNNI), that kernel runs: it streams the
    weights once at memory speed, where ``_int_mm`` does not. Otherwise the int32 products
    of ``_int_mm`` land in ``out`` (int32 [M, N], or a new tensor) and become float32 in
    place, in the same memory: no second full-size temporary. (A mixed int32 * float32
    multiply is not vectorized in torch: converting first and scaling in place is ~4x
    faster.) With ``M == 1`` the token's scale folds into the channel scales.
    """
    if weight_sum is not None and x.shape[0] <= gemv.MAX_ROWS:
        kernel = gemv.load_gemv()
        if kernel is not None:
            return kernel(
                x, qweight, weight_scale, weight_sum,
                out=None if out is None else out.view(torch.float32),
            )  # fmt: skip
    xq, x_scale = quantize_per_token(x)
    if out is None:
        acc = torch._int_mm(xq, qweight.t())
    else:
        acc = torch._int_mm(xq, qweight.t(), out=out)
    result = acc.view(torch.float32)
    result.copy_(acc)
    if x.shape[0] == 1:
        return result.mul_(weight_scale * x_scale[0])
    return result.mul_(weight_scale).mul_(x_scale)


def w8a16_mm(
    x: torch.Tensor, qweight: torch.Tensor, weight_scale: torch.Tensor, weight_sum: torch.Tensor
) -> torch.Tensor:
    """``x @ dequant(qweight)^T`` in x's dtype (float32 or bf16) with 16-bit fixed-point
    activations, on the native GEMV (16 rows per call). Needs :func:`gemv.load_gemv`."""
    kernel = gemv.load_gemv()
    if kernel is None:
        raise RuntimeError("w8a16 needs the native GEMV (AVX512-VNNI and a C++ compiler)")
    out_dtype = x.dtype if x.dtype in (torch.float32, torch.bfloat16) else torch.float32
    if x.shape[0] <= gemv.MAX_ROWS:
        return kernel(x, qweight, weight_scale, weight_sum, act_bits=16, out_dtype=out_dtype)
    out = torch.empty(x.shape[0], qweight.shape[0], dtype=out_dtype)
    for start in range(0, x.shape[0], gemv.MAX_ROWS):
        rows = slice(start, start + gemv.MAX_ROWS)
        kernel(x[rows], qweight, weight_scale, weight_sum, out=out[rows], act_bits=16)
    return out


def weight_row_sums(qweight: torch.Tensor) -> torch.Tensor:
    """int32 ``[N]`` row sums of int8 weights (what the native GEMV subtracts its
    activation offset with)."""
    return qweight.sum(dim=1, dtype=torch.int32)
