"""Small C++ kernels built at first use: compile, cache, load.

A kernel source (``csrc/*.cpp`` beside the Python module that binds it) has a plain C entry
point and includes no torch header, so it compiles in a few seconds with the system C++
compiler (``$CXX``, else ``g++``/``c++``/``clang++``) and needs nothing at ``pip install``
time. It is built into ``$PAGEDSERVE_CACHE_DIR/kernels/`` under a name keyed by the source,
the compiler, the flags and the CPU's features (it is built with ``-march=native``); later
starts only load it (``ctypes``). Callers fall back to torch code when :func:`build_library`
raises.

OpenMP: the library links ``libgomp.so.1``; torch's own copy (same soname, already loaded)
serves it, so the kernel and torch share one thread pool. ``-ffast-math``, where a kernel
asks for it, applies to compilation only: linking with it would pull in ``crtfastmath.o``,
which flushes denormals process-wide when the library loads.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch

from pagedserve import envs, platform

logger = logging.getLogger(__name__)

BASE_FLAGS = ("-O3", "-march=native", "-fopenmp", "-fPIC", "-std=c++17")
_BUILD_TIMEOUT_S = 300
T = TypeVar("T")
_lock = threading.Lock()


class NativeBuildError(RuntimeError):
    """The kernel could not be built (no compiler, or the compiler failed)."""


def find_compiler() -> str | None:
    for candidate in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if candidate and shutil.which(candidate):
            return shutil.which(candidate)
    return None


def torch_lib_dir() -> Path:
    return Path(torch.__file__).parent / "lib"


def build_key(source: Path, compiler: str, flags: tuple[str, ...]) -> str:
    try:
        version = subprocess.run(
            [compiler, "--version"], capture_output=True, text=True, timeout=30
        ).stdout
    except (OSError, subprocess.SubprocessError):
        version = ""
    digest = hashlib.sha256()
    for part in (
        source.read_bytes(),
        compiler.encode(),
        version.encode(),
        " ".join(flags).encode(),
        " ".join(sorted(platform.cpu_flags())).encode(),
        str(torch_lib_dir()).encode(),
    ):
        digest.update(part)
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def _compile(compiler: str, source: Path, target: Path, flags: tuple[str, ...]) -> None:
    """Compile and link into ``target`` atomically (concurrent builders do not collide)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".build-") as tmp:
        obj = Path(tmp) / f"{source.stem}.o"
        lib = Path(tmp) / target.name
        link = ["-shared", "-fopenmp", "-o", str(lib), str(obj), "-lm"]
        if (torch_lib_dir() / "libgomp.so.1").exists():
            link += [f"-Wl,-rpath,{torch_lib_dir()}"]
        for command in (
            [compiler, *flags, "-c", "-o", str(obj), str(source)],
            [compiler, *link],
        ):
            result = subprocess.run(
                command, capture_output=True, text=True, timeout=_BUILD_TIMEOUT_S
            )
            if result.returncode != 0:
                raise NativeBuildError(
                    f"{' '.join(command[:2])} ... failed:\n{result.stderr.strip()[-2000:]}"
                )
        os.replace(lib, target)


def build_library(source: Path, flags: tuple[str, ...] = BASE_FLAGS) -> tuple[Path, str]:
    """The built library for ``source`` (built now if not cached) and the compiler's name.
    Raises :class:`NativeBuildError` when it cannot be built."""
    compiler = find_compiler()
    if compiler is None:
        raise NativeBuildError("no C++ compiler found (set CXX)")
    key = build_key(source, compiler, flags)
    target = Path(envs.PAGEDSERVE_CACHE_DIR) / "kernels" / f"{source.stem}-{key}.so"
    with _lock:
        if not target.exists():
            try:
                _compile(compiler, source, target, flags)
            except (OSError, subprocess.SubprocessError) as exc:
                raise NativeBuildError(str(exc)) from exc
    return target, Path(compiler).name


def load_library(source: Path, binding: Callable[[Path], T], what: str,
                 flags: tuple[str, ...] = BASE_FLAGS) -> T | None:
    """``binding(path)`` of the built library, or None (with a warning naming ``what``
    and the reason) when it cannot be built or loaded: the caller's torch code runs."""
    try:
        path, _ = build_library(source, flags)
        return binding(path)
    except (OSError, NativeBuildError) as exc:
        logger.warning("%s unavailable: %s", what, exc)
        return None
