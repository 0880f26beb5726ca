"""--quantization int8 on loaded models: the on-disk cache of the int8 weights (written once,
memory-mapped after), the files' format, and the quantized model against the float one."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from pagedserve.layers.embedding import LMHead
from pagedserve.layers.linear import Linear
from pagedserve.models import quantized_weights
from pagedserve.models.loader import get_model
from pagedserve.models.weight_files import load_tensors, save_tensors
from pagedserve.transformers_utils.resolve import resolve_model
from tests.models.helpers import model_config_for
from tests.utils.paged import PagedSequenceRunner

TOKENS = [1, 17, 250, 33, 9, 120, 77, 5, 301, 64]


@pytest.fixture
def cache_dir(tmp_path: Path, monkeypatch) -> Path:
    monkeypatch.setenv("PAGEDSERVE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("PAGEDSERVE_INT8_KERNELS", "linear=int8_wo:2,dense;lm_head=w8a8:1,int8_wo")
    return tmp_path / "cache"


def _logits(model: torch.nn.Module, hf_config, tokens: list[int]) -> torch.Tensor:  # noqa: ANN001
    dtype = next(model.parameters()).dtype
    runner = PagedSequenceRunner(model, hf_config, block_size=4, num_blocks=16, dtype=dtype)
    runner.add("s", tokens)
    prefill = runner.step([("s", len(tokens))])["s"].clone()  # M = 10: dense linears
    runner.append("s", int(prefill[-1].argmax()))
    decode = runner.step([("s", 1)])["s"]  # M = 1: int8 weight-only, W8A8 head
    return torch.cat([prefill, decode]).float()


def _config(folder: str, quantization: str, dtype: torch.dtype = torch.bfloat16):  # noqa: ANN202
    return dataclasses.replace(model_config_for(resolve_model(folder), dtype), quantization=quantization)


@pytest.mark.parametrize("arch", ["gemma3", "llama"])  # tied and untied LM head
def test_int8_model_is_close_to_the_float_model(tiny_model_dir, cache_dir: Path, arch: str) -> None:
    folder = tiny_model_dir(arch)
    config = _config(folder, "int8")
    reference = get_model(_config(folder, "none"))
    model = get_model(config)
    assert "linear=int8_wo:2,dense" in model.quantization_info
    layers = [m for m in model.modules() if isinstance(m, Linear | LMHead)]
    assert layers and all(m.quant_method is not None and m.qweight.dtype == torch.int8 for m in layers)
    head = model.lm_head
    if head.tied:  # the embedding stays exact; the head has its own int8 copy
        assert torch.equal(model.model.embed_tokens.weight, reference.model.embed_tokens.weight)
    else:
        assert head.weight is None  # no row count runs the head dense: its float copy went
    ours = _logits(model, config.hf_config, TOKENS)
    want = _logits(reference, config.hf_config, TOKENS)
    assert float((ours - want).norm() / want.norm()) < 0.05
    assert quantized_weights.quantized_weights_path(config).exists()


def test_warm_start_maps_the_cache_and_never_requantizes(tiny_model_dir, cache_dir: Path, monkeypatch) -> None:
    config = _config(tiny_model_dir("gemma3"), "int8")
    first = get_model(config)
    path = quantized_weights.quantized_weights_path(config)
    assert path.is_relative_to(cache_dir) and path.exists()
    assert "int8" in path.name and f"v{quantized_weights.QUANT_FORMAT_VERSION}" in path.name
    assert "bfloat16" in path.name
    monkeypatch.setattr(quantized_weights, "_quantize_all", lambda targets: pytest.fail("re-quantized"))
    second = get_model(config)
    for a, b in zip(first.modules(), second.modules(), strict=True):
        if hasattr(a, "qweight"):
            assert torch.equal(a.qweight, b.qweight) and torch.equal(a.weight_scale, b.weight_scale)
    assert torch.equal(_logits(first, config.hf_config, TOKENS), _logits(second, config.hf_config, TOKENS))
    # Another dtype or format version is another file.
    other = dataclasses.replace(config, dtype=torch.float32)
    assert quantized_weights.quantized_weights_path(other) != path
    monkeypatch.setattr(quantized_weights, "QUANT_FORMAT_VERSION", quantized_weights.QUANT_FORMAT_VERSION + 1)
    assert quantized_weights.quantized_weights_path(config) != path


def test_a_cache_that_does_not_fit_is_rebuilt(tiny_model_dir, cache_dir: Path) -> None:
    config = _config(tiny_model_dir("qwen3"), "int8")
    path = quantized_weights.quantized_weights_path(config)
    save_tensors(path, {"lm_head.qweight": torch.zeros(2, 2, dtype=torch.int8)}, {}, desc="test")
    model = get_model(config)
    tensors, metadata = load_tensors(path)
    assert metadata["method"] == "int8" and "lm_head.qweight" in tensors
    assert tuple(tensors["lm_head.qweight"].shape) == tuple(model.lm_head.qweight.shape)


def test_cache_files_round_trip_and_stay_safetensors(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    tensors = {
        "a.qweight": torch.randint(-127, 128, (3, 5), dtype=torch.int8),  # odd byte count first
        "a.weight_scale": torch.rand(3),
        "b": torch.randn(2, 3).bfloat16(),
        "empty": torch.empty(0, 4),
    }
    path = tmp_path / "w.safetensors"
    save_tensors(path, tensors, {"method": "int8"}, desc="test")
    mapped, metadata = load_tensors(path)
    assert metadata == {"method": "int8"}
    assert all(torch.equal(mapped[k], v) for k, v in tensors.items())
    assert all(torch.equal(load_file(str(path))[k], v) for k, v in tensors.items())
    assert not list(tmp_path.glob(".*.tmp"))
