"""dtype choice per CPU (platform.resolve_dtype / choose_cpu_dtype)."""

from __future__ import annotations

import math

import pytest
import torch

from pagedserve import platform


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):  # noqa: ANN001, ANN201
    monkeypatch.setenv("PAGEDSERVE_CACHE_DIR", str(tmp_path))
    return tmp_path


@pytest.mark.parametrize(("speedup", "expected"), [(3.1, torch.bfloat16), (1.25, torch.bfloat16),
                                                    (1.1, torch.float32), (0.4, torch.float32)])
def test_auto_follows_the_measured_bf16_speedup_and_caches_it(
    speedup: float, expected: torch.dtype, cache_dir, monkeypatch  # noqa: ANN001
) -> None:
    calls = []
    monkeypatch.setattr(platform, "_measure_bf16_speedup", lambda: calls.append(1) or speedup)
    dtype, reason = platform.resolve_dtype("auto")
    assert dtype == expected and f"{speedup:.1f}x" in reason and "(measured)" in reason
    again, reason = platform.resolve_dtype("auto")
    assert again == expected and "measured, cached" in reason and len(calls) == 1
    assert (cache_dir / "dtype_choice.json").exists()


def test_the_measurement_is_real(cache_dir) -> None:  # noqa: ANN001
    speedup = platform._measure_bf16_speedup()
    assert math.isfinite(speedup) and speedup > 0


def test_explicit_dtypes_and_errors() -> None:
    assert platform.resolve_dtype("bf16") == (torch.bfloat16, "requested")
    assert platform.resolve_dtype("float32") == (torch.float32, "requested")
    with pytest.raises(ValueError, match="Unknown dtype"):
        platform.resolve_dtype("int4")
    if not platform.is_cuda():
        with pytest.raises(ValueError, match="CUDA only"):
            platform.resolve_dtype("float16")
