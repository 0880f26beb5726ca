"""Every ``PAGEDSERVE_*`` environment variable: name, default, parser and meaning (as vLLM's
``envs.py``).

Values are read when asked for, not at import, so a test (or a parent process) that sets a
variable before the code runs is honoured::

    from pagedserve import envs

    envs.PAGEDSERVE_CACHE_DIR          # attribute access reads os.environ now
    envs.get("PAGEDSERVE_CACHE_DIR")   # the same

An unset or empty variable gives its default. A value that does not parse raises
ValueError naming the variable.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the attributes module __getattr__ provides, for type checkers
    PAGEDSERVE_API_KEY: str | None
    PAGEDSERVE_ATTENTION_BACKEND: str
    PAGEDSERVE_CACHE_DIR: str
    PAGEDSERVE_DEAD_ENGINE_EXIT_DELAY: float
    PAGEDSERVE_DEVICE: str | None
    PAGEDSERVE_ENGINE_HEARTBEAT_INTERVAL: float
    PAGEDSERVE_ENGINE_HEARTBEAT_TIMEOUT: float
    PAGEDSERVE_ENGINE_READY_TIMEOUT: float
    PAGEDSERVE_INT8_GEMV: bool
    PAGEDSERVE_INT8_KERNELS: str | None
    PAGEDSERVE_LOG_STATS_INTERVAL: float | None
    PAGEDSERVE_NATIVE_NORM: bool
    PAGEDSERVE_NUM_THREADS: int | None


@dataclass(frozen=True)
class EnvVar:
    """One environment variable: its default, how its text is parsed, what it does."""

    name: str
    default: Any  # the value when unset or empty; a callable is called then (e.g. for ~)
    parse: Callable[[str], Any]
    doc: str

    def read(self) -> Any:
        raw = os.environ.get(self.name)
        if raw is None or raw.strip() == "":
            return self.default() if callable(self.default) else self.default
        try:
            return self.parse(raw.strip())
        except ValueError as exc:
            raise ValueError(f"environment variable {self.name}={raw!r}: {exc}") from exc


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise ValueError(f"must be > 0, got {value}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise ValueError(f"must be >= 0, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError(f"must be >= 0, got {value}")
    return value


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"must be 1/true/yes/on or 0/false/no/off, got {text!r}")


def _attention_backend(text: str) -> str:
    value = text.lower()
    if value not in ("auto", "cpu", "torch"):
        raise ValueError(f"must be auto, cpu or torch, got {text!r}")
    return value


def _cache_dir(text: str) -> str:
    return os.path.expanduser(text)


def _default_cache_dir() -> str:
    return os.path.join(os.path.expanduser("~"), ".cache", "pagedserve")

ENV_VARS: dict[str, EnvVar] = {
    var.name: var
    for var in (
        EnvVar("PAGEDSERVE_API_KEY", None, str,
               "API key the server requires on /v1/* when --api-key is not given."),
        EnvVar("PAGEDSERVE_ATTENTION_BACKEND", "auto", _attention_backend,
               "Attention backend: auto (cpu on CPU when its kernel builds, else torch), "
               "cpu (reads the paged KV cache in place; C++ kernel built at first use) or "
               "torch (gathers each group's context, any device)."),
        EnvVar("PAGEDSERVE_CACHE_DIR", _default_cache_dir, _cache_dir,
               "Cache folder (GGUF conversions, dequantized weights); default "
               "~/.cache/pagedserve."),
        EnvVar("PAGEDSERVE_DEAD_ENGINE_EXIT_DELAY", 2.0, _non_negative_float,
               "Seconds the server keeps answering (500s, /health 503) after the engine "
               "core died, before it exits."),
        EnvVar("PAGEDSERVE_DEVICE", None, str,
               "Force the compute device (e.g. cpu, cuda, cuda:1); default: CUDA when "
               "present, else CPU."),
        EnvVar("PAGEDSERVE_ENGINE_HEARTBEAT_INTERVAL", 1.0, _positive_float,
               "Seconds between the engine core's heartbeats to the API process."),
        EnvVar("PAGEDSERVE_ENGINE_HEARTBEAT_TIMEOUT", 30.0, _positive_float,
               "Seconds without a heartbeat after which /health reports the engine stalled."),
        EnvVar("PAGEDSERVE_ENGINE_READY_TIMEOUT", 1800.0, _positive_float,
               "Seconds the API process waits for the engine core to load the model."),
        EnvVar("PAGEDSERVE_INT8_GEMV", True, _bool,
               "With --quantization int8: run w8a8 at up to 16 rows on the native AVX512-VNNI "
               "GEMV (built at first use) instead of torch._int_mm; 0 turns it off."),
        EnvVar("PAGEDSERVE_INT8_KERNELS", None, str,
               "With --quantization int8: the kernel per layer kind and row count instead of "
               "the start-up measurement, as the banner prints it, e.g. "
               "'linear=int8_wo:8,dense;lm_head=w8a8' (kernels: dense, int8_wo, w8a8)."),
        EnvVar("PAGEDSERVE_LOG_STATS_INTERVAL", None, _positive_float,
               "Seconds between periodic stats log lines while the engine is busy; default "
               "pagedserve.metrics.loggers.DEFAULT_LOG_INTERVAL_S (5)."),
        EnvVar("PAGEDSERVE_NATIVE_NORM", True, _bool,
               "bf16 RMSNorm (and the residual add after it) as one native call on CPU "
               "(built at first use) instead of several torch ops; 0 turns it off."),
        EnvVar("PAGEDSERVE_NUM_THREADS", None, _non_negative_int,
               "torch threads of the engine core when --num-threads is not given; "
               "unset or 0: all cores."),
    )
}


def get(name: str) -> Any:
    """The current value of ``name`` (its default when unset or empty)."""
    try:
        var = ENV_VARS[name]
    except KeyError:
        raise AttributeError(f"unknown pagedserve environment variable {name!r}") from None
    return var.read()


def __getattr__(name: str) -> Any:
    if name in ENV_VARS:
        return get(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *ENV_VARS])
