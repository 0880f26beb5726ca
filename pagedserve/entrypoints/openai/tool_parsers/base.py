"""The tool-parser interface and the streaming holder every parser shares."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any


@dataclass
class ExtractedToolCalls:
    """What a finished output holds: its content (None when it is only calls) and calls."""

    content: str | None
    calls: list[tuple[str, str]] = field(default_factory=list)  # (name, arguments JSON)

    def openai_tool_calls(self) -> list[dict[str, Any]]:
        return [
            {"id": f"chatcmpl-tool-{uuid.uuid4().hex[:24]}", "type": "function",
             "function": {"name": name, "arguments": arguments}}
            for name, arguments in self.calls
        ]


class ToolParser:
    """Reads a family's tool-call format. ``start_marker``: the text a call begins with
    (streaming holds text back from where it might begin)."""

    start_marker: str = ""

    def extract(self, text: str) -> ExtractedToolCalls:
        raise NotImplementedError

    @staticmethod
    def arguments_json(arguments: Any) -> str:
        return arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)


class StreamingToolCalls:
    """Splits a streamed output into content deltas that are safe to send now and, at the
    end, the calls (as :meth:`ToolParser.extract` reads the whole text)."""

    def __init__(self, parser: ToolParser) -> None:
        self.parser = parser
        self.text = ""
        self.sent = 0  # characters of content already sent

    def feed(self, delta: str) -> str:
        """Content that can go out now (never part of a call, nor a possible call start)."""
        self.text += delta
        marker = self.parser.start_marker
        found = self.text.find(marker)
        if found >= 0:
            safe_end = found
        else:
            safe_end = len(self.text)
            for keep in range(min(len(marker) - 1, len(self.text)), 0, -1):
                if marker.startswith(self.text[-keep:]):
                    safe_end = len(self.text) - keep
                    break
        out = self.text[self.sent : max(safe_end, self.sent)]
        self.sent = max(safe_end, self.sent)
        return out

    def finish(self) -> tuple[str, ExtractedToolCalls]:
        """The content not sent yet, and what the whole output holds."""
        extracted = self.parser.extract(self.text)
        if not extracted.calls:
            rest = self.text[self.sent :]
        else:
            content = extracted.content or ""
            rest = content[self.sent :] if len(content) > self.sent else ""
        self.sent = len(self.text)
        return rest, extracted
