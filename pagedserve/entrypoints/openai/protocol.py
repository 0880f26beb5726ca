"""Request bodies of the OpenAI-compatible API (pydantic), and their SamplingParams.

Field names, types and defaults follow OpenAI's API plus vLLM's extras. Unknown
fields are accepted (``extra="allow"``) and logged by the server, never rejected.
"""

from __future__ import annotations

import logging
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from pagedserve.engine.input_processor import InvalidRequestError, check_structured_outputs
from pagedserve.entrypoints.openai.tool_calls import ForcedToolCall, forced_tool_call
from pagedserve.sampling_params import RequestOutputKind, SamplingParams, StructuredOutputsParams

_INT64_MIN = -(2**63)
_INT64_MAX = 2**63 - 1
# OpenAI and vLLM clamp logit_bias values to this range.
_LOGIT_BIAS_LIMIT = 100.0


logger = logging.getLogger(__name__)


class OpenAIBaseModel(BaseModel):
    """Accepts unknown fields (kept in ``model_extra``) so clients of newer APIs work."""

    model_config = ConfigDict(extra="allow", protected_namespaces=())


class StreamOptions(OpenAIBaseModel):
    include_usage: bool | None = True
    continuous_usage_stats: bool | None = False


class _SamplingFields(OpenAIBaseModel):
    """Fields shared by completions and chat completions."""

    model: str | None = None
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=_INT64_MIN, le=_INT64_MAX)
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0
    logit_bias: dict[str, float] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # vLLM's extras
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    truncate_prompt_tokens: int | None = None
    prompt_logprobs: int | None = None
    allowed_token_ids: list[int] | None = None
    priority: int = 0
    request_id: str | None = None
    return_token_ids: bool | None = False
    cache_salt: str | None = None
    # Structured outputs: OpenAI's response_format, vLLM's structured_outputs and its
    # older guided_* names (accepted with a deprecation log line).
    response_format: dict[str, Any] | None = None
    structured_outputs: dict[str, Any] | None = None
    guided_json: Any = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_decoding_backend: str | None = None
    # pagedserve: a `timings` object (queue/prefill/decode/TTFT ms, cached tokens, tokens/s)
    # in the response or the final streamed chunk; also on for all with --enable-response-timings.
    return_timings: bool | None = False

    def check_stream_options(self) -> None:
        if self.stream_options is not None and not self.stream:
            raise ValueError("Stream options can only be defined when `stream=True`.")

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def continuous_usage_stats(self) -> bool:
        return bool(
            self.stream_options
            and self.stream_options.include_usage
            and self.stream_options.continuous_usage_stats
        )

    def _logit_bias(self) -> dict[int, float] | None:
        if not self.logit_bias:
            return None
        bias: dict[int, float] = {}
        for key, value in self.logit_bias.items():
            try:
                token_id = int(key)
            except ValueError:
                raise ValueError(
                    f"logit_bias keys must be token ids (integers), got {key!r}"
                ) from None
            bias[token_id] = min(_LOGIT_BIAS_LIMIT, max(-_LOGIT_BIAS_LIMIT, float(value)))
        return bias

    def forced_tool_call(self) -> ForcedToolCall | None:
        """Chat only: the constraint a forcing ``tool_choice`` asks for."""
        return None

    def _structured_outputs(self) -> StructuredOutputsParams | None:
        """The request's constraint, from whichever field carries it; InvalidRequestError
        naming that field when it is malformed or does not compile."""
        sources: list[tuple[str, dict[str, Any]]] = []
        forced = self.forced_tool_call()
        if forced is not None:
            sources.append(("tool_choice", {"json": forced.schema}))
        if self.response_format is not None:
            sources.extend(_from_response_format(self.response_format))
        if self.structured_outputs is not None:
            if not isinstance(self.structured_outputs, dict):
                raise InvalidRequestError("structured_outputs must be an object", param="structured_outputs")
            sources.append(("structured_outputs", dict(self.structured_outputs)))
        legacy = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice",
                  "guided_grammar": "grammar"}
        for name, kind in legacy.items():
            value = getattr(self, name)
            if value is not None:
                logger.warning("%s is deprecated: use structured_outputs={'%s': ...}", name, kind)
                sources.append((name, {kind: value}))
        if not sources:
            return None
        if len(sources) > 1:
            names = ", ".join(name for name, _ in sources)
            raise InvalidRequestError(f"give one structured-output constraint, got {names}",
                                      param=sources[1][0])
        param, fields = sources[0]
        fields.pop("backend", None)
        fields.pop("disable_any_whitespace", None)
        try:
            params = StructuredOutputsParams(**fields)
        except (TypeError, ValueError) as exc:
            raise InvalidRequestError(f"{param}: {exc}", param=param) from None
        check_structured_outputs(params, param)
        return params

    def _sampling_params(
        self, max_tokens: int | None, logprobs: int | None, prompt_logprobs: int | None
    ) -> SamplingParams:
        """Build validated SamplingParams (raises ValueError naming the bad field)."""
        self.check_stream_options()
        return SamplingParams(
            n=self.n,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=-1 if self.top_k is None else self.top_k,
            min_p=0.0 if self.min_p is None else self.min_p,
            seed=self.seed,
            stop=self.stop,
            stop_token_ids=self.stop_token_ids,
            ignore_eos=self.ignore_eos,
            max_tokens=max_tokens,
            min_tokens=self.min_tokens,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            skip_special_tokens=self.skip_special_tokens,
            spaces_between_special_tokens=self.spaces_between_special_tokens,
            include_stop_str_in_output=self.include_stop_str_in_output,
            logit_bias=self._logit_bias(),
            allowed_token_ids=self.allowed_token_ids,
            truncate_prompt_tokens=self.truncate_prompt_tokens,
            output_kind=RequestOutputKind.DELTA if self.stream else RequestOutputKind.FINAL_ONLY,
            structured_outputs=self._structured_outputs(),
        )


