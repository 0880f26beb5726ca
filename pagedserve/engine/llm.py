"""LLM: the offline API, mirroring ``vllm.LLM``."""

from __future__ import annotations

import inspect
import itertools
import logging
from collections.abc import Sequence
from typing import Any

from pagedserve.engine.arg_utils import EngineArgs
from pagedserve.engine.input_processor import PromptType
from pagedserve.engine.llm_engine import LLMEngine
from pagedserve.outputs import RequestOutput
from pagedserve.sampling_params import RequestOutputKind, SamplingParams

logger = logging.getLogger(__name__)

ChatMessage = dict[str, Any]


class LLM:
    """Generate text offline from a batch of prompts with the paged engine.

    ``model=None`` serves the bundled Gemma 3 270M (GGUF). Keyword arguments are
    those of :class:`EngineArgs` (vLLM's names); an unknown one raises TypeError.
    """

    def __init__(self, model: str | None = None, **kwargs: Any) -> None:
        engine_args = EngineArgs.from_kwargs("LLM", model=model, **kwargs)
        self.llm_engine = LLMEngine.from_engine_args(engine_args)
        self._request_counter = itertools.count()

    @classmethod
    def from_engine_args(cls, engine_args: EngineArgs) -> LLM:
        """Build from an EngineArgs (the CLI's path)."""
        llm = cls.__new__(cls)
        llm.llm_engine = LLMEngine.from_engine_args(engine_args)
        llm._request_counter = itertools.count()
        return llm

    def get_tokenizer(self) -> Any:
        return self.llm_engine.get_tokenizer()

    # ------------------------------------------------------------------ generate
    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        priority: list[int] | None = None,
    ) -> list[RequestOutput]:
        """Run every prompt to completion; outputs come back in input order."""
        prompt_list = self._as_prompt_list(prompts)
        if sampling_params is None:
            params_list = [SamplingParams() for _ in prompt_list]
        elif isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params] * len(prompt_list)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompt_list):
                raise ValueError(
                    f"Got {len(params_list)} sampling params for {len(prompt_list)} prompts; "
                    "pass one, or one per prompt"
                )
        if priority is not None and len(priority) != len(prompt_list):
            raise ValueError(f"Got {len(priority)} priorities for {len(prompt_list)} prompts")
        return self._run(prompt_list, params_list, priority, use_tqdm)

    def chat(
        self,
        messages: list[ChatMessage] | list[list[ChatMessage]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        chat_template_kwargs: dict[str, Any] | None = None,
    ) -> list[RequestOutput]:
        """Render conversations with a chat template, then generate.

        ``chat_template`` (Jinja text, a template file, or one of the tokenizer's named
        templates) overrides the model's own template.
        """
        from pagedserve.transformers_utils.chat_templates import (
            apply_chat_template,
            resolve_model_chat_template,
            tokenize_prompt,
        )

        if not messages:
            raise ValueError("messages must not be empty")
        conversations: list[list[ChatMessage]]
        if isinstance(messages[0], dict):
            conversations = [messages]  # type: ignore[list-item]
        else:
            conversations = messages  # type: ignore[assignment]
        tokenizer = self.get_tokenizer()
        model_config = self.llm_engine.model_config
        template = resolve_model_chat_template(
            tokenizer,
            model_config.tokenizer_path,
            getattr(model_config.hf_config, "model_type", ""),
            chat_template,
        )
        prompts: list[PromptType] = []
        for conversation in conversations:
            text = apply_chat_template(
                tokenizer,
                conversation,
                chat_template=template,
                add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message,
                chat_template_kwargs=chat_template_kwargs,
            )
            ids = tokenize_prompt(tokenizer, text, add_special_tokens=True)
            prompts.append({"prompt": text, "prompt_token_ids": ids})
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _as_prompt_list(prompts: PromptType | Sequence[PromptType]) -> list[PromptType]:
        if isinstance(prompts, str | dict):
            return [prompts]
        prompts = list(prompts)  # type: ignore[arg-type]
        if prompts and all(isinstance(p, int) for p in prompts):
            raise ValueError(
                "A bare list of ints is ambiguous; pass {'prompt_token_ids': [...]} instead"
            )
        return prompts

    def _run(
        self,
        prompts: list[PromptType],
        params_list: list[SamplingParams],
        priority: list[int] | None,
        use_tqdm: bool,
    ) -> list[RequestOutput]:
        engine = self.llm_engine
        # Validate (and tokenize) everything first so a bad prompt adds nothing.
        processed = [
            engine.process_request("validate", prompt, params, priority[i] if priority else 0)[1]
            for i, (prompt, params) in enumerate(zip(prompts, params_list, strict=True))
        ]
        request_ids: list[str] = []
        for i, (prompt, params) in enumerate(zip(processed, params_list, strict=True)):
            params = params.clone()
            params.output_kind = RequestOutputKind.FINAL_ONLY
            request_id = str(next(self._request_counter))
            engine.add_request(request_id, prompt, params, priority[i] if priority else 0)
            request_ids.append(request_id)

        results: dict[str, RequestOutput] = {}
        progress = None
        if use_tqdm and len(prompts) > 1:
            from tqdm.auto import tqdm

            progress = tqdm(total=len(prompts), desc="Processed prompts", dynamic_ncols=True)
        try:
            while engine.has_unfinished_requests():
                for output in engine.step():
                    if output.finished:
                        results[output.request_id] = output
                        if progress is not None:
                            progress.update(1)
        except BaseException:
            engine.abort_request([rid for rid in request_ids if rid not in results])
            raise
        finally:
            if progress is not None:
                progress.close()
        return [results[rid] for rid in request_ids]


def _generated_init_signature() -> inspect.Signature:
    """``LLM.__init__``'s signature as help() shows it: ``model`` then every engine argument."""
    params = [
        inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD),
        inspect.Parameter(
            "model", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None,
            annotation=str | None,
        ),
    ]
    params += [p for p in EngineArgs.signature_parameters() if p.name != "model"]
    return inspect.Signature(params, return_annotation=None)


LLM.__init__.__signature__ = _generated_init_signature()  # type: ignore[attr-defined]
