"""The fused bf16 RMSNorm kernel (layers/native_norm.py) against the torch ops it replaces
(layers/layernorm.py with the kernel off) and transformers: within one bf16 ulp, identical
almost everywhere; the fused residual add rounds exactly as ``norm(x).add_(residual)``."""

from __future__ import annotations

import pytest
import torch

from pagedserve import envs
from pagedserve.layers import layernorm, native_norm
from pagedserve.layers.layernorm import GemmaRMSNorm, RMSNorm, StackedGemmaNorms

needs_kernel = pytest.mark.skipif(native_norm.load_rms_norm() is None, reason="needs a C++ compiler")


def _torch_path(module, x: torch.Tensor, monkeypatch) -> torch.Tensor:  # noqa: ANN001
    with monkeypatch.context() as patch:
        patch.setattr(layernorm, "_native_kernel", lambda x: None)
        return module(x)


def _assert_close_bf16(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == expected.dtype == torch.bfloat16 and actual.shape == expected.shape
    ulp = torch.finfo(torch.bfloat16).eps * expected.float().abs().clamp(min=1e-30)
    assert ((actual.float() - expected.float()).abs() <= ulp).all()
    if expected.numel():
        assert (actual == expected).float().mean() > 0.995


@needs_kernel
@pytest.mark.parametrize("num_tokens", [0, 1, 3, 200])
@pytest.mark.parametrize("norm_cls", [RMSNorm, GemmaRMSNorm])
def test_kernel_matches_the_torch_ops(norm_cls, num_tokens: int, monkeypatch) -> None:  # noqa: ANN001
    torch.manual_seed(num_tokens)
    norm = norm_cls(640, eps=1e-6)
    with torch.no_grad():
        norm.weight.data = (torch.randn(640) * 0.5).to(torch.bfloat16)
        x = (torch.randn(num_tokens, 640) * torch.rand(num_tokens, 1) * 8).to(torch.bfloat16)
        _assert_close_bf16(norm(x), _torch_path(norm, x, monkeypatch))
        residual = torch.randn(num_tokens, 640).to(torch.bfloat16)
        fused = norm.forward_add(x, residual)
        assert torch.equal(fused, norm(x).add_(residual))


@needs_kernel
def test_stacked_heads_read_in_place_from_the_fused_qkv(monkeypatch) -> None:
    """q and k heads as a strided view of the qkv projection's output (no copy)."""
    q_norm, k_norm = GemmaRMSNorm(256, eps=1e-6), GemmaRMSNorm(256, eps=1e-6)
    with torch.no_grad():
        q_norm.weight.data = torch.randn(256).to(torch.bfloat16)
        k_norm.weight.data = torch.randn(256).to(torch.bfloat16)
    stacked = StackedGemmaNorms([(q_norm, 4), (k_norm, 1)])
    qkv = (torch.randn(9, 6 * 256) * 3).to(torch.bfloat16)
    qk = qkv[:, : 5 * 256].view(9, 5, 256)
    with torch.no_grad():
        out = stacked(qk)
        _assert_close_bf16(out, _torch_path(stacked, qk, monkeypatch))
        assert torch.equal(out[:, :4], q_norm(qk[:, :4]))
        assert torch.equal(out[:, 4:], k_norm(qk[:, 4:]))


def test_float32_never_uses_the_kernel(monkeypatch) -> None:
    calls = []
    monkeypatch.setattr(native_norm.RMSNormKernel, "__call__", lambda *a, **k: calls.append(1))
    norm = GemmaRMSNorm(16)
    with torch.no_grad():
        norm.weight.zero_()
        norm(torch.randn(2, 16))
        norm.forward_add(torch.randn(2, 16), torch.randn(2, 16))
    assert calls == []


def test_kernel_off_by_environment(monkeypatch) -> None:
    native_norm.load_rms_norm.cache_clear()
    try:
        monkeypatch.setenv("PAGEDSERVE_NATIVE_NORM", "0")
        assert envs.PAGEDSERVE_NATIVE_NORM is False and native_norm.load_rms_norm() is None
    finally:
        native_norm.load_rms_norm.cache_clear()