def _from_response_format(response_format: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """OpenAI's response_format as structured-output fields ([] for plain text)."""
    param = "response_format"
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind == "text":
        return []
    if kind == "json_object":
        return [(param, {"json_object": True})]
    if kind == "json_schema":
        json_schema = response_format.get("json_schema")
        if not isinstance(json_schema, dict) or "schema" not in json_schema:
            raise InvalidRequestError(
                "response_format of type json_schema needs json_schema.schema", param=param
            )
        return [(param, {"json": json_schema["schema"]})]
    raise InvalidRequestError(
        f"response_format.type must be text, json_object or json_schema, got {kind!r}", param=param
    )


PromptInput = list[int] | list[list[int]] | str | list[str]


class CompletionRequest(_SamplingFields):
    """POST /v1/completions."""

    prompt: PromptInput
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool | None = False
    suffix: str | None = None
    best_of: int | None = None
    add_special_tokens: bool = True

    def to_sampling_params(self, max_tokens: int | None) -> SamplingParams:
        if self.suffix is not None:
            raise ValueError("suffix is not supported")
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError(f"best_of must equal n (best_of > n is not supported), got {self.best_of}")
        if self.logprobs is not None and self.logprobs < 0:
            raise ValueError(f"logprobs must be >= 0, got {self.logprobs}.")
        prompt_logprobs = self.prompt_logprobs
        if self.echo and self.logprobs is not None and prompt_logprobs is None:
            # As vLLM: echo with logprobs reports the prompt tokens' logprobs too.
            prompt_logprobs = self.logprobs
        return self._sampling_params(max_tokens, self.logprobs, prompt_logprobs)


class ChatCompletionRequest(_SamplingFields):
    """POST /v1/chat/completions."""

    messages: list[dict[str, Any]]
    max_tokens: int | None = None  # deprecated by OpenAI in favour of max_completion_tokens
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = 0
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = True
    echo: bool = False
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None

    def forced_tool_call(self) -> ForcedToolCall | None:
        return forced_tool_call(self.tools, self.tool_choice, self.parallel_tool_calls)

    @property
    def requested_max_tokens(self) -> int | None:
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens
        return self.max_tokens

    def to_sampling_params(self, max_tokens: int | None) -> SamplingParams:
        if self.top_logprobs is not None and self.top_logprobs < 0:
            raise ValueError(f"top_logprobs must be >= 0, got {self.top_logprobs}.")
        if self.top_logprobs and not self.logprobs:
            raise ValueError("when using `top_logprobs`, `logprobs` must be set to true.")
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return self._sampling_params(max_tokens, logprobs, self.prompt_logprobs)


class TokenizeRequest(OpenAIBaseModel):
    """POST /tokenize: a prompt, or chat messages rendered with the chat template."""

    model: str | None = None
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    add_special_tokens: bool | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    return_token_strs: bool | None = False


class DetokenizeRequest(OpenAIBaseModel):
    """POST /detokenize."""

    model: str | None = None
    tokens: list[int]
