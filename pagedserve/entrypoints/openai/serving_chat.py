"""POST /v1/chat/completions: messages rendered with the chat template, then generated."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from pagedserve.engine.input_processor import (
    InvalidRequestError,
    ProcessedPrompt,
    check_chat_options,
)
from pagedserve.entrypoints.openai.errors import OpenAIError, to_openai_error
from pagedserve.entrypoints.openai.protocol import ChatCompletionRequest
from pagedserve.entrypoints.openai.reasoning import (
    REASONING_PARSERS,
    ReasoningParser,
    StreamingReasoning,
)
from pagedserve.entrypoints.openai.serving_common import (
    SSE_DONE,
    ServingBase,
    SSEResponse,
    clamp_logprob,
    engine_failure,
    prompt_logprobs_json,
    run_until_disconnected,
    sse,
    usage_dict,
)
from pagedserve.entrypoints.openai.tool_calls import ForcedToolCall, tool_calls_of
from pagedserve.entrypoints.openai.tool_parsers import TOOL_PARSERS, StreamingToolCalls, ToolParser
from pagedserve.outputs import CompletionOutput, Logprob, RequestOutput

logger = logging.getLogger(__name__)

def normalize_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Validated copies of OpenAI messages, content as one string (ValueError -> 400)."""
    from pagedserve.transformers_utils.chat_templates import validate_conversation

    return validate_conversation(messages)


