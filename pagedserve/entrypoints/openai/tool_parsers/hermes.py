"""Hermes format (Qwen2, Qwen2.5, Qwen3, NousResearch Hermes): each call is JSON between
``<tool_call>`` and ``</tool_call>``; text before the first call is the content::

    Let me check.<tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>
"""

from __future__ import annotations

import json
import re

from pagedserve.entrypoints.openai.tool_parsers.base import ExtractedToolCalls, ToolParser

# A call closed by </tool_call>, or one still open at the end of the output (a model that
# stops right after the JSON, as some Qwen checkpoints do).
_CALL = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.DOTALL)


class HermesToolParser(ToolParser):
    start_marker = "<tool_call>"

    def extract(self, text: str) -> ExtractedToolCalls:
        start = text.find(self.start_marker)
        if start < 0:
            return ExtractedToolCalls(text)
        calls = []
        for body in _CALL.findall(text[start:]):
            try:
                value = json.loads(body.strip())
                name, arguments = value["name"], value.get("arguments", value.get("parameters", {}))
            except (ValueError, KeyError, TypeError):
                return ExtractedToolCalls(text)  # not a well-formed call: it is all content
            if not isinstance(name, str):
                return ExtractedToolCalls(text)
            calls.append((name, self.arguments_json(arguments)))
        content = text[:start]
        return ExtractedToolCalls(content if content.strip() else None, calls)
