"""Tool-call parsers for ``tool_choice="auto"`` (``--enable-auto-tool-choice
--tool-call-parser NAME``, vLLM's flags): read the calls a model wrote in its family's
format out of its text.

Streaming (:class:`StreamingToolCalls`) forwards content as it comes and holds back
everything from the first possible start of a call; when the output ends, the calls go out
as one ``tool_calls`` delta and the rest of the content (if any) with it, so the streamed
calls equal the non-streamed ones for any chunk boundaries.
"""

from __future__ import annotations

from pagedserve.entrypoints.openai.tool_parsers.base import (
    ExtractedToolCalls,
    StreamingToolCalls,
    ToolParser,
)
from pagedserve.entrypoints.openai.tool_parsers.hermes import HermesToolParser

TOOL_PARSERS: dict[str, type[ToolParser]] = {"hermes": HermesToolParser}

__all__ = ["TOOL_PARSERS", "ExtractedToolCalls", "StreamingToolCalls", "ToolParser"]
