"""The one place where requests come in: prompts -> validated engine-core requests.

Everything about a request that can be checked before the engine core sees it is
checked here, for the offline ``LLM`` and the API server alike:

- the prompt: text, token ids or ``{"prompt_token_ids": ...}``; ids in the vocabulary;
  not empty; ``truncate_prompt_tokens`` applied; shorter than ``max_model_len``;
- ``max_tokens`` against the room left in the context (``strict_max_tokens``: the API
  rejects a request that cannot fit, as OpenAI does; offline, generation stops at
  ``max_model_len`` with finish reason ``length``, as ``vllm.LLM`` does);
- token ids inside the sampling parameters, the logprobs limit, ``priority`` against the
  scheduling policy, chat options that contradict each other;
- queue capacity (``--max-num-queued-requests``).

Bad input raises :class:`InvalidRequestError` (a ``ValueError``) naming the parameter;
the API server maps it to OpenAI's error body once, in ``entrypoints/openai/errors.py``.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pagedserve.config import ModelConfig, SchedulerConfig
from pagedserve.engine.messages import EngineCoreRequest
from pagedserve.sampling_params import SamplingParams, StructuredOutputsParams

# What generate() accepts for one prompt.
PromptType = str | list[int] | Mapping[str, Any]

MAX_LOGPROBS = 20


class InvalidRequestError(ValueError):
    """A request the engine refuses; ``param`` names the offending parameter (or None)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def check_structured_outputs(params: StructuredOutputsParams, param: str) -> None:
    """InvalidRequestError naming ``param`` when the JSON schema, regex or grammar does not
    compile (checked here, without the model's vocabulary, before the engine sees it)."""
    from pagedserve.structured_output.grammar import GrammarError, grammar_of

    try:
        grammar_of(params)
    except GrammarError as exc:
        raise InvalidRequestError(f"Invalid {params.kind} constraint in {param}: {exc}", param=param) from None


class QueueFullError(RuntimeError):
    """The engine's waiting queue is at --max-num-queued-requests (HTTP 429)."""


@dataclass(frozen=True)
class ProcessedPrompt:
    """A prompt as the engine will see it: text (when known) and token ids."""

    prompt: str | None
    prompt_token_ids: list[int]


def check_chat_options(add_generation_prompt: bool, continue_final_message: bool) -> None:
    """Chat rendering options that contradict each other."""
    if continue_final_message and add_generation_prompt:
        raise InvalidRequestError(
            "Cannot set both `continue_final_message` and `add_generation_prompt` to True.",
            param="continue_final_message",
        )


