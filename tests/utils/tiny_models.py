"""Tiny random-weight checkpoints, one per supported architecture, for fast tests.

``build_tiny_model(arch, cache_dir)`` writes an HF folder (config.json, model.safetensors,
tokenizer files, generation_config.json) once and returns its path; later calls reuse it.
Each has a small byte-level BPE tokenizer (``<pad>``=0, ``<s>``=1 (BOS, prepended),
``</s>``=2 (EOS), ``<unk>``=3) and a simple chat template, vocabulary 384, hidden 64,
GQA (fewer KV heads than query heads). Weights are random but large enough that logits
are peaked, so greedy decoding is not a coin toss between near-ties.

Architectures (``TINY_ARCHS``):
- ``llama``: LlamaForCausalLM, llama3 rope scaling, untied head.
- ``mistral``: MistralForCausalLM, sliding_window=8 on every layer.
- ``qwen2``: Qwen2ForCausalLM, qkv bias, tied head.
- ``qwen3``: Qwen3ForCausalLM, q/k norm, head_dim 32 != hidden/heads, MQA (1 KV head).
- ``gemma3``: Gemma3ForCausalLM, sliding_window=8 on layers 0, 1, 3 (full on 2), linear
  rope scaling on full layers, query_pre_attn_scalar 24, final logit softcap 30, tied head.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

TINY_ARCHS = ("llama", "mistral", "qwen2", "qwen3", "gemma3")
TINY_VOCAB_SIZE = 384
_SPEC_VERSION = 1

_COMMON: dict[str, Any] = {
    "vocab_size": TINY_VOCAB_SIZE,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}

_SPECS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": (
        "LlamaConfig",
        {
            "tie_word_embeddings": False,
            "rope_parameters": {
                "rope_type": "llama3",
                "rope_theta": 10000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        },
    ),
    "mistral": ("MistralConfig", {"sliding_window": 8, "tie_word_embeddings": False}),
    "qwen2": ("Qwen2Config", {"tie_word_embeddings": True}),
    "qwen3": (
        "Qwen3Config",
        {"num_hidden_layers": 3, "num_key_value_heads": 1, "head_dim": 32, "tie_word_embeddings": False},
    ),
    "gemma3": (
        "Gemma3TextConfig",
        {
            "num_hidden_layers": 4,
            "head_dim": 16,
            "sliding_window": 8,
            "layer_types": ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
            "query_pre_attn_scalar": 24,
            "final_logit_softcapping": 30.0,
            "rope_parameters": {
                "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            },
            "tie_word_embeddings": True,
        },
    ),
}

_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

_TRAINING_TEXT = """
The quick brown fox jumps over the lazy dog. A paged key-value cache stores attention
keys and values in fixed-size blocks. The scheduler decides which requests run in each
step; decoding requests cost one token each, while prompts are prefilled in chunks.
Once upon a time, in a small village by the sea, there lived a fisherman and his wife.
def fibonacci(n):
    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)
1, 2, 3, 5, 8, 13, 21, 34, 55, 89. The capital of France is Paris. Hello, world!
"""


def _spec_key(arch: str) -> str:
    class_name, overrides = _SPECS[arch]
    blob = json.dumps([_SPEC_VERSION, class_name, _COMMON, overrides], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def default_cache_dir() -> Path:
    """``tests/.cache/tiny-models`` (gitignored)."""
    return Path(__file__).resolve().parents[1] / ".cache" / "tiny-models"


def make_tiny_config(arch: str) -> Any:
    """The transformers config of a tiny model."""
    import transformers

    if arch not in _SPECS:
        raise ValueError(f"unknown tiny arch {arch!r}; choose from {TINY_ARCHS}")
    class_name, overrides = _SPECS[arch]
    kwargs = {**_COMMON, **json.loads(json.dumps(overrides))}
    return getattr(transformers, class_name)(**kwargs)


def make_tiny_tokenizer() -> Any:
    """A byte-level BPE PreTrainedTokenizerFast whose vocabulary fits TINY_VOCAB_SIZE."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB_SIZE - 8,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([_TRAINING_TEXT] * 4, trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    assert tokenizer.get_vocab_size() <= TINY_VOCAB_SIZE
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
    )
    wrapped.chat_template = _CHAT_TEMPLATE
    return wrapped


def _randomize(model: Any, seed: int) -> None:
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if "norm" in name:
                param.add_(0.2 * noise)  # around 1 (Llama) or 0 (Gemma, stored as w - 1)
            elif param.dim() == 1:
                param.copy_(0.1 * noise)  # biases
            else:
                param.copy_(noise / param.shape[-1] ** 0.5 * 1.5)


def build_tiny_model(arch: str, cache_dir: str | os.PathLike[str] | None = None) -> str:
    """Build (once) and return the folder of the tiny ``arch`` checkpoint."""
    import torch
    from transformers import AutoModelForCausalLM

    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = root / f"{arch}-{_spec_key(arch)}"
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return str(target)
    config = make_tiny_config(arch)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _randomize(model, seed=TINY_ARCHS.index(arch) + 1)
    tmp = root / f".{target.name}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(str(tmp))
    make_tiny_tokenizer().save_pretrained(str(tmp))
    try:
        os.replace(tmp, target)
    except OSError:  # another process won the race
        shutil.rmtree(tmp, ignore_errors=True)
    return str(target)
