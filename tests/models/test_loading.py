"""Resolution of model names to files, the registry, and weight loading/routing."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch

from pagedserve import platform
from pagedserve.layers.linear import MergedLinear, QKVLinear
from pagedserve.models.loader import build_model, get_model
from pagedserve.models.registry import get_model_class, supported_architectures
from pagedserve.transformers_utils.resolve import resolve_model
from tests.models.helpers import model_config_for


def test_resolve_hf_folder(tiny_model_dir) -> None:
    folder = tiny_model_dir("qwen3")
    resolved = resolve_model(folder)
    assert resolved.architecture == "Qwen3ForCausalLM"
    assert resolved.model_path == resolved.tokenizer_path == folder
    assert not resolved.is_gguf
    assert resolved.eos_token_ids == frozenset({2})
    assert resolved.chat_template and "add_generation_prompt" in resolved.chat_template
    assert resolved.hf_config.head_dim == 32


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_get_model_dtype_device_and_eval(tiny_model_dir, arch: str) -> None:
    resolved = resolve_model(tiny_model_dir(arch))
    model = get_model(model_config_for(resolved, torch.bfloat16))
    assert not model.training
    params = list(model.parameters())
    assert all(p.dtype == torch.bfloat16 for p in params)
    assert all(p.device.type == platform.device().type for p in params)
    assert all(not p.requires_grad for p in params)


def test_tied_head_shares_the_embedding(tiny_model_dir) -> None:
    model = get_model(model_config_for(resolve_model(tiny_model_dir("qwen2"))))
    names = {n for n, _ in model.named_parameters()}
    assert "lm_head.weight" not in names and "model.embed_tokens.weight" in names
    untied = get_model(model_config_for(resolve_model(tiny_model_dir("llama"))))
    assert "lm_head.weight" in {n for n, _ in untied.named_parameters()}


def test_missing_paths_and_files_are_value_errors(tmp_path: Path, tiny_model_dir) -> None:
    with pytest.raises(ValueError, match="not found"):
        resolve_model(str(tmp_path / "does-not-exist"))
    not_gguf = tmp_path / "weights.bin"
    not_gguf.write_bytes(b"123")
    with pytest.raises(ValueError, match=r"\.gguf"):
        resolve_model(str(not_gguf))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="config.json"):
        resolve_model(str(empty))
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    shutil.copy(Path(tiny_model_dir("llama")) / "config.json", no_weights)
    with pytest.raises(ValueError, match="safetensors"):
        resolve_model(str(no_weights))
    no_tokenizer = tmp_path / "no_tokenizer"
    no_tokenizer.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(Path(tiny_model_dir("llama")) / name, no_tokenizer)
    with pytest.raises(ValueError, match="tokenizer"):
        resolve_model(str(no_tokenizer))
    bad_gguf = tmp_path / "bad.gguf"
    bad_gguf.write_bytes(b"NOPE" + bytes(64))
    with pytest.raises(ValueError, match="GGUF"):
        resolve_model(str(bad_gguf))
    with pytest.raises(ValueError):
        resolve_model("")


def test_hub_errors_become_value_errors(monkeypatch) -> None:
    import huggingface_hub

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(ValueError, match="hub"):
        resolve_model("some-org/some-model")


def test_unknown_architecture_lists_supported() -> None:
    with pytest.raises(ValueError, match="Gemma3ForCausalLM") as info:
        get_model_class("GPT2LMHeadModel")
    assert "GPT2LMHeadModel" in str(info.value)
    assert set(supported_architectures()) == {
        "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
        "Gemma3ForCausalLM",
    }


def test_unknown_architecture_in_config_fails_at_load(tmp_path: Path, tiny_model_dir) -> None:
    folder = tmp_path / "m"
    shutil.copytree(tiny_model_dir("llama"), folder)
    config = json.loads((folder / "config.json").read_text())
    config["architectures"] = ["FancyForCausalLM"]
    (folder / "config.json").write_text(json.dumps(config))
    # Refused while resolving, before transformers parses the config...
    with pytest.raises(ValueError, match="supported: Gemma3ForCausalLM, LlamaForCausalLM"):
        resolve_model(str(folder))
    # ...and by the loader for a resolved model whose architecture is not registered.
    resolved = dataclasses.replace(
        resolve_model(tiny_model_dir("llama")), architecture="FancyForCausalLM"
    )
    with pytest.raises(ValueError, match="supported"):
        get_model(model_config_for(resolved))


def test_load_weights_rejects_unknown_and_missing(tiny_model_dir) -> None:
    from safetensors.torch import load_file

    resolved = resolve_model(tiny_model_dir("llama"))
    weights = load_file(str(Path(resolved.model_path) / "model.safetensors"))
    model = build_model(resolved.architecture, resolved.hf_config, torch.float32, torch.device("cpu"))
    with pytest.raises(ValueError, match="matches no parameter"):
        model.load_weights([*weights.items(), ("model.layers.0.mlp.extra.weight", torch.zeros(2))])
    partial = {k: v for k, v in weights.items() if "layers.1.self_attn.k_proj" not in k}
    model = build_model(resolved.architecture, resolved.hf_config, torch.float32, torch.device("cpu"))
    with pytest.raises(ValueError, match="shards"):
        model.load_weights(partial.items())
    partial = {k: v for k, v in weights.items() if k != "model.norm.weight"}
    with pytest.raises(ValueError, match="model.norm.weight"):
        model.load_weights(partial.items())


def test_fused_weight_loaders() -> None:
    qkv = QKVLinear(hidden_size=6, head_dim=2, num_heads=4, num_kv_heads=2, bias=True)
    q, k, v = torch.randn(8, 6), torch.randn(4, 6), torch.randn(4, 6)
    for shard, tensor in (("q", q), ("k", k), (2, v)):
        qkv.weight.weight_loader(qkv.weight, tensor, shard)
    torch.testing.assert_close(qkv.weight, torch.cat([q, k, v]))
    with pytest.raises(ValueError, match="shape"):
        qkv.weight.weight_loader(qkv.weight, torch.randn(5, 6), "k")
    gate_up = MergedLinear(3, [5, 5])
    gate, up = torch.randn(5, 3), torch.randn(5, 3)
    gate_up.weight.weight_loader(gate_up.weight, up, 1)
    gate_up.weight.weight_loader(gate_up.weight, gate, 0)
    torch.testing.assert_close(gate_up.weight, torch.cat([gate, up]))
    with pytest.raises(ValueError, match="shard_id"):
        gate_up.weight.weight_loader(gate_up.weight, gate, 2)
