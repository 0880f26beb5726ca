"""LLMEngine: the synchronous front end over an in-process EngineCore."""

from __future__ import annotations

import logging
import time
from typing import Any

from pagedserve.config import EngineConfig
from pagedserve.engine.arg_utils import EngineArgs
from pagedserve.engine.core import EngineCore
from pagedserve.engine.input_processor import InputProcessor, PromptType
from pagedserve.engine.messages import SchedulerStats
from pagedserve.engine.output_processor import OutputProcessor, ParentRequest
from pagedserve.engine.tokenizer import load_tokenizer
from pagedserve.outputs import RequestOutput
from pagedserve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class LLMEngine:
    """Input processing, the engine core and output processing, in one process."""

    def __init__(self, engine_config: EngineConfig) -> None:
        self.engine_config = engine_config
        self.model_config = engine_config.model_config
        self.tokenizer = load_tokenizer(self.model_config.tokenizer_path)
        self.input_processor = InputProcessor(self.model_config, self.tokenizer)
        self.output_processor = OutputProcessor(self.tokenizer)
        self.engine_core = EngineCore(engine_config)
        self.last_stats: SchedulerStats | None = None

    @classmethod
    def from_engine_args(cls, engine_args: EngineArgs) -> LLMEngine:
        return cls(engine_args.create_engine_config())

    def validate_request(
        self, prompt: PromptType, params: SamplingParams, request_id: str = "validate",
        priority: int = 0,
    ) -> tuple[ParentRequest, Any, list]:
        """Tokenize and check one request without adding it (raises ValueError)."""
        processed = self.input_processor.process_prompt(prompt)
        parent = ParentRequest(request_id, params)
        core_requests = self.input_processor.make_child_requests(parent, processed, priority)
        return parent, processed, core_requests

    def add_request(
        self,
        request_id: str,
        prompt: PromptType,
        params: SamplingParams,
        priority: int = 0,
    ) -> None:
        if request_id in self.output_processor.parents:
            raise ValueError(f"Request id {request_id!r} is already running")
        parent, processed, core_requests = self.validate_request(
            prompt, params, request_id, priority
        )
        self.output_processor.add_children(parent, processed.prompt, core_requests)
        for core_request in core_requests:
            self.engine_core.add_request(core_request)

    def abort_request(self, request_ids: list[str]) -> None:
        child_ids = self.output_processor.abort_requests(request_ids)
        self.engine_core.abort_requests(child_ids)

    def has_unfinished_requests(self) -> bool:
        return self.output_processor.has_unfinished_requests()

    def step(self) -> list[RequestOutput]:
        core_outputs = self.engine_core.step()
        self.last_stats = core_outputs.scheduler_stats
        outputs, to_abort = self.output_processor.process_outputs(
            core_outputs.outputs, time.time()
        )
        if to_abort:
            self.engine_core.abort_requests(to_abort)
        return outputs

    def get_tokenizer(self) -> Any:
        return self.tokenizer
