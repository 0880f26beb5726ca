"""Datasets of `pagedserve bench serve`: random, sharegpt, prefix-repetition, custom.

Each produces ``SampleRequest``s (prompt text, its length in tokens, the output length to
ask for), as vLLM's benchmark datasets do, reproducibly from ``--seed``.

- ``random``: random token ids (special tokens excluded), decoded to text and re-encoded
  so the prompt is exactly what the server will see; input and output lengths drawn
  uniformly from ``[len * (1 - range_ratio), len * (1 + range_ratio)]``; an optional shared
  random prefix of ``--random-prefix-len`` tokens.
- ``sharegpt``: a local ShareGPT JSON file (``--dataset-path``): the first human turn is
  the prompt, the first reply's length is the output length (unless
  ``--sharegpt-output-len``); too short or too long conversations are skipped as vLLM does.
- ``prefix-repetition``: ``--prefix-repetition-num-prefixes`` random prefixes, each
  request one of them plus a random suffix (prefix-cache workloads).
- ``custom``: a JSONL file of ``{"prompt": ...}`` lines (``--dataset-path``), with the
  tokenizer's chat template applied unless ``--custom-skip-chat-template``.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

DATASET_NAMES = ("random", "sharegpt", "prefix-repetition", "custom")


@dataclass
class SampleRequest:
    """One benchmark request: the prompt, its length in tokens and the output length."""

    prompt: str
    prompt_len: int
    expected_output_len: int


def get_bench_tokenizer(name: str | None) -> Any:
    """A tokenizer for ``name``: a local folder, a .gguf file, a hub id in the local cache,
    or (None / the default model's served name) the bundled default model's tokenizer."""
    from pagedserve.engine.arg_utils import DEFAULT_MODEL_NAME
    from pagedserve.transformers_utils.resolve import resolve_model
    from pagedserve.transformers_utils.tokenizer import load_tokenizer

    target = None if name in (None, "", DEFAULT_MODEL_NAME) else name
    try:
        return load_tokenizer(resolve_model(target).tokenizer_path)
    except (ValueError, OSError) as first_error:
        try:
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(target)
        except Exception as exc:
            raise ValueError(
                f"cannot load a tokenizer for {name!r} ({first_error}; {exc}); "
                "pass --tokenizer with a local folder, a .gguf file or a cached hub id"
            ) from exc


def _usable_token_ids(tokenizer: Any) -> np.ndarray:
    vocab_size = len(tokenizer)
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    ids = np.arange(vocab_size)
    if special:
        ids = ids[~np.isin(ids, np.fromiter(special, dtype=np.int64))]
    return ids


def _lengths(rng: np.random.Generator, length: int, range_ratio: float, num: int) -> np.ndarray:
    low = max(1, int(length * (1 - range_ratio)))
    high = max(low, int(length * (1 + range_ratio)))
    return rng.integers(low, high + 1, size=num)


def _text_of(tokenizer: Any, token_ids: list[int], target_len: int) -> tuple[str, int]:
    """Decode ids to text, re-encode and cut to ``target_len`` tokens: (text, its length)."""
    text = tokenizer.decode(token_ids)
    # decode/encode is not always a fixed point (merges, partial UTF-8): iterate a few times,
    # then report the length of the text actually sent.
    for _ in range(4):
        re_encoded = tokenizer.encode(text, add_special_tokens=False)[:target_len]
        new_text = tokenizer.decode(re_encoded)
        if new_text == text:
            break
        text = new_text
    return text, len(tokenizer.encode(text, add_special_tokens=False))


def sample_random(
    tokenizer: Any,
    num_requests: int,
    input_len: int = 1024,
    output_len: int = 128,
    range_ratio: float = 0.0,
    prefix_len: int = 0,
    seed: int = 0,
) -> list[SampleRequest]:
    """Random-token prompts (vLLM's RandomDataset)."""
    if not 0.0 <= range_ratio < 1.0:
        raise ValueError(f"--random-range-ratio must be in [0, 1), got {range_ratio}")
    if input_len < 1 or output_len < 1:
        raise ValueError("--random-input-len and --random-output-len must be >= 1")
    rng = np.random.default_rng(seed)
    usable = _usable_token_ids(tokenizer)
    prefix = usable[rng.integers(0, len(usable), size=prefix_len)].tolist() if prefix_len else []
    input_lens = _lengths(rng, input_len, range_ratio, num_requests)
    output_lens = _lengths(rng, output_len, range_ratio, num_requests)
    offsets = rng.integers(0, len(usable), size=num_requests)
    requests = []
    for i in range(num_requests):
        positions = (offsets[i] + i + np.arange(input_lens[i])) % len(usable)
        token_ids = prefix + usable[positions].tolist()
        prompt, prompt_len = _text_of(tokenizer, token_ids, prefix_len + int(input_lens[i]))
        requests.append(SampleRequest(prompt, prompt_len, int(output_lens[i])))
    return requests


def sample_prefix_repetition(
    tokenizer: Any,
    num_requests: int,
    prefix_len: int = 256,
    suffix_len: int = 256,
    num_prefixes: int = 10,
    output_len: int = 128,
    seed: int = 0,
) -> list[SampleRequest]:
    """Requests sharing one of ``num_prefixes`` random prefixes (vLLM's PrefixRepetition)."""
    if num_prefixes < 1:
        raise ValueError("--prefix-repetition-num-prefixes must be >= 1")
    rng = np.random.default_rng(seed)
    usable = _usable_token_ids(tokenizer)
    requests = []
    per_prefix = -(-num_requests // num_prefixes)
    for _ in range(num_prefixes):
        prefix_ids = usable[rng.integers(0, len(usable), size=prefix_len)].tolist()
        prefix_text, _ = _text_of(tokenizer, prefix_ids, prefix_len)
        for _ in range(per_prefix):
            suffix_ids = usable[rng.integers(0, len(usable), size=suffix_len)].tolist()
            suffix_text, _ = _text_of(tokenizer, suffix_ids, suffix_len)
            prompt = prefix_text + suffix_text
            prompt_len = len(tokenizer.encode(prompt, add_special_tokens=False))
            requests.append(SampleRequest(prompt, prompt_len, output_len))
    order = rng.permutation(len(requests))
    return [requests[i] for i in order[:num_requests]]


def sample_sharegpt(
    tokenizer: Any,
    dataset_path: str,
    num_requests: int,
    output_len: int | None = None,
    seed: int = 0,
) -> list[SampleRequest]:
    """Conversations of a local ShareGPT JSON file (vLLM's ShareGPTDataset filters)."""
    if not dataset_path or not os.path.isfile(dataset_path):
        raise ValueError(f"--dataset-path must be a ShareGPT JSON file, got {dataset_path!r}")
    with open(dataset_path) as f:
        data = json.load(f)
    data = [d for d in data if len(d.get("conversations", d.get("conversation", []))) >= 2]
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(data))
    requests: list[SampleRequest] = []
    for index in order:
        if len(requests) >= num_requests:
            break
        turns = data[index].get("conversations", data[index].get("conversation"))
        prompt, completion = turns[0]["value"], turns[1]["value"]
        prompt_len = len(tokenizer.encode(prompt, add_special_tokens=False))
        completion_len = len(tokenizer.encode(completion, add_special_tokens=False))
        new_output_len = output_len if output_len is not None else completion_len
        if prompt_len < 4 or new_output_len < 4:
            continue  # too short to measure
        if output_len is None and (prompt_len > 1024 or prompt_len + new_output_len > 2048):
            continue  # too long (as vLLM, only without a fixed output length)
        requests.append(SampleRequest(prompt, prompt_len, new_output_len))
    if len(requests) < num_requests:
        logger.warning("the ShareGPT file gave %d usable requests of %d asked",
                       len(requests), num_requests)
    return requests


def sample_custom(
    tokenizer: Any,
    dataset_path: str,
    num_requests: int,
    output_len: int = 256,
    skip_chat_template: bool = False,
    seed: int = 0,
) -> list[SampleRequest]:
    """Prompts of a JSONL file with a "prompt" field per line (vLLM's CustomDataset)."""
    if not dataset_path or not os.path.isfile(dataset_path):
        raise ValueError(f"--dataset-path must be a JSONL file, got {dataset_path!r}")
    prompts: list[str] = []
    with open(dataset_path) as f:
        for line_number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{dataset_path}:{line_number}: not JSON: {exc}") from exc
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
                raise ValueError(f"{dataset_path}:{line_number}: needs a string 'prompt' field")
            prompts.append(row["prompt"])
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(prompts))
    use_template = not skip_chat_template and getattr(tokenizer, "chat_template", None)
    requests = []
    for index in order[:num_requests]:
        prompt = prompts[index]
        if use_template:
            prompt = tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)
        prompt_len = len(tokenizer.encode(prompt, add_special_tokens=False))
        requests.append(SampleRequest(prompt, prompt_len, output_len))
    return requests


def get_samples(args: Any, tokenizer: Any) -> list[SampleRequest]:
    """The requests of `bench serve` for its parsed flags."""
    name = args.dataset_name
    if name == "random":
        return sample_random(
            tokenizer, args.num_prompts, args.random_input_len, args.random_output_len,
            args.random_range_ratio, args.random_prefix_len, args.seed)
    if name == "prefix-repetition":
        return sample_prefix_repetition(
            tokenizer, args.num_prompts, args.prefix_repetition_prefix_len,
            args.prefix_repetition_suffix_len, args.prefix_repetition_num_prefixes,
            args.prefix_repetition_output_len, args.seed)
    if name == "sharegpt":
        return sample_sharegpt(tokenizer, args.dataset_path, args.num_prompts,
                               args.sharegpt_output_len, args.seed)
    if name == "custom":
        return sample_custom(tokenizer, args.dataset_path, args.num_prompts,
                             args.custom_output_len, args.custom_skip_chat_template, args.seed)
    raise ValueError(f"--dataset-name must be one of {DATASET_NAMES}, got {name!r}")
