"""The paged-attention CPU kernel (``csrc/paged_attention.cpp``): built once, cached, loaded.

Built at first use by :mod:`pagedserve.native` (keyed by source, compiler, flags and CPU
features; ``-ffast-math`` for compilation only), loaded with ``ctypes``. Without a
compiler, or when the build fails, :func:`load_kernel` returns None with the reason and
attention uses the pure-torch backend. The thread count is torch's, passed on every call.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from pagedserve import native

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "paged_attention.cpp"
_SYMBOL = "pagedserve_paged_attention"
_COMPILE_FLAGS = (*native.BASE_FLAGS, "-ffast-math")
# dtype codes of the C entry point
_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1}


@dataclass(frozen=True)
class KernelLoad:
    """The loaded kernel, or why there is none."""

    kernel: PagedAttentionKernel | None
    reason: str


class PagedAttentionKernel:
    """``ctypes`` binding of the C entry point, with the checks it relies on."""

    def __init__(self, path: Path) -> None:
        self.path = path
        fn = getattr(ctypes.CDLL(str(path)), _SYMBOL)
        i64, i32, ptr, f32 = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p, ctypes.c_float
        fn.restype = i32
        fn.argtypes = [
            i32, ptr, i64, ptr, i64,  # dtype, query, q_stride, out, out_stride
            ptr, ptr, ptr, i64,  # k_cache, v_cache, block_table, bt_stride
            ptr, ptr, ptr, i64,  # token_idx, req_row, ctx_len, n_items
            i32, i32, i32, i32,  # num_heads, num_kv_heads, head_dim, block_size
            f32, f32, i64, i32,  # scale, softcap, window, num_threads
        ]
        self._fn = fn

    def __call__(
        self,
        query: torch.Tensor,
        output: torch.Tensor,
        kv_cache: torch.Tensor,
        block_table: torch.Tensor,
        token_idx: torch.Tensor,
        req_row: torch.Tensor,
        ctx_len: torch.Tensor,
        scale: float,
        softcap: float | None,
        sliding_window: int | None,
    ) -> None:
        """Attention of query rows ``token_idx`` ([n] int64) over their contexts, in place.

        ``query``/``output`` ``[T, H, D]`` (rows may be strided, heads must not be);
        ``kv_cache`` ``[2, num_blocks, block_size, Hkv, D]`` contiguous; row ``req_row[i]``
        of ``block_table`` (int32; rows may be strided) holds item ``i``'s blocks, and it
        sees key positions ``[ctx_len[i] - sliding_window, ctx_len[i])`` (clipped at 0).
        Writes ``output``'s rows ``token_idx``.
        """
        _, num_heads, head_dim = query.shape
        _, _, block_size, num_kv_heads, _ = kv_cache.shape
        for t in (query, output):
            if t.stride(2) != 1 or t.stride(1) != head_dim:
                raise ValueError("query/output heads must be contiguous rows of head_dim")
        if not kv_cache.is_contiguous() or block_table.stride(1) != 1:
            raise ValueError("kv_cache must be contiguous, block_table rows too")
        if block_table.dtype != torch.int32 or not (kv_cache.dtype == query.dtype == output.dtype):
            raise ValueError("block_table must be int32; query, output, cache one dtype")
        if query.dtype not in _DTYPE_CODES or query.device.type != "cpu":
            raise ValueError(f"the kernel takes float32/bfloat16 CPU tensors, not {query.dtype}")
        for t in (token_idx, req_row, ctx_len):
            if t.dtype != torch.int64 or not t.is_contiguous():
                raise ValueError("token_idx, req_row, ctx_len must be contiguous int64")
        rc = self._fn(
            _DTYPE_CODES[query.dtype], query.data_ptr(), query.stride(0),
            output.data_ptr(), output.stride(0),
            kv_cache[0].data_ptr(), kv_cache[1].data_ptr(),
            block_table.data_ptr(), block_table.stride(0),
            token_idx.data_ptr(), req_row.data_ptr(), ctx_len.data_ptr(), token_idx.numel(),
            num_heads, num_kv_heads, head_dim, block_size,
            scale, softcap or 0.0, sliding_window or 0, torch.get_num_threads(),
        )  # fmt: skip
        if rc != 0:
            raise RuntimeError(f"{_SYMBOL} returned {rc} (dtype {query.dtype})")


_lock = threading.Lock()
_loaded: KernelLoad | None = None


def load_kernel() -> KernelLoad:
    """The kernel, built on first call in this cache folder if needed (thread-safe)."""
    global _loaded
    with _lock:
        if _loaded is None:
            _loaded = _load()
        return _loaded


def _load() -> KernelLoad:
    try:
        path, compiler = native.build_library(SOURCE, _COMPILE_FLAGS)
        return KernelLoad(PagedAttentionKernel(path), f"built with {compiler}")
    except (OSError, native.NativeBuildError) as exc:
        logger.warning("Paged-attention CPU kernel unavailable: %s", exc)
        return KernelLoad(None, f"kernel build failed: {str(exc).splitlines()[0]}")
