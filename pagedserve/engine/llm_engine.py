"""LLMEngine: the shared front end over an engine core in this process (offline use)."""

from __future__ import annotations

import logging

from pagedserve.config import EngineConfig, KVCacheConfig
from pagedserve.engine.arg_utils import EngineArgs
from pagedserve.engine.core_client import InprocClient
from pagedserve.engine.frontend import EngineFrontend
from pagedserve.engine.input_processor import PromptType
from pagedserve.engine.messages import SchedulerStats
from pagedserve.outputs import RequestOutput
from pagedserve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class LLMEngine(EngineFrontend):
    """Input processing, the engine core and output processing, in one process."""

    engine_core: InprocClient

    def __init__(self, engine_config: EngineConfig) -> None:
        super().__init__(engine_config)
        self.engine_core = InprocClient(engine_config)

    @classmethod
    def from_engine_args(cls, engine_args: EngineArgs) -> LLMEngine:
        return cls(engine_args.create_engine_config())

    def add_request(
        self,
        request_id: str,
        prompt: PromptType,
        params: SamplingParams,
        priority: int = 0,
        cache_salt: str | None = None,
    ) -> None:
        """Validate and add one request (raises ValueError; nothing is added then)."""
        self.add_parent_request(request_id, prompt, params, priority, cache_salt)

    def abort_request(self, request_ids: list[str]) -> None:
        self.abort_parent_requests(request_ids)

    def step(self) -> list[RequestOutput]:
        """Run one engine-core step; returns the outputs it produced."""
        return self.process_core_outputs(self.engine_core.get_output())

    @property
    def kv_cache_config(self) -> KVCacheConfig:
        """The KV cache the engine core sized after loading the model."""
        return self.engine_core.kv_cache_config

    @property
    def quantization_info(self) -> str:
        """The int8 kernels the engine core chose for this CPU ("" when unquantized)."""
        return self.engine_core.quantization_info

    def get_stats(self) -> SchedulerStats:
        """The engine core's scheduler state now (running, waiting, KV-cache usage, ...)."""
        return self.engine_core.get_stats()

    def reset_prefix_cache(self) -> bool:
        """Drop every cached prefix block not in use; False if some are in use."""
        return self.engine_core.reset_prefix_cache()
