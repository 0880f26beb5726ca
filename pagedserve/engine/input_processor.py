"""Turn user prompts into validated engine-core requests (tokens, limits, params)."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pagedserve.config import ModelConfig
from pagedserve.engine.messages import EngineCoreRequest
from pagedserve.sampling_params import SamplingParams

# What generate() accepts for one prompt.
PromptType = str | list[int] | Mapping[str, Any]

MAX_LOGPROBS = 20


@dataclass
class ProcessedPrompt:
    """A prompt as text (when known) and token ids."""

    prompt: str | None
    prompt_token_ids: list[int]


class InputProcessor:
    """Tokenizes and validates prompts and sampling parameters."""

    def __init__(self, model_config: ModelConfig, tokenizer: Any) -> None:
        self.model_config = model_config
        self.tokenizer = tokenizer
        self.vocab_size = model_config.vocab_size

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=add_special_tokens).input_ids)

    def process_prompt(self, prompt: PromptType) -> ProcessedPrompt:
        if isinstance(prompt, str):
            return ProcessedPrompt(prompt, self.tokenize(prompt))
        if isinstance(prompt, Mapping):
            if "prompt_token_ids" in prompt:
                ids = prompt["prompt_token_ids"]
                return ProcessedPrompt(prompt.get("prompt"), self._check_ids(ids))
            if "prompt" in prompt and isinstance(prompt["prompt"], str):
                return ProcessedPrompt(prompt["prompt"], self.tokenize(prompt["prompt"]))
            raise ValueError(
                "A prompt dict must have 'prompt_token_ids' (list of ints) or 'prompt' (str); "
                f"got keys {sorted(prompt)}"
            )
        if isinstance(prompt, list | tuple):
            return ProcessedPrompt(None, self._check_ids(prompt))
        raise ValueError(
            f"Unsupported prompt type {type(prompt).__name__}; use str, list of token ids, "
            "or {'prompt_token_ids': [...]}"
        )

    def _check_ids(self, ids: Any) -> list[int]:
        if not isinstance(ids, list | tuple) or not all(
            isinstance(t, int) and not isinstance(t, bool) for t in ids
        ):
            raise ValueError("prompt_token_ids must be a list of integers")
        bad = [t for t in ids if t < 0 or t >= self.vocab_size]
        if bad:
            raise ValueError(
                f"Token id {bad[0]} is out of vocabulary (valid ids are 0..{self.vocab_size - 1})"
            )
        return list(ids)

    def make_child_requests(
        self,
        parent: Any,
        processed: ProcessedPrompt,
        priority: int = 0,
        arrival_time: float | None = None,
    ) -> list[EngineCoreRequest]:
        """One engine-core request per child of ``parent`` (a ParentRequest; n of them)."""
        arrival = time.time() if arrival_time is None else arrival_time
        return [
            self.make_request(
                parent.child_request_id(i), processed, parent.child_params(i), priority, arrival
            )
            for i in range(parent.n)
        ]

    def make_request(
        self,
        request_id: str,
        processed: ProcessedPrompt,
        params: SamplingParams,
        priority: int = 0,
        arrival_time: float | None = None,
    ) -> EngineCoreRequest:
        """Validate limits and build the engine-core request (params are copied)."""
        params = params.clone()
        token_ids = processed.prompt_token_ids
        if params.truncate_prompt_tokens is not None:
            token_ids = token_ids[-params.truncate_prompt_tokens :]
        max_model_len = self.model_config.max_model_len
        if not token_ids:
            raise ValueError("The prompt cannot be empty")
        if len(token_ids) >= max_model_len:
            raise ValueError(
                f"The prompt (length {len(token_ids)}) is longer than the maximum model "
                f"length of {max_model_len}: at most {max_model_len - 1} prompt tokens fit, "
                "leaving room for one generated token."
            )
        if params.max_tokens is None:
            params.max_tokens = max_model_len - len(token_ids)
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(params, name)
            if value is not None and value > MAX_LOGPROBS:
                raise ValueError(f"{name} must be at most {MAX_LOGPROBS}, got {value}")
        for token_id in list(params.stop_token_ids or []) + list(params.allowed_token_ids or []):
            if not 0 <= token_id < self.vocab_size:
                raise ValueError(f"token id {token_id} is out of vocabulary (0..{self.vocab_size - 1})")
        if params.allowed_token_ids is not None and not params.allowed_token_ids:
            raise ValueError("allowed_token_ids must not be empty")
        for token_id in params.logit_bias or {}:
            if not 0 <= token_id < self.vocab_size:
                raise ValueError(
                    f"logit_bias token id {token_id} is out of vocabulary (0..{self.vocab_size - 1})"
                )
        if not isinstance(priority, int):
            raise ValueError(f"priority must be an integer, got {priority!r}")
        return EngineCoreRequest(
            request_id=request_id,
            prompt_token_ids=token_ids,
            sampling_params=params,
            arrival_time=time.time() if arrival_time is None else arrival_time,
            priority=priority,
        )
