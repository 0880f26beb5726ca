"""The paged-attention CPU kernel (``csrc/paged_attention.cpp``): built once, cached, loaded.

The kernel has a plain C entry point and includes no torch header, so it compiles in about
two seconds with the system C++ compiler (``$CXX``, else ``g++``/``c++``/``clang++``) and
needs nothing at ``pip install`` time. It is built at first use into
``$PAGEDSERVE_CACHE_DIR/kernels/`` under a name keyed by the source, the compiler, the flags
and the CPU's features (it is built with ``-march=native``), then loaded with ``ctypes``;
later starts only load it. Without a compiler, or when the build fails, :func:`load_kernel`
returns None with the reason and attention uses the pure-torch backend.

OpenMP: the library links ``libgomp.so.1``; torch's own copy (same soname, already loaded)
serves it, so the kernel and torch share one thread pool. The thread count is torch's,
passed on every call. ``-ffast-math`` applies to compilation only: linking with it would
pull in ``crtfastmath.o``, which flushes denormals process-wide when the library loads.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from pagedserve import envs, platform

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "paged_attention.cpp"
_SYMBOL = "pagedserve_paged_attention"
_COMPILE_FLAGS = ("-O3", "-march=native", "-ffast-math", "-fopenmp", "-fPIC", "-std=c++17")
_BUILD_TIMEOUT_S = 300
# dtype codes of the C entry point
_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1}


@dataclass(frozen=True)
class KernelLoad:
    """The loaded kernel, or why there is none."""

    kernel: PagedAttentionKernel | None
    reason: str


def _compiler() -> str | None:
    for candidate in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if candidate and shutil.which(candidate):
            return shutil.which(candidate)
    return None


def _torch_lib_dir() -> Path:
    return Path(torch.__file__).parent / "lib"


def _build_key(compiler: str) -> str:
    try:
        version = subprocess.run(
            [compiler, "--version"], capture_output=True, text=True, timeout=30
        ).stdout
    except (OSError, subprocess.SubprocessError):
        version = ""
    digest = hashlib.sha256()
    for part in (
        SOURCE.read_bytes(),
        compiler.encode(),
        version.encode(),
        " ".join(_COMPILE_FLAGS).encode(),
        " ".join(sorted(platform.cpu_flags())).encode(),
        str(_torch_lib_dir()).encode(),
    ):
        digest.update(part)
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def _build(compiler: str, target: Path) -> None:
    """Compile and link into ``target`` atomically (concurrent builders do not collide)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".build-") as tmp:
        obj = Path(tmp) / "paged_attention.o"
        lib = Path(tmp) / target.name
        link = ["-shared", "-fopenmp", "-o", str(lib), str(obj), "-lm"]
        torch_lib = _torch_lib_dir()
        if (torch_lib / "libgomp.so.1").exists():
            link += [f"-Wl,-rpath,{torch_lib}"]
        for command in (
            [compiler, *_COMPILE_FLAGS, "-c", "-o", str(obj), str(SOURCE)],
            [compiler, *link],
        ):
            result = subprocess.run(
                command, capture_output=True, text=True, timeout=_BUILD_TIMEOUT_S
            )
            if result.returncode != 0:
                raise RuntimeError(
                    f"{' '.join(command[:2])} ... failed:\n{result.stderr.strip()[-2000:]}"
                )
        os.replace(lib, target)


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
    compiler = _compiler()
    if compiler is None:
        return KernelLoad(None, "no C++ compiler found (set CXX)")
    target = Path(envs.PAGEDSERVE_CACHE_DIR) / "kernels" / f"paged_attention-{_build_key(compiler)}.so"
    try:
        if not target.exists():
            logger.info("Building the paged-attention CPU kernel (once) into %s", target)
            _build(compiler, target)
        return KernelLoad(PagedAttentionKernel(target), f"built with {Path(compiler).name}")
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        logger.warning("Paged-attention CPU kernel unavailable: %s", exc)
        return KernelLoad(None, f"kernel build failed: {str(exc).splitlines()[0]}")
