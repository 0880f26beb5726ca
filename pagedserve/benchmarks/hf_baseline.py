"""The transformers baseline: static-batch `generate` on the same model and dtype."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch


@dataclass
class BaselineResult:
    batch_size: int
    num_prompts: int
    elapsed_s: float
    output_tokens: int

    @property
    def output_tokens_per_s(self) -> float:
        return self.output_tokens / self.elapsed_s


def load_hf_model(model_path: str, dtype: torch.dtype) -> torch.nn.Module:
    """transformers' own model for a local folder or a .gguf file."""
    from transformers import AutoModelForCausalLM

    if model_path.endswith(".gguf"):
        model = AutoModelForCausalLM.from_pretrained(
            os.path.dirname(model_path), gguf_file=os.path.basename(model_path), dtype=dtype
        )
    else:
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
    return model.eval()


@torch.inference_mode()
def run_hf_generate(
    model: torch.nn.Module,
    prompts: list[list[int]],
    output_len: int,
    batch_size: int,
) -> BaselineResult:
    """Greedy generate in static batches of equal-length prompts, ignoring EOS."""
    total_out = 0
    start = time.perf_counter()
    for begin in range(0, len(prompts), batch_size):
        batch = torch.tensor(prompts[begin : begin + batch_size], dtype=torch.long)
        out = model.generate(
            input_ids=batch,
            attention_mask=torch.ones_like(batch),
            max_new_tokens=output_len,
            min_new_tokens=output_len,
            do_sample=False,
            pad_token_id=0,
        )
        total_out += (out.shape[1] - batch.shape[1]) * batch.shape[0]
    return BaselineResult(batch_size, len(prompts), time.perf_counter() - start, total_out)
