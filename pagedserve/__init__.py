"""pagedserve: a paged-KV-cache LLM inference and serving engine."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pagedserve.outputs import CompletionOutput, Logprob, RequestOutput
from pagedserve.sampling_params import RequestOutputKind, SamplingParams, StructuredOutputsParams

if TYPE_CHECKING:
    from pagedserve.engine.arg_utils import EngineArgs
    from pagedserve.engine.async_llm import AsyncLLM
    from pagedserve.engine.llm import LLM

__version__ = "0.1.0"

__all__ = [
    "LLM",
    "AsyncLLM",
    "EngineArgs",
    "SamplingParams",
    "StructuredOutputsParams",
    "RequestOutput",
    "RequestOutputKind",
    "CompletionOutput",
    "Logprob",
    "__version__",
]


def __getattr__(name: str) -> Any:
    # Import the engine lazily so `import pagedserve` stays cheap (no torch import).
    if name == "LLM":
        from pagedserve.engine.llm import LLM

        return LLM
    if name == "AsyncLLM":
        from pagedserve.engine.async_llm import AsyncLLM

        return AsyncLLM
    if name == "EngineArgs":
        from pagedserve.engine.arg_utils import EngineArgs

        return EngineArgs
    raise AttributeError(f"module 'pagedserve' has no attribute {name!r}")
