"""The one place that knows the device: dtype support, memory, threads, ISA."""

from __future__ import annotations

import logging
from functools import lru_cache

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
        flags = cpu_flags()
        if "amx_bf16" in flags or "avx512_bf16" in flags:
            return torch.bfloat16, f"CPU has {cpu_isa()}"
        return torch.float32, "CPU lacks AMX/AVX512-BF16"
    if name not in aliases:
        raise ValueError(
            f"Unknown dtype {dtype!r}; choose one of auto, bfloat16, float32, float16."
        )
    resolved = aliases[name]
    if resolved == torch.float16 and not is_cuda():
        raise ValueError("dtype float16 is supported on CUDA only; use bfloat16 or float32 on CPU.")
    return resolved, "requested"


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
