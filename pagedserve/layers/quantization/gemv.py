"""The native int8-weight GEMV (``csrc/int8_gemv.cpp``) for up to 16 rows, streaming each
weight row once per 8 rows (AVX512-VNNI ``vpdpbusd``): per-token int8 activations
(``w8a8``) or 16-bit fixed-point activations (``w8a16``: two integer passes, weight-only
int8 quality).

:func:`load_gemv` builds it at first use (:mod:`pagedserve.native`) on CPUs with
AVX512-VNNI; elsewhere, or when the build fails, it returns None: ``w8a8`` runs
``torch._int_mm`` at every row count and ``w8a16`` is not offered. Integer accumulation is
exact, so the 8-bit result equals the ``_int_mm`` path up to float rounding of the scale
multiplies.
"""

from __future__ import annotations

import ctypes
from functools import lru_cache
from pathlib import Path

import torch

from pagedserve import envs, native, platform

SOURCE = Path(__file__).parent / "csrc" / "int8_gemv.cpp"
_SYMBOL = "pagedserve_int8_gemv"
MAX_ROWS = 16


_X_DTYPES = {torch.float32: 0, torch.bfloat16: 1}


class Int8Gemv:
    """``ctypes`` binding of the C entry point, with the checks it relies on."""

    def __init__(self, path: Path) -> None:
        fn = getattr(ctypes.CDLL(str(path)), _SYMBOL)
        i64, i32, ptr = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
        fn.restype = i32
        fn.argtypes = [i32, ptr, i64, ptr, ptr, ptr, i32, ptr, i64, i64, i64, i64, i32, i32]
        self._fn = fn

    def __call__(
        self,
        x: torch.Tensor,
        qweight: torch.Tensor,
        weight_scale: torch.Tensor,
        weight_sum: torch.Tensor,
        out: torch.Tensor | None = None,
        act_bits: int = 8,
        out_dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """``[M, N]`` = ``x @ dequant(qweight)^T`` with ``x`` ``[M <= 16, K]`` (float32 or
        bf16) quantized per row to ``act_bits`` (8: as ``quantize_per_token``; 16: 16-bit
        fixed point, weight-only quality); ``qweight`` int8 ``[N, K]`` contiguous,
        ``weight_scale`` float32 ``[N]``, ``weight_sum`` int32 ``[N]`` (row sums of
        ``qweight``). Output float32 or bf16 (``out_dtype``, or ``out``'s dtype)."""
        num_rows, input_size = x.shape
        output_size = qweight.shape[0]
        if not 1 <= num_rows <= MAX_ROWS:
            raise ValueError(f"the GEMV takes 1..{MAX_ROWS} rows, got {num_rows}")
        if act_bits not in (8, 16):
            raise ValueError(f"act_bits must be 8 or 16, got {act_bits}")
        if x.dtype not in _X_DTYPES:
            x = x.float()
        if x.stride(1) != 1:
            x = x.contiguous()
        if not (qweight.is_contiguous() and qweight.dtype == torch.int8
                and qweight.shape[1] == input_size):
            raise ValueError("qweight must be a contiguous int8 [N, K] matching x")
        if weight_scale.dtype != torch.float32 or weight_sum.dtype != torch.int32:
            raise ValueError("weight_scale must be float32 and weight_sum int32")
        if out is None:
            out = torch.empty(num_rows, output_size, dtype=out_dtype)
        elif (out.dtype not in _X_DTYPES or out.shape != (num_rows, output_size)
              or out.stride(1) != 1):
            raise ValueError(
                f"out must be float32 or bf16 [{num_rows}, {output_size}] with unit stride"
            )
        rc = self._fn(
            _X_DTYPES[x.dtype], x.data_ptr(), x.stride(0), qweight.data_ptr(),
            weight_scale.contiguous().data_ptr(), weight_sum.contiguous().data_ptr(),
            int(out.dtype == torch.bfloat16), out.data_ptr(), out.stride(0),
            num_rows, output_size, input_size, act_bits, torch.get_num_threads(),
        )  # fmt: skip
        if rc != 0:
            raise RuntimeError(f"{_SYMBOL} returned {rc}")
        return out


@lru_cache(maxsize=1)
def load_gemv() -> Int8Gemv | None:
    """The GEMV on CPUs with AVX512-VNNI (built on first call), else None."""
    if envs.PAGEDSERVE_INT8_GEMV is False or platform.device().type != "cpu":
        return None
    if not {"avx512_vnni", "avx512bw"} <= platform.cpu_flags():
        return None
    return native.load_library(SOURCE, Int8Gemv, "int8 GEMV kernel (w8a8 uses torch._int_mm, no w8a16)")
