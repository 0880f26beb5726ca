"""GGUF: metadata reader, quirk handling vs transformers' tensor processors, the real
Gemma 3 270M weights vs transformers' own GGUF loading, and forward parity in fp32."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from pagedserve.models import gguf_loader
from pagedserve.models.gguf_loader import (
    WEIGHTS_FORMAT_VERSION,
    cached_weights_file,
    cached_weights_path,
    convert_gguf_weights,
    undo_gguf_quirks,
)
from pagedserve.transformers_utils.gguf_reader import file_fingerprint, gguf_cache_dir, read_gguf
from tests.models.helpers import load_ours
from tests.utils.paged import PagedSequenceRunner

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village by the sea,",
]


def test_read_gguf_metadata_is_fast(default_resolved_model) -> None:
    start = time.perf_counter()
    gguf_file = read_gguf(default_resolved_model.model_path)
    assert time.perf_counter() - start < 5
    assert gguf_file.architecture == "gemma3"
    assert gguf_file.metadata["gemma3.block_count"] == 18
    assert len(gguf_file.metadata["tokenizer.ggml.tokens"]) == 262144
    assert len(gguf_file.tensors) == 236
    names = {t.name for t in gguf_file.tensors}
    assert "token_embd.weight" in names and "output.weight" not in names  # tied head


def test_fingerprint_tracks_content(tmp_path) -> None:
    path = tmp_path / "x.gguf"
    path.write_bytes(b"GGUF" + bytes(range(256)) * 100)
    first = file_fingerprint(path)
    assert first == file_fingerprint(path)
    path.write_bytes(b"GGUF" + bytes(range(256)) * 99 + bytes(256))
    assert file_fingerprint(path) != first


def test_fingerprint_is_size_and_sampled_content_not_mtime(tmp_path) -> None:
    import os

    path = tmp_path / "x.gguf"
    path.write_bytes(b"GGUF" + bytes(range(256)) * 100)
    first = file_fingerprint(path)
    os.utime(path, (1, 1))
    assert file_fingerprint(path) == first  # the mtime is not part of it
    path.write_bytes(b"GGUF" + bytes(range(256)) * 100 + b"x")
    assert file_fingerprint(path) != first  # the size is


def test_weights_cache_path_carries_the_format_version(tmp_path, monkeypatch) -> None:
    """A loader change bumps WEIGHTS_FORMAT_VERSION, so old dequantized weights are not reused."""
    monkeypatch.setenv("PAGEDSERVE_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / "x.gguf"
    path.write_bytes(b"GGUF" + bytes(64))
    target = cached_weights_path(path, torch.float32)
    assert target.parent == gguf_cache_dir(path)
    assert target.is_relative_to(tmp_path / "cache")
    assert target.name == f"weights.v{WEIGHTS_FORMAT_VERSION}.float32.safetensors"
    assert cached_weights_path(path, torch.bfloat16).name.endswith(".bfloat16.safetensors")
    monkeypatch.setattr(gguf_loader, "WEIGHTS_FORMAT_VERSION", WEIGHTS_FORMAT_VERSION + 1)
    assert cached_weights_path(path, torch.float32) != target


def test_quirks_match_transformers_tensor_processors() -> None:
    from transformers.modeling_gguf_pytorch_utils import (
        Gemma2TensorProcessor,
        LlamaTensorProcessor,
    )

    class Config:
        num_attention_heads = 8
        num_key_value_heads = 2

    rng = np.random.default_rng(0)
    llama = LlamaTensorProcessor(config={"num_attention_heads": 8, "num_key_value_heads": 2})
    for name, rows in (("blk.0.attn_q.weight", 8 * 16), ("blk.3.attn_k.weight", 2 * 16),
                       ("blk.0.attn_v.weight", 2 * 16), ("blk.1.ffn_up.weight", 40)):
        weights = rng.standard_normal((rows, 24)).astype(np.float32)
        expected = llama.process(weights=weights.copy(), name=name).weights
        np.testing.assert_array_equal(undo_gguf_quirks("llama", name, weights, Config), expected)
    gemma = Gemma2TensorProcessor()
    for name in ("blk.0.attn_norm.weight", "blk.2.attn_q_norm.weight", "output_norm.weight",
                 "blk.0.post_ffw_norm.weight", "blk.0.attn_q.weight", "token_embd.weight"):
        weights = rng.standard_normal((16,)).astype(np.float32)
        expected = gemma.process(weights=weights.copy(), name=name).weights
        np.testing.assert_array_equal(undo_gguf_quirks("gemma3", name, weights, Config), expected)
    # qwen2/qwen3 GGUFs are stored in HF layout
    weights = rng.standard_normal((32, 8)).astype(np.float32)
    np.testing.assert_array_equal(undo_gguf_quirks("qwen3", "blk.0.attn_q.weight", weights, Config), weights)


@pytest.mark.slow
def test_weights_equal_transformers_gguf_loading(default_resolved_model) -> None:
    """Our dequantized, renamed, quirk-corrected tensors == transformers' (~40 s)."""
    from transformers import AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    resolved = default_resolved_model
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(resolved.hf_config)
    reference = load_gguf_checkpoint(resolved.model_path, return_tensors=True, model_to_load=skeleton)
    reference = reference["tensors"]
    ours = convert_gguf_weights(resolved.model_path, resolved.hf_config)
    assert set(ours) == set(reference)
    for name, tensor in reference.items():
        assert ours[name].shape == tensor.shape, name
        assert torch.equal(ours[name], tensor.float()), name