class InputProcessor:
    """Tokenizes and validates prompts, sampling parameters and request options."""

    def __init__(
        self,
        model_config: ModelConfig,
        scheduler_config: SchedulerConfig,
        tokenizer: Any,
        strict_max_tokens: bool = False,
    ) -> None:
        self.model_config = model_config
        self.tokenizer = tokenizer
        self.vocab_size = model_config.vocab_size
        self.max_model_len = model_config.max_model_len
        self.policy = scheduler_config.policy
        self.max_num_queued_requests = scheduler_config.max_num_queued_requests
        self.strict_max_tokens = strict_max_tokens

    # ------------------------------------------------------------------ prompts
    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=add_special_tokens).input_ids)

    def process_prompt(self, prompt: PromptType, add_special_tokens: bool = True) -> ProcessedPrompt:
        """Text is tokenized; token ids are checked against the vocabulary."""
        if isinstance(prompt, str):
            return ProcessedPrompt(prompt, self.tokenize(prompt, add_special_tokens))
        if isinstance(prompt, Mapping):
            if "prompt_token_ids" in prompt:
                ids = prompt["prompt_token_ids"]
                return ProcessedPrompt(prompt.get("prompt"), self.check_token_ids(ids))
            if "prompt" in prompt and isinstance(prompt["prompt"], str):
                text = prompt["prompt"]
                return ProcessedPrompt(text, self.tokenize(text, add_special_tokens))
            raise InvalidRequestError(
                "A prompt dict must have 'prompt_token_ids' (list of ints) or 'prompt' (str); "
                f"got keys {sorted(prompt)}",
                param="prompt",
            )
        if isinstance(prompt, list | tuple):
            return ProcessedPrompt(None, self.check_token_ids(prompt))
        raise InvalidRequestError(
            f"Unsupported prompt type {type(prompt).__name__}; use str, list of token ids, "
            "or {'prompt_token_ids': [...]}",
            param="prompt",
        )

    def check_token_ids(self, ids: Any, param: str = "prompt") -> list[int]:
        """A list of in-vocabulary token ids (ValueError naming ``param`` otherwise)."""
        if not isinstance(ids, list | tuple) or not all(
            isinstance(t, int) and not isinstance(t, bool) for t in ids
        ):
            raise InvalidRequestError(f"{param} token ids must be a list of integers", param)
        for token_id in ids:
            if not 0 <= token_id < self.vocab_size:
                raise InvalidRequestError(
                    f"Token id {token_id} is out of vocabulary "
                    f"(valid ids are 0..{self.vocab_size - 1})",
                    param,
                )
        return list(ids)

    def fit_prompt(self, processed: ProcessedPrompt, params: SamplingParams) -> ProcessedPrompt:
        """Apply ``truncate_prompt_tokens`` and check the prompt fits the context."""
        ids = processed.prompt_token_ids
        truncate = params.truncate_prompt_tokens
        if truncate is not None and len(ids) > truncate:
            processed = ProcessedPrompt(None, ids[-truncate:])
            ids = processed.prompt_token_ids
        num_input, max_len = len(ids), self.max_model_len
        if num_input == 0:
            raise InvalidRequestError("The prompt cannot be empty.", param="prompt")
        if num_input >= max_len:
            raise InvalidRequestError(
                f"This model's maximum context length is {max_len} tokens. However, your "
                f"request has {num_input} input tokens. Please reduce the length of the "
                f"input (at most {max_len - 1} prompt tokens fit, leaving room for one "
                "generated token).",
                param="input_tokens",
            )
        return processed

    # ------------------------------------------------------------------ requests
    def check_params(self, params: SamplingParams, num_prompt_tokens: int) -> SamplingParams:
        """A copy of ``params`` with ``max_tokens`` resolved; raises on bad values."""
        params = params.clone()
        room = self.max_model_len - num_prompt_tokens
        if params.max_tokens is None:
            params.max_tokens = room
        elif self.strict_max_tokens and params.max_tokens > room:
            raise InvalidRequestError(
                f"'max_tokens' or 'max_completion_tokens' is too large: {params.max_tokens}. "
                f"This model's maximum context length is {self.max_model_len} tokens and your "
                f"request has {num_prompt_tokens} input tokens "
                f"({params.max_tokens} > {self.max_model_len} - {num_prompt_tokens}).",
                param="max_tokens",
            )
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(params, name)
            if value is not None and value > MAX_LOGPROBS:
                raise InvalidRequestError(
                    f"{name} must be at most {MAX_LOGPROBS}, got {value}", param=name
                )
        self.check_token_ids(list(params.stop_token_ids or []), "stop_token_ids")
        if params.allowed_token_ids is not None:
            if not params.allowed_token_ids:
                raise InvalidRequestError(
                    "allowed_token_ids must not be empty", param="allowed_token_ids"
                )
            self.check_token_ids(list(params.allowed_token_ids), "allowed_token_ids")
        for token_id in params.logit_bias or {}:
            if not 0 <= token_id < self.vocab_size:
                raise InvalidRequestError(
                    f"logit_bias token id {token_id} is out of vocabulary "
                    f"(0..{self.vocab_size - 1})",
                    param="logit_bias",
                )
        if params.structured_outputs is not None:
            check_structured_outputs(params.structured_outputs, "structured_outputs")
        return params

    def check_priority(self, priority: Any) -> int:
        if not isinstance(priority, int) or isinstance(priority, bool):
            raise InvalidRequestError(
                f"priority must be an integer, got {priority!r}", param="priority"
            )
        if priority != 0 and self.policy != "priority":
            raise InvalidRequestError(
                f"Got priority {priority} but priority scheduling is not enabled "
                "(start the engine with --scheduling-policy priority).",
                param="priority",
            )
        return priority

    def check_capacity(self, num_queued: int, num_new: int) -> None:
        """QueueFullError if ``num_new`` more requests would overfill the waiting queue."""
        limit = self.max_num_queued_requests
        if limit > 0 and num_queued + num_new > limit:
            raise QueueFullError(
                f"The server is at capacity: {num_queued} requests are waiting "
                f"(--max-num-queued-requests {limit}). Retry later."
            )

    def process_inputs(
        self,
        request_ids: list[str],
        prompt: PromptType | ProcessedPrompt,
        params_list: list[SamplingParams],
        priority: int = 0,
        arrival_time: float | None = None,
        cache_salt: str | None = None,
    ) -> tuple[ProcessedPrompt, list[EngineCoreRequest]]:
        """Validate one prompt and build one engine-core request per (id, params) pair."""
        priority = self.check_priority(priority)
        if cache_salt is not None and (not isinstance(cache_salt, str) or not cache_salt):
            raise InvalidRequestError(
                "cache_salt must be a non-empty string", param="cache_salt"
            )
        processed = prompt if isinstance(prompt, ProcessedPrompt) else self.process_prompt(prompt)
        arrival = time.time() if arrival_time is None else arrival_time
        requests = []
        for request_id, params in zip(request_ids, params_list, strict=True):
            fitted = self.fit_prompt(processed, params)
            checked = self.check_params(params, len(fitted.prompt_token_ids))
            requests.append(
                EngineCoreRequest(
                    request_id=request_id,
                    prompt_token_ids=fitted.prompt_token_ids,
                    sampling_params=checked,
                    arrival_time=arrival,
                    priority=priority,
                    cache_salt=cache_salt,
                )
            )
        return self.fit_prompt(processed, params_list[0]), requests
