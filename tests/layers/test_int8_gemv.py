"""The native W8A8 GEMV (layers/quantization/gemv.py, csrc/int8_gemv.cpp) against the
torch._int_mm path it replaces at small row counts: same integers, so equal results up to
float rounding of the scale multiplies, for every row count 1..16 and awkward shapes."""

from __future__ import annotations

import pytest
import torch

from pagedserve import envs, platform
from pagedserve.layers.linear import Linear
from pagedserve.layers.quantization import gemv
from pagedserve.layers.quantization.int8 import install_int8, quantize_layer_weight
from pagedserve.layers.quantization.kernels import (
    KernelSchedule,
    quantize_per_token,
    w8a8_mm,
    w8a16_mm,
    weight_row_sums,
)

HAS_VNNI = {"avx512_vnni", "avx512bw"} <= platform.cpu_flags()
needs_gemv = pytest.mark.skipif(
    not HAS_VNNI or gemv.load_gemv() is None, reason="needs AVX512-VNNI and a C++ compiler"
)


def _int_mm_reference(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    xq, x_scale = quantize_per_token(x)
    acc = torch._int_mm(xq, qweight.t()) if x.shape[0] > 16 else (
        xq.to(torch.int64) @ qweight.t().to(torch.int64)
    )
    return acc.double() * scale.double() * x_scale.double()


def _quantized(num_out: int, num_in: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(num_out, num_in, generator=generator)
    qweight, scale = quantize_layer_weight(weight)
    return qweight, scale, weight_row_sums(qweight)


@needs_gemv
@pytest.mark.parametrize("num_rows", range(1, 17))
def test_gemv_equals_the_int_mm_path(num_rows: int) -> None:
    qweight, scale, row_sums = _quantized(1000, 640)
    x = torch.randn(num_rows, 640, generator=torch.Generator().manual_seed(num_rows)) * 3
    got = gemv.load_gemv()(x, qweight, scale, row_sums)
    expected = _int_mm_reference(x, qweight, scale)
    torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=1e-6)


@needs_gemv
@pytest.mark.parametrize("num_in", [1, 17, 63, 64, 65, 200, 1152])
def test_gemv_k_tails_and_bf16_strided_input(num_in: int) -> None:
    qweight, scale, row_sums = _quantized(77, num_in, seed=num_in)
    x_full = torch.randn(3, num_in + 5)
    x = x_full[:, :num_in].to(torch.bfloat16)  # strided rows, bf16: converted to float32
    out = torch.full((3, 77), float("nan"))
    got = gemv.load_gemv()(x, qweight, scale, row_sums, out=out)
    assert got.data_ptr() == out.data_ptr()
    torch.testing.assert_close(got.double(), _int_mm_reference(x.float(), qweight, scale),
                               rtol=1e-6, atol=1e-6)


@needs_gemv
def test_gemv_rejects_what_it_cannot_take() -> None:
    qweight, scale, row_sums = _quantized(8, 64)
    kernel = gemv.load_gemv()
    with pytest.raises(ValueError, match="1..16 rows"):
        kernel(torch.randn(17, 64), qweight, scale, row_sums)
    with pytest.raises(ValueError, match="int8"):
        kernel(torch.randn(2, 64), qweight.float(), scale, row_sums)
    with pytest.raises(ValueError, match="int32"):
        kernel(torch.randn(2, 64), qweight, scale, row_sums.long())


@needs_gemv
def test_w8a8_layers_use_the_gemv_up_to_16_rows(monkeypatch) -> None:
    """w8a8_mm takes the GEMV with row sums at <= 16 rows and _int_mm beyond; the LM head
    and a W8A8 linear get the row sums when they are installed."""
    qweight, scale, row_sums = _quantized(300, 128)
    calls = []
    real = gemv.Int8Gemv.__call__
    monkeypatch.setattr(gemv.Int8Gemv, "__call__", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    for num_rows in (1, 16, 17):
        x = torch.randn(num_rows, 128)
        got = w8a8_mm(x, qweight, scale, weight_sum=row_sums)
        torch.testing.assert_close(got.double(), _int_mm_reference(x, qweight, scale), rtol=1e-5, atol=1e-5)
    assert len(calls) == 2
    layer = Linear(128, 300, bias=False)
    install_int8(layer, qweight, scale, KernelSchedule.single("w8a8"))
    assert torch.equal(layer.weight_sum, row_sums)
    assert layer(torch.randn(2, 128)).shape == (2, 300)
    assert len(calls) == 3


def test_gemv_is_off_without_vnni_or_when_disabled(monkeypatch) -> None:
    gemv.load_gemv.cache_clear()
    try:
        monkeypatch.setenv("PAGEDSERVE_INT8_GEMV", "0")
        assert envs.PAGEDSERVE_INT8_GEMV is False and gemv.load_gemv() is None
        gemv.load_gemv.cache_clear()
        monkeypatch.delenv("PAGEDSERVE_INT8_GEMV")
        monkeypatch.setattr(platform, "cpu_flags", lambda: frozenset({"avx512f"}))
        assert gemv.load_gemv() is None
    finally:
        gemv.load_gemv.cache_clear()


def _a16_reference(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """16-bit fixed-point rows (scale amax / 32767, round half to even) times the int8
    weights, in exact integers."""
    xf = x.float()
    x_scale = (xf.abs().amax(dim=1, keepdim=True) / 32767.0).clamp_(min=1e-12)
    q16 = torch.round(xf / x_scale).to(torch.int64)
    return (q16 @ qweight.t().to(torch.int64)).double() * scale.double() * x_scale.double()


@needs_gemv
@pytest.mark.parametrize("num_rows", [1, 2, 5, 8, 9, 16, 40])
@pytest.mark.parametrize("num_in", [640, 100])
def test_w8a16_is_exact_16_bit_activations(num_rows: int, num_in: int) -> None:
    """Integers exact (the two 8-bit halves recombine to the 16-bit row), so the result
    equals the 16-bit reference to float rounding, and the float matmul to ~1e-4."""
    qweight, scale, row_sums = _quantized(300, num_in, seed=num_rows)
    x = torch.randn(num_rows, num_in, generator=torch.Generator().manual_seed(7)) * 4
    got = w8a16_mm(x, qweight, scale, row_sums)
    assert got.dtype == torch.float32 and got.shape == (num_rows, 300)
    torch.testing.assert_close(got.double(), _a16_reference(x, qweight, scale), rtol=1e-6, atol=1e-5)
    dense = x.double() @ (qweight.double() * scale.double()[:, None]).t()
    assert (got.double() - dense).abs().max() < 1e-3 * dense.abs().max()
    bf16 = w8a16_mm(x.to(torch.bfloat16), qweight, scale, row_sums)
    assert bf16.dtype == torch.bfloat16
    torch.testing.assert_close(bf16.float(), _a16_reference(x.to(torch.bfloat16), qweight, scale).float(),
                               rtol=1e-2, atol=1e-2)


@needs_gemv
def test_w8a16_linear_and_the_fallback_without_gemv(monkeypatch) -> None:
    qweight, scale, row_sums = _quantized(64, 128)
    layer = Linear(128, 64, bias=False)
    install_int8(layer, qweight, scale, KernelSchedule.parse("w8a16:4,int8_wo"))
    assert str(layer.quant_method.schedule) == "w8a16:4,int8_wo"
    x = torch.randn(3, 128).to(torch.bfloat16)
    torch.testing.assert_close(layer(x).float(), _a16_reference(x, qweight, scale).float(), rtol=1e-2, atol=1e-2)
    monkeypatch.setattr(gemv, "load_gemv", lambda: None)
    other = Linear(128, 64, bias=False)
    install_int8(other, qweight, scale, KernelSchedule.parse("w8a16:4,int8_wo"))
    assert str(other.quant_method.schedule) == "int8_wo"