def test_default_model_resolves_from_cache(default_resolved_model) -> None:
    from pagedserve.transformers_utils.resolve import resolve_model

    resolved = default_resolved_model
    assert resolved.architecture == "Gemma3ForCausalLM"
    assert resolved.is_gguf
    assert {1, 106} <= resolved.eos_token_ids  # <eos>, <end_of_turn>
    assert resolved.chat_template and "<start_of_turn>" in resolved.chat_template
    assert resolved.hf_config.sliding_window == 512
    assert resolved.hf_config.layer_types.count("full_attention") == 3
    start = time.perf_counter()
    again = resolve_model(None)
    assert time.perf_counter() - start < 2.0  # warm: no GGUF parsing
    assert again.tokenizer_path == resolved.tokenizer_path


def test_converted_tokenizer_and_chat_template(default_resolved_model) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(default_resolved_model.tokenizer_path)
    assert tokenizer("Hello world").input_ids == [2, 9259, 1902]
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text == "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"


def test_forward_matches_transformers_fp32(default_resolved_model, tmp_path) -> None:
    """Our paged fp32 forward of the real model == transformers' forward, same weights."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    resolved = default_resolved_model
    ours, _ = load_ours(None, torch.float32)
    # transformers' model over the very same (already verified) weights: a folder with the
    # converted config.json and our dequantized fp32 safetensors.
    weights = cached_weights_file(resolved.model_path, resolved.hf_config, torch.float32)
    (tmp_path / "model.safetensors").symlink_to(weights)
    resolved.hf_config.save_pretrained(str(tmp_path))
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(resolved.tokenizer_path)
    runner = PagedSequenceRunner(ours, resolved.hf_config, block_size=16, num_blocks=64)
    prompts = {f"p{i}": tokenizer(p).input_ids for i, p in enumerate(PROMPTS)}
    for seq_id, ids in prompts.items():
        runner.add(seq_id, ids)
    logits: dict[str, list[torch.Tensor]] = {k: [] for k in prompts}
    step = runner.step([(k, len(v)) for k, v in prompts.items()])
    for _ in range(6):
        for k in prompts:
            logits[k].append(step[k])
            runner.append(k, int(step[k][-1].argmax()))
        step = runner.step([(k, 1) for k in prompts])
    for k in prompts:
        logits[k].append(step[k])
        tokens = runner.sequences[k].token_ids
        ours_logits = torch.cat(logits[k])
        with torch.inference_mode():
            expected = hf(input_ids=torch.tensor([tokens[: ours_logits.shape[0]]])).logits[0].float()
        torch.testing.assert_close(ours_logits, expected, atol=2e-3, rtol=1e-4)
        generated = tokens[len(prompts[k]):]
        assert generated == expected[len(prompts[k]) - 1 : -1].argmax(-1).tolist()
