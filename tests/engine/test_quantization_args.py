"""--quantization: what auto resolves to, the CUDA fallback, the flag, and the banner line."""

from __future__ import annotations

import argparse

import pytest

from pagedserve import platform
from pagedserve.config import KVCacheConfig
from pagedserve.engine.arg_utils import EngineArgs
from pagedserve.entrypoints.engine_flags import (
    add_engine_flags,
    describe_engine,
    engine_args_from_flags,
)
from pagedserve.transformers_utils.gguf_reader import has_quantized_weights, read_gguf


def test_auto_quantizes_a_quantized_gguf_only(default_resolved_model, tiny_model_dir) -> None:
    assert has_quantized_weights(read_gguf(default_resolved_model.model_path))  # Q4_K_M
    gguf = EngineArgs(kv_cache_memory="64MiB").create_engine_config().model_config
    assert (gguf.quantization, gguf.quantization_reason) == ("int8", "auto: quantized GGUF")
    folder = EngineArgs(model=tiny_model_dir("llama")).create_engine_config().model_config
    assert (folder.quantization, folder.quantization_reason) == ("none", "auto: unquantized checkpoint")
    forced = EngineArgs(model=tiny_model_dir("llama"), quantization="int8").create_engine_config()
    assert forced.model_config.quantization == "int8"
    off = EngineArgs(quantization="none").create_engine_config().model_config
    assert (off.quantization, off.quantization_reason) == ("none", "requested")


def test_cuda_falls_back_to_unquantized_with_a_message(monkeypatch, caplog) -> None:
    monkeypatch.setattr(platform, "is_cuda", lambda: True)
    config = EngineArgs(quantization="int8").create_engine_config().model_config
    assert config.quantization == "none"
    assert "CPU-only" in config.quantization_reason
    assert any("CPU kernels only" in r.getMessage() for r in caplog.records)


def test_bad_values_are_value_errors() -> None:
    with pytest.raises(ValueError, match="quantization"):
        EngineArgs(quantization="fp4").create_engine_config()
    from pagedserve.config import ModelConfig

    with pytest.raises(ValueError, match="quantization"):
        ModelConfig(model="m", model_path="m", tokenizer_path="m", hf_config=None,
                    architecture="A", dtype=None, dtype_reason="", max_model_len=8,
                    quantization="auto")


def test_flag_and_llm_keyword() -> None:
    parser = argparse.ArgumentParser()
    add_engine_flags(parser)
    assert engine_args_from_flags(parser.parse_args([])).quantization == "auto"
    assert engine_args_from_flags(parser.parse_args(["--quantization", "int8"])).quantization == "int8"
    with pytest.raises(SystemExit):
        parser.parse_args(["--quantization", "int4"])
    assert "quantization" in {p.name for p in EngineArgs.signature_parameters()}


def test_banner_names_method_reason_and_kernels() -> None:
    config = EngineArgs(kv_cache_memory="64MiB").create_engine_config()
    kv_cache = KVCacheConfig(num_blocks=9, block_size=16, bytes_per_block=1024,
                             kv_cache_memory_bytes=9 * 1024)
    text = describe_engine(config, kv_cache, 1.0, "kernels linear=int8_wo:8,dense;lm_head=w8a8 (measured)")
    assert ("quantization: int8 (auto: quantized GGUF); kernels linear=int8_wo:8,dense;"
            "lm_head=w8a8 (measured)") in text.splitlines()
    none = EngineArgs(quantization="none", kv_cache_memory="64MiB").create_engine_config()
    assert "quantization: none (requested)" in describe_engine(none, kv_cache).splitlines()
