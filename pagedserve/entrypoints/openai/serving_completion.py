"""POST /v1/completions: prompts (text, token ids, or lists of either), streaming or not."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from pagedserve.engine.input_processor import InvalidRequestError, ProcessedPrompt
from pagedserve.entrypoints.openai.errors import to_openai_error
from pagedserve.entrypoints.openai.protocol import CompletionRequest
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
from pagedserve.outputs import CompletionOutput, Logprob, RequestOutput

logger = logging.getLogger(__name__)


class CompletionLogprobs:
    """Builds OpenAI's completions ``logprobs`` object, continuing text offsets across chunks."""

    def __init__(self, num_top: int, tokenizer: Any) -> None:
        self.num_top = num_top
        self.tokenizer = tokenizer
        self.text_offset = 0

    def _token_text(self, token_id: int, logprob: Logprob | None) -> str:
        if logprob is not None and logprob.decoded_token is not None:
            return logprob.decoded_token
        return self.tokenizer.decode([token_id])

    def build(
        self, token_ids: list[int], logprobs: list[dict[int, Logprob] | None]
    ) -> dict[str, Any]:
        tokens: list[str] = []
        token_logprobs: list[float | None] = []
        top_logprobs: list[dict[str, float] | None] = []
        text_offset: list[int] = []
        for token_id, step in zip(token_ids, logprobs, strict=False):
            chosen = step.get(token_id) if step is not None else None
            text = self._token_text(token_id, chosen)
            tokens.append(text)
            text_offset.append(self.text_offset)
            self.text_offset += len(text)
            if step is None or chosen is None:
                token_logprobs.append(None)
                top_logprobs.append(None)
                continue
            token_logprobs.append(clamp_logprob(chosen.logprob))
            ranked = sorted(step.items(), key=lambda item: -item[1].logprob)[: self.num_top]
            top: dict[str, float] = {text: clamp_logprob(chosen.logprob)}
            for top_id, top_lp in ranked:
                top.setdefault(self._token_text(top_id, top_lp), clamp_logprob(top_lp.logprob))
            top_logprobs.append(top)
        return {
            "text_offset": text_offset,
            "token_logprobs": token_logprobs,
            "tokens": tokens,
            "top_logprobs": top_logprobs,
        }


