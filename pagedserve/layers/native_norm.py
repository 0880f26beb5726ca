"""The fused bf16 RMSNorm kernel (``csrc/rms_norm.cpp``): one native call per norm instead
of the ~7 torch ops of the bf16 path in :mod:`pagedserve.layers.layernorm`, with the
residual add fused where the model adds one right after the norm.

At a decode step the norms' tensors are tiny (one or a few rows of 640) and their time is
op dispatch, not arithmetic: Gemma 3 runs 5 norms per layer. :func:`load_rms_norm` builds
the kernel at first use (:mod:`pagedserve.native`) on CPU; elsewhere, when the build
fails, or with ``PAGEDSERVE_NATIVE_NORM=0`` it returns None and the torch ops run. float32
never uses it (the parity tests need transformers' exact op sequence).
"""

from __future__ import annotations

import ctypes
from functools import lru_cache
from pathlib import Path

import torch

from pagedserve import envs, native, platform

SOURCE = Path(__file__).parent / "csrc" / "rms_norm.cpp"
_SYMBOL = "pagedserve_rms_norm"
MODE_GEMMA = 0  # x * inv * (1 + weight), rounded once
MODE_LLAMA = 1  # bf16(x * inv) * weight


class RMSNormKernel:
    """``ctypes`` binding; callers pass tensors in the layouts the kernel documents."""

    def __init__(self, path: Path) -> None:
        fn = getattr(ctypes.CDLL(str(path)), _SYMBOL)
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        fn.restype = ctypes.c_int
        fn.argtypes = [ptr, i64, ptr, ptr, i64, ptr, i64, i64, i64, i64, ctypes.c_float,
                       ctypes.c_int, ctypes.c_int]
        self._fn = fn

    def __call__(
        self,
        x: torch.Tensor,
        factor: torch.Tensor,
        eps: float,
        mode: int,
        residual: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Normalize ``x`` (bf16 ``[T, D]`` or ``[T, R, D]``, rows of D contiguous) by
        ``factor`` (float32 ``[D]`` or ``[R, D]``); plus ``residual`` (bf16 like ``x``,
        2-D only) if given. Returns a new contiguous bf16 tensor shaped like ``x``."""
        three_d = x.dim() == 3
        x3 = x if three_d else x.unsqueeze(1)
        num_tokens, num_rows, dim = x3.shape
        if x3.stride(2) != 1 or (num_rows > 1 and x3.stride(1) != dim):
            x3 = x3.contiguous()
        factor_rows = 1 if factor.dim() == 1 else factor.shape[0]
        out = torch.empty((num_tokens, num_rows, dim), dtype=torch.bfloat16)
        res_ptr, res_stride = 0, 0
        if residual is not None:
            if three_d or residual.shape != x.shape or residual.stride(1) != 1:
                raise ValueError("the residual must be a [T, D] tensor with unit inner stride")
            res_ptr, res_stride = residual.data_ptr(), residual.stride(0)
        rc = self._fn(
            x3.data_ptr(), x3.stride(0), out.data_ptr(), res_ptr, res_stride,
            factor.data_ptr(), factor_rows, num_tokens, num_rows, dim, eps, mode,
            torch.get_num_threads(),
        )  # fmt: skip
        if rc != 0:
            raise RuntimeError(f"{_SYMBOL} returned {rc}")
        return out if three_d else out.view(num_tokens, dim)


@lru_cache(maxsize=1)
def load_rms_norm() -> RMSNormKernel | None:
    """The kernel on CPU (built on first call), else None."""
    if envs.PAGEDSERVE_NATIVE_NORM is False or platform.device().type != "cpu":
        return None
    return native.load_library(SOURCE, RMSNormKernel, "fused RMSNorm kernel (norms run as torch ops)")
