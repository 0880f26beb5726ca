"""The one place that knows the device: dtype support, memory, threads, ISA."""

from __future__ import annotations

import json
import logging
import os
import time
from functools import lru_cache
from pathlib import Path

import torch

from pagedserve import envs

logger = logging.getLogger(__name__)


@lru_cache(maxsize=1)
def device() -> torch.device:
    """The device the engine computes on: CUDA when present, else CPU."""
    forced = envs.PAGEDSERVE_DEVICE
    if forced:
        return torch.device(forced)
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def is_cuda() -> bool:
    return device().type == "cuda"


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


@lru_cache(maxsize=1)
def cpu_model_name() -> str:
    """The CPU's model name from /proc/cpuinfo ("" when unknown)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def cpu_isa() -> str:
    """Best matmul ISA of this CPU, as a short label for the start-up banner."""
    flags = cpu_flags()
    if "amx_bf16" in flags:
        return "AMX-BF16"
    if "avx512_bf16" in flags:
        return "AVX512-BF16"
    if "avx512f" in flags:
        return "AVX-512"
    if "avx2" in flags:
        return "AVX2"
    return "generic"


def resolve_dtype(dtype: str | torch.dtype) -> tuple[torch.dtype, str]:
    """Resolve a dtype name ("auto", "bfloat16", ...) to a torch dtype and a reason."""
    if isinstance(dtype, torch.dtype):
        return dtype, "given"
    name = dtype.lower()
    aliases = {
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float32": torch.float32,
        "fp32": torch.float32,
        "float": torch.float32,
        "float16": torch.float16,
        "fp16": torch.float16,
        "half": torch.float16,
    }
    if name == "auto":
        if is_cuda():
            return torch.bfloat16, "CUDA device"
        return choose_cpu_dtype()
    if name not in aliases:
        raise ValueError(
            f"Unknown dtype {dtype!r}; choose one of auto, bfloat16, float32, float16."
        )
    resolved = aliases[name]
    if resolved == torch.float16 and not is_cuda():
        raise ValueError("dtype float16 is supported on CUDA only; use bfloat16 or float32 on CPU.")
    return resolved, "requested"


# bfloat16 must beat float32's matmul rate by this factor to be chosen by "auto": its
# rounding costs a little quality (+0.1% perplexity on Gemma 3 270M, docs/design.md).
BF16_MIN_SPEEDUP = 1.2
# A decoder-sized matmul (rows x in -> out): what prefill and batched decode spend time on.
_PROBE_SHAPE = (64, 640, 2048)
_DTYPE_CACHE_FILE = "dtype_choice.json"


def _measure_bf16_speedup() -> float:
    """float32 time / bfloat16 time of one decoder-sized matmul, best of several runs."""
    rows, k, n = _PROBE_SHAPE
    generator = torch.Generator().manual_seed(0)
    x32, w32 = torch.randn(rows, k, generator=generator), torch.randn(n, k, generator=generator)
    best = {}
    for dtype in (torch.float32, torch.bfloat16, torch.float32, torch.bfloat16):
        x, w = x32.to(dtype), w32.to(dtype)
        torch.nn.functional.linear(x, w)  # warm-up: packing, thread pool
        timings = []
        for _ in range(8):
            start = time.perf_counter()
            for _ in range(4):
                torch.nn.functional.linear(x, w)
            timings.append(time.perf_counter() - start)
        best[dtype] = min(best.get(dtype, float("inf")), min(timings))
    return best[torch.float32] / best[torch.bfloat16]


def choose_cpu_dtype() -> tuple[torch.dtype, str]:
    """``dtype=auto`` on CPU: bfloat16 where its matmuls measure at least
    ``BF16_MIN_SPEEDUP`` x float32's (AMX and AVX512-BF16 CPUs: 2-4x), else float32 (on
    CPUs without native bf16 it is emulated and slower). Measured once per CPU, thread
    count and torch version (~0.1 s) and cached in the cache dir, so a start never changes
    its dtype because the machine was busy; ``--dtype`` overrides."""
    key = f"{cpu_model_name()}|{cpu_isa()}|threads={torch.get_num_threads()}|torch={torch.__version__}"
    path = Path(envs.PAGEDSERVE_CACHE_DIR) / _DTYPE_CACHE_FILE
    try:
        speedup = float(json.loads(path.read_text())[key])
        source = "measured, cached"
    except (OSError, ValueError, KeyError, TypeError):
        speedup = _measure_bf16_speedup()
        source = "measured"
        store_measurement(path, key, round(speedup, 3), "the dtype measurement")
    dtype = torch.bfloat16 if speedup >= BF16_MIN_SPEEDUP else torch.float32
    return dtype, f"{cpu_isa()}: bf16 matmuls {speedup:.1f}x float32's ({source})"


def store_measurement(path: Path, key: str, value: object, what: str) -> None:
    """Add ``key: value`` to the JSON file of per-machine measurements at ``path``
    (written atomically: concurrent starts never read half a file); a failure to write
    only logs a warning, naming ``what`` was not cached."""
    try:
        entries = json.loads(path.read_text()) if path.exists() else {}
    except (OSError, ValueError):
        entries = {}
    entries[key] = value
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(entries, indent=1))
        os.replace(tmp, path)
    except OSError as exc:
        logger.warning("could not cache %s in %s: %s", what, path, exc)


def available_memory_bytes() -> int:
    """Free memory on the compute device."""
    if is_cuda():
        free, _total = torch.cuda.mem_get_info()
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 << 30


def num_threads() -> int:
    return torch.get_num_threads()


def configure_threads(requested: int | None = None) -> int:
    """Give torch the cores (engine core); returns the thread count in use."""
    if requested is None:
        requested = envs.PAGEDSERVE_NUM_THREADS
    if requested is not None and requested > 0:
        torch.set_num_threads(requested)
    return torch.get_num_threads()


def synchronize() -> None:
    if is_cuda():
        torch.cuda.synchronize()
