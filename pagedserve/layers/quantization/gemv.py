"""The native W8A8 GEMV (``csrc/int8_gemv.cpp``): per-token int8 activations times int8
weights for up to 16 rows, streaming each weight row once (AVX512-VNNI ``vpdpbusd``).

:func:`load_gemv` builds it at first use (:mod:`pagedserve.native`) on CPUs with
AVX512-VNNI; elsewhere, or when the build fails, it returns None and ``w8a8`` runs
``torch._int_mm`` at every row count. Integer accumulation is exact, so the result equals
the ``_int_mm`` path up to float rounding of the scale multiplies.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from pathlib import Path

import torch

from pagedserve import envs, native, platform

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "int8_gemv.cpp"
_SYMBOL = "pagedserve_int8_gemv"
MAX_ROWS = 16


class Int8Gemv:
    """``ctypes`` binding of the C entry point, with the checks it relies on."""

    def __init__(self, path: Path) -> None:
        fn = getattr(ctypes.CDLL(str(path)), _SYMBOL)
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        fn.restype = ctypes.c_int
        fn.argtypes = [ptr, i64, ptr, ptr, ptr, ptr, i64, i64, i64, i64, ctypes.c_int]
        self._fn = fn

    def __call__(
        self,
        x: torch.Tensor,
        qweight: torch.Tensor,
        weight_scale: torch.Tensor,
        weight_sum: torch.Tensor,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """float32 ``[M, N]`` = ``quantize_per_token(x) @ qweight^T`` scaled, for ``x``
        ``[M <= 16, K]``; ``qweight`` int8 ``[N, K]`` contiguous, ``weight_scale`` float32
        ``[N]``, ``weight_sum`` int32 ``[N]`` (row sums of ``qweight``)."""
        num_rows, input_size = x.shape
        output_size = qweight.shape[0]
        if not 1 <= num_rows <= MAX_ROWS:
            raise ValueError(f"the GEMV takes 1..{MAX_ROWS} rows, got {num_rows}")
        if x.dtype != torch.float32 or x.stride(1) != 1:
            x = x.float().contiguous()
        if not (qweight.is_contiguous() and qweight.dtype == torch.int8
                and qweight.shape[1] == input_size):
            raise ValueError("qweight must be a contiguous int8 [N, K] matching x")
        if weight_scale.dtype != torch.float32 or weight_sum.dtype != torch.int32:
            raise ValueError("weight_scale must be float32 and weight_sum int32")
        if out is None:
            out = torch.empty(num_rows, output_size, dtype=torch.float32)
        elif out.dtype != torch.float32 or out.shape != (num_rows, output_size) or out.stride(1) != 1:
            raise ValueError(f"out must be float32 [{num_rows}, {output_size}] with unit stride")
        rc = self._fn(
            x.data_ptr(), x.stride(0), qweight.data_ptr(), weight_scale.contiguous().data_ptr(),
            weight_sum.contiguous().data_ptr(), out.data_ptr(), out.stride(0),
            num_rows, output_size, input_size, torch.get_num_threads(),
        )  # fmt: skip
        if rc != 0:
            raise RuntimeError(f"{_SYMBOL} returned {rc}")
        return out


_lock = threading.Lock()
_loaded: list[Int8Gemv | None] = []


def load_gemv() -> Int8Gemv | None:
    """The GEMV on CPUs with AVX512-VNNI (built on first call), else None."""
    with _lock:
        if not _loaded:
            _loaded.append(_load())
        return _loaded[0]


def _load() -> Int8Gemv | None:
    if envs.PAGEDSERVE_INT8_GEMV is False or platform.device().type != "cpu":
        return None
    if not {"avx512_vnni", "avx512bw"} <= platform.cpu_flags():
        return None
    try:
        path, _ = native.build_library(SOURCE)
        return Int8Gemv(path)
    except (OSError, native.NativeBuildError) as exc:
        logger.warning("int8 GEMV kernel unavailable, w8a8 uses torch._int_mm: %s", exc)
        return None