class OpenAIServingChat(ServingBase):
    """Handles /v1/chat/completions (and renders chats for /tokenize)."""

    request_id_prefix = "chatcmpl"
    operation = "chat"

    def render(
        self,
        messages: list[dict[str, Any]],
        chat_template: str | None,
        add_generation_prompt: bool,
        continue_final_message: bool,
        chat_template_kwargs: dict[str, Any] | None,
        tools: list[dict[str, Any]] | None,
        add_special_tokens: bool | None,
    ) -> ProcessedPrompt:
        """Render messages with the chat template and tokenize them."""
        from pagedserve.transformers_utils.chat_templates import (
            apply_chat_template,
            resolve_chat_template,
        )

        check_chat_options(add_generation_prompt, continue_final_message)
        conversation = normalize_messages(messages)
        tokenizer = self.ctx.tokenizer
        if chat_template is not None:
            model_type = getattr(self.ctx.model_config.hf_config, "model_type", "")
            template = resolve_chat_template(tokenizer, model_type, chat_template)
        elif self.ctx.chat_template is not None:
            template = self.ctx.chat_template
        else:
            raise OpenAIError(
                self.ctx.chat_template_error
                or "This model has no chat template; start the server with --chat-template.",
                param="chat_template",
            )
        text = apply_chat_template(
            tokenizer,
            conversation,
            chat_template=template,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            chat_template_kwargs=chat_template_kwargs,
            tools=tools,
        )
        if add_special_tokens is None:
            # The template usually writes the BOS token itself; never add a second one.
            bos = getattr(tokenizer, "bos_token", None)
            add_special_tokens = not (bos and text.startswith(bos))
        return ProcessedPrompt(text, self.tokenize(text, add_special_tokens))

    def _auto_tool_parser(self, request: ChatCompletionRequest) -> ToolParser | None:
        """The parser for a tool_choice "auto" answer (None: not enabled, no tools, or
        another tool_choice)."""
        config = self.ctx.server_config
        if not request.tools or request.tool_choice not in (None, "auto"):
            return None
        if not config.enable_auto_tool_choice:
            return None
        assert config.tool_call_parser is not None
        return TOOL_PARSERS[config.tool_call_parser]()

    def _reasoning_parser(self) -> ReasoningParser | None:
        name = self.ctx.server_config.reasoning_parser
        return None if name is None else REASONING_PARSERS[name]

    def _check_tool_choice(self, request: ChatCompletionRequest) -> None:
        if request.tool_choice == "auto" and not self.ctx.server_config.enable_auto_tool_choice:
            raise InvalidRequestError(
                '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser '
                "to be set", param="tool_choice",
            )

    async def create_chat_completion(
        self, request: ChatCompletionRequest, raw_request: Request
    ) -> Response:
        self.log_unknown_fields(request)
        self._check_tool_choice(request)
        model_name = self.check_model(request.model)
        add_special = (
            request.add_special_tokens if "add_special_tokens" in request.model_fields_set else None
        )
        prompt = self.render(
            request.messages,
            request.chat_template,
            request.add_generation_prompt,
            request.continue_final_message,
            request.chat_template_kwargs,
            request.tools,
            add_special,
        )
        params = request.to_sampling_params(request.requested_max_tokens)
        request_id = self.request_id(raw_request, request.request_id)
        trace_contexts = self.trace_contexts(
            raw_request, model_name, lambda: [list(request.messages)]
        )
        collectors = self.add_requests(
            request_id, [prompt], [params], request.priority, request.cache_salt, trace_contexts
        )
        created = int(time.time())
        role = "assistant" if request.add_generation_prompt else request.messages[-1]["role"]
        echo_text = ""
        if request.echo and request.messages and request.messages[-1].get("role") == role:
            echo_text = normalize_messages(request.messages[-1:])[0]["content"]
        if request.stream:
            return SSEResponse(
                self._stream(request, request_id, model_name, created, role, echo_text, collectors)
            )
        result = await run_until_disconnected(
            self._full(request, request_id, model_name, created, role, echo_text, collectors),
            raw_request,
        )
        if result is None:
            return Response(status_code=499)
        return JSONResponse(result)

    # ---------------------------------------------------------------- logprobs
    def _logprobs(
        self, token_ids: list[int], steps: list[dict[int, Logprob]] | None, num_top: int
    ) -> dict[str, Any]:
        tokenizer = self.ctx.tokenizer
        content = []
        for token_id, step in zip(token_ids, steps or [], strict=False):
            chosen = step.get(token_id) if step else None
            text = (
                chosen.decoded_token
                if chosen is not None and chosen.decoded_token is not None
                else tokenizer.decode([token_id])
            )
            ranked = sorted((step or {}).items(), key=lambda item: -item[1].logprob)[:num_top]
            top = []
            for top_id, top_lp in ranked:
                top_text = (
                    top_lp.decoded_token
                    if top_lp.decoded_token is not None
                    else tokenizer.decode([top_id])
                )
                top.append(
                    {
                        "token": top_text,
                        "logprob": clamp_logprob(top_lp.logprob),
                        "bytes": list(top_text.encode("utf-8")),
                    }
                )
            content.append(
                {
                    "token": text,
                    "logprob": clamp_logprob(chosen.logprob) if chosen is not None else MIN_NONE,
                    "bytes": list(text.encode("utf-8")),
                    "top_logprobs": top,
                }
            )
        return {"content": content}

    def _choice_logprobs(
        self, request: ChatCompletionRequest, completion: CompletionOutput
    ) -> dict[str, Any] | None:
        if not request.logprobs:
            return None
        return self._logprobs(
            list(completion.token_ids), completion.logprobs, request.top_logprobs or 0
        )

    # ---------------------------------------------------------------- full
    async def _full(
        self,
        request: ChatCompletionRequest,
        request_id: str,
        model_name: str,
        created: int,
        role: str,
        echo_text: str,
        collectors: list,
    ) -> dict[str, Any]:
        final = None
        async for _, output in self.iterate(collectors):
            if output.finished:
                final = output
        assert final is not None
        failure = engine_failure(final)
        if failure is not None:
            raise failure
        choices = []
        forced = request.forced_tool_call()
        parser = self._auto_tool_parser(request)
        reasoning_parser = self._reasoning_parser()
        for completion in final.outputs:
            text, reasoning = completion.text, None
            if reasoning_parser is not None:
                reasoning, answer = reasoning_parser.extract(text)
                text = answer or ""
            content: str | None = echo_text + text
            finish_reason = completion.finish_reason
            tool_calls = _forced_calls(forced, text, finish_reason)
            if tool_calls:
                content, finish_reason = None, "tool_calls"
            elif parser is not None:
                extracted = parser.extract(text)
                if extracted.calls:
                    tool_calls = extracted.openai_tool_calls()
                    content = None if extracted.content is None else echo_text + extracted.content
                    finish_reason = "tool_calls"
            choice: dict[str, Any] = {
                "index": completion.index,
                "message": {
                    "role": role,
                    "content": content,
                    "reasoning_content": reasoning,
                    "tool_calls": tool_calls or [],
                },
                "logprobs": self._choice_logprobs(request, completion),
                "finish_reason": finish_reason,
                "stop_reason": completion.stop_reason,
            }
            if request.return_token_ids:
                choice["token_ids"] = list(completion.token_ids)
            choices.append(choice)
        completion_tokens = sum(len(c.token_ids) for c in final.outputs)
        response: dict[str, Any] = {
            "id": request_id,
            "object": "chat.completion",
            "created": created,
            "model": model_name,
            "choices": choices,
            "usage": usage_dict(
                len(final.prompt_token_ids), completion_tokens, final.num_cached_tokens
            ),
            "prompt_logprobs": prompt_logprobs_json(final),
        }
        if request.return_token_ids:
            response["prompt_token_ids"] = list(final.prompt_token_ids)
        if self.wants_timings(request):
            response["timings"] = self.timings(
                [final], len(final.prompt_token_ids), final.num_cached_tokens, completion_tokens
            )
        return response

    # ---------------------------------------------------------------- stream
    async def _stream(
        self,
        request: ChatCompletionRequest,
        request_id: str,
        model_name: str,
        created: int,
        role: str,
        echo_text: str,
        collectors: list,
    ) -> AsyncIterator[str]:
        n = request.n
        prompt_tokens = 0
        cached_tokens = 0
        completion_tokens = [0] * n
        final_output: RequestOutput | None = None

        def usage() -> dict[str, Any]:
            return usage_dict(prompt_tokens, sum(completion_tokens), cached_tokens)

        def chunk(choices: list[dict[str, Any]]) -> dict[str, Any]:
            body: dict[str, Any] = {
                "id": request_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model_name,
                "choices": choices,
            }
            if request.include_usage:
                body["usage"] = usage() if request.continuous_usage_stats else None
            return body

        forced = request.forced_tool_call()
        held = [""] * n  # forced tool calls: text held back until the call is complete
        parser = self._auto_tool_parser(request)
        holders = None if parser is None else [StreamingToolCalls(parser) for _ in range(n)]
        reasoning_parser = self._reasoning_parser()
        splitters = (
            None if reasoning_parser is None
            else [StreamingReasoning(reasoning_parser) for _ in range(n)]
        )
        try:
            # The first chunk of every choice carries the role (and the echoed text).
            for index in range(n):
                first: dict[str, Any] = {
                    "index": index,
                    "delta": {"role": role, "content": echo_text},
                    "logprobs": None,
                    "finish_reason": None,
                }
                yield sse(chunk([first]))
            async for _, output in self.iterate(collectors):
                failure = engine_failure(output)
                if failure is not None:
                    raise failure
                prompt_tokens = len(output.prompt_token_ids)
                cached_tokens = output.num_cached_tokens
                if output.finished:
                    final_output = output
                for completion in output.outputs:
                    completion_tokens[completion.index] += len(completion.token_ids)
                    if (
                        not completion.text
                        and not completion.token_ids
                        and completion.finish_reason is None
                    ):
                        continue
                    finish_reason = completion.finish_reason
                    new_text, reasoning_delta = completion.text, ""
                    if splitters is not None:
                        splitter = splitters[completion.index]
                        reasoning_delta, new_text = splitter.feed(completion.text)
                        if finish_reason is not None:
                            more_reasoning, more_text = splitter.finish()
                            reasoning_delta += more_reasoning
                            new_text += more_text
                    delta: dict[str, Any] = {"content": new_text} if new_text else {}
                    if holders is not None:
                        # tool_choice auto: content flows, a call is held back until the end.
                        holder = holders[completion.index]
                        text = holder.feed(new_text)
                        delta = {"content": text} if text else {}
                        if finish_reason is not None:
                            rest, extracted = holder.finish()
                            text += rest
                            delta = {"content": text} if text else {}
                            if extracted.calls:
                                delta["tool_calls"] = [
                                    {"index": i, **call}
                                    for i, call in enumerate(extracted.openai_tool_calls())
                                ]
                                finish_reason = "tool_calls"
                        elif not delta and not reasoning_delta:
                            continue
                    elif forced is not None:
                        # A forced call is sent whole once it parses (its arguments in one
                        # fragment: the same calls as the non-streamed answer).
                        held[completion.index] += new_text
                        delta = {}
                        if finish_reason is None:
                            if not reasoning_delta:
                                continue
                        elif calls := _forced_calls(forced, held[completion.index], finish_reason):
                            delta = {"tool_calls": [
                                {"index": i, **call} for i, call in enumerate(calls)
                            ]}
                            finish_reason = "tool_calls"
                        elif held[completion.index]:
                            delta = {"content": held[completion.index]}
                    if reasoning_delta:
                        delta["reasoning_content"] = reasoning_delta
                    if not delta and finish_reason is None and not completion.token_ids:
                        continue
                    choice: dict[str, Any] = {
                        "index": completion.index,
                        "delta": delta,
                        "logprobs": self._choice_logprobs(request, completion),
                        "finish_reason": finish_reason,
                    }
                    if completion.finish_reason is not None:
                        choice["stop_reason"] = completion.stop_reason
                    if request.return_token_ids:
                        choice["token_ids"] = list(completion.token_ids)
                    yield sse(chunk([choice]))
            timings = None
            if self.wants_timings(request) and final_output is not None:
                timings = self.timings(
                    [final_output], prompt_tokens, cached_tokens, sum(completion_tokens)
                )
            if request.include_usage or timings is not None:
                # The final chunk: usage (if asked) and timings (if asked).
                final = chunk([])
                if request.include_usage:
                    final["usage"] = usage()
                if timings is not None:
                    final["timings"] = timings
                yield sse(final)
        except Exception as exc:
            logger.info("chat stream %s failed: %s", request_id, exc)
            yield sse(to_openai_error(exc).body())
        yield SSE_DONE


def _forced_calls(
    forced: ForcedToolCall | None, text: str, finish_reason: str | None
) -> list[dict[str, Any]] | None:
    """The tool calls of a forced call that finished; None when not forced, cut by
    max_tokens (the text is returned as content then) or failed."""
    if forced is None or finish_reason != "stop":
        return None
    return tool_calls_of(text, forced)


# A chosen token missing from its logprobs (should not happen) reports this value.
MIN_NONE = -9999.0