class OpenAIServingCompletion(ServingBase):
    """Handles /v1/completions."""

    request_id_prefix = "cmpl"

    def _prompts(self, request: CompletionRequest) -> list[ProcessedPrompt]:
        prompt = request.prompt
        if isinstance(prompt, str):
            items: list[Any] = [prompt]
        elif prompt and all(isinstance(p, int) for p in prompt):
            items = [prompt]
        else:
            items = list(prompt)
        if not items:
            raise InvalidRequestError("The prompt cannot be empty.", param="prompt")
        input_processor = self.engine.input_processor
        return [
            input_processor.process_prompt(item, request.add_special_tokens) for item in items
        ]

    async def create_completion(
        self, request: CompletionRequest, raw_request: Request
    ) -> Response:
        self.log_unknown_fields(request)
        model_name = self.check_model(request.model)
        prompts = self._prompts(request)
        params = request.to_sampling_params(request.max_tokens)
        request_id = self.request_id(raw_request, request.request_id)
        trace_contexts = self.trace_contexts(
            raw_request, model_name, lambda: [self._text(p) for p in prompts]
        )
        collectors = self.add_requests(
            request_id, prompts, [params] * len(prompts), request.priority, request.cache_salt,
            trace_contexts,
        )
        created = int(time.time())
        if request.stream:
            return SSEResponse(
                self._stream(request, request_id, model_name, created, len(prompts), collectors)
            )
        result = await run_until_disconnected(
            self._full(request, request_id, model_name, created, len(prompts), collectors),
            raw_request,
        )
        if result is None:
            return Response(status_code=499)
        return JSONResponse(result)

    def _text(self, prompt: ProcessedPrompt) -> str:
        if prompt.prompt is not None:
            return prompt.prompt
        return self.ctx.tokenizer.decode(prompt.prompt_token_ids)

    # ---------------------------------------------------------------- full
    async def _full(
        self,
        request: CompletionRequest,
        request_id: str,
        model_name: str,
        created: int,
        num_prompts: int,
        collectors: list,
    ) -> dict[str, Any]:
        finals: dict[int, RequestOutput] = {}
        async for index, output in self.iterate(collectors):
            if output.finished:
                finals[index] = output
        choices: list[dict[str, Any]] = []
        prompt_tokens = completion_tokens = cached_tokens = 0
        for index in range(num_prompts):
            output = finals[index]
            failure = engine_failure(output)
            if failure is not None:
                raise failure
            prompt_tokens += len(output.prompt_token_ids)
            cached_tokens += output.num_cached_tokens
            for completion in output.outputs:
                completion_tokens += len(completion.token_ids)
                choices.append(self._choice(request, output, completion, index))
        response = {
            "id": request_id,
            "object": "text_completion",
            "created": created,
            "model": model_name,
            "choices": choices,
            "usage": usage_dict(prompt_tokens, completion_tokens, cached_tokens),
        }
        if self.wants_timings(request):
            response["timings"] = self.timings(
                [finals[i] for i in range(num_prompts)], prompt_tokens, cached_tokens,
                completion_tokens,
            )
        return response

    def _choice(
        self,
        request: CompletionRequest,
        output: RequestOutput,
        completion: CompletionOutput,
        prompt_index: int,
    ) -> dict[str, Any]:
        text = completion.text
        logprobs = None
        if request.echo:
            text = self.prompt_text(output) + text
        if request.logprobs is not None:
            builder = CompletionLogprobs(request.logprobs, self.ctx.tokenizer)
            token_ids = list(completion.token_ids)
            steps: list[dict[int, Logprob] | None] = list(completion.logprobs or [])
            if request.echo:
                prompt_steps = list(output.prompt_logprobs or [None] * len(output.prompt_token_ids))
                token_ids = list(output.prompt_token_ids) + token_ids
                steps = prompt_steps + steps
            logprobs = builder.build(token_ids, steps)
        choice: dict[str, Any] = {
            "index": prompt_index * request.n + completion.index,
            "text": text,
            "logprobs": logprobs,
            "finish_reason": completion.finish_reason,
            "stop_reason": completion.stop_reason,
            "prompt_logprobs": prompt_logprobs_json(output),
        }
        if request.return_token_ids:
            choice["prompt_token_ids"] = list(output.prompt_token_ids)
            choice["token_ids"] = list(completion.token_ids)
        return choice

    # ---------------------------------------------------------------- stream
    async def _stream(
        self,
        request: CompletionRequest,
        request_id: str,
        model_name: str,
        created: int,
        num_prompts: int,
        collectors: list,
    ) -> AsyncIterator[str]:
        n = request.n
        num_choices = n * num_prompts
        builders = (
            [CompletionLogprobs(request.logprobs, self.ctx.tokenizer) for _ in range(num_choices)]
            if request.logprobs is not None
            else None
        )
        first_chunk = [True] * num_choices
        prompt_tokens = [0] * num_prompts
        completion_tokens = [0] * num_choices
        cached_tokens = [0] * num_prompts
        finals: list[RequestOutput] = []

        def usage() -> dict[str, Any]:
            return usage_dict(sum(prompt_tokens), sum(completion_tokens), sum(cached_tokens))

        try:
            async for prompt_index, output in self.iterate(collectors):
                failure = engine_failure(output)
                if failure is not None:
                    raise failure
                cached_tokens[prompt_index] = output.num_cached_tokens
                prompt_tokens[prompt_index] = len(output.prompt_token_ids)
                if output.finished:
                    finals.append(output)
                for completion in output.outputs:
                    choice_index = prompt_index * n + completion.index
                    completion_tokens[choice_index] += len(completion.token_ids)
                    text = completion.text
                    first = first_chunk[choice_index]
                    if first and request.echo:
                        text = self.prompt_text(output) + text
                    if not text and not completion.token_ids and completion.finish_reason is None:
                        continue
                    logprobs = None
                    if builders is not None:
                        token_ids = list(completion.token_ids)
                        steps = list(completion.logprobs or [])
                        if first and request.echo:
                            token_ids = list(output.prompt_token_ids) + token_ids
                            steps = list(
                                output.prompt_logprobs or [None] * len(output.prompt_token_ids)
                            ) + steps
                        logprobs = builders[choice_index].build(token_ids, steps)
                    choice: dict[str, Any] = {
                        "index": choice_index,
                        "text": text,
                        "logprobs": logprobs,
                        "finish_reason": completion.finish_reason,
                        "stop_reason": completion.stop_reason,
                    }
                    if request.return_token_ids:
                        if first:
                            choice["prompt_token_ids"] = list(output.prompt_token_ids)
                        choice["token_ids"] = list(completion.token_ids)
                    first_chunk[choice_index] = False
                    chunk: dict[str, Any] = {
                        "id": request_id,
                        "object": "text_completion",
                        "created": created,
                        "model": model_name,
                        "choices": [choice],
                    }
                    if request.include_usage:
                        chunk["usage"] = usage() if request.continuous_usage_stats else None
                    yield sse(chunk)
            timings = None
            if self.wants_timings(request):
                timings = self.timings(
                    finals, sum(prompt_tokens), sum(cached_tokens), sum(completion_tokens)
                )
            if request.include_usage or timings is not None:
                # The final chunk: usage (if asked) and timings (if asked).
                final_chunk: dict[str, Any] = {
                    "id": request_id,
                    "object": "text_completion",
                    "created": created,
                    "model": model_name,
                    "choices": [],
                }
                if request.include_usage:
                    final_chunk["usage"] = usage()
                if timings is not None:
                    final_chunk["timings"] = timings
                yield sse(final_chunk)
        except Exception as exc:
            logger.info("completion stream %s failed: %s", request_id, exc)
            yield sse(to_openai_error(exc).body())
        yield SSE_DONE
