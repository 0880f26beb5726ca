"""Tool-call parsers on their families' exact output formats, streamed in any chunking."""

from __future__ import annotations

import json
import random

import pytest

from pagedserve.entrypoints.openai.tool_parsers import TOOL_PARSERS, StreamingToolCalls

QWEN_TWO_CALLS = (
    "I'll check both.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\", "
    "\"unit\": \"celsius\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"get_time\", \"arguments\": "
    "{\"timezone\": \"CET\"}}\n</tool_call>"
)
CASES = [
    (QWEN_TWO_CALLS, "I'll check both.\n",
     [("get_weather", {"city": "Paris", "unit": "celsius"}), ("get_time", {"timezone": "CET"})]),
    ('<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>', None, [("f", {})]),
    ('<tool_call>\n{"name": "f", "arguments": {"x": "<tool_call>"}}', None, [("f", {"x": "<tool_call>"})]),
    ("No tools needed: 2 < 3 and <tool> tags are fine.", "No tools needed: 2 < 3 and <tool> tags are fine.", []),
    ("<tool_call>not json</tool_call>", "<tool_call>not json</tool_call>", []),
]


@pytest.mark.parametrize(("text", "content", "calls"), CASES)
def test_hermes_extracts_content_and_calls(text: str, content, calls) -> None:  # noqa: ANN001
    extracted = TOOL_PARSERS["hermes"]().extract(text)
    assert extracted.content == content
    assert [(n, json.loads(a)) for n, a in extracted.calls] == calls
    for call in extracted.openai_tool_calls():
        assert call["id"].startswith("chatcmpl-tool-") and call["type"] == "function"


@pytest.mark.parametrize(("text", "content", "calls"), CASES)
@pytest.mark.parametrize("seed", range(20))
def test_streaming_in_any_chunks_equals_the_whole(text: str, content, calls, seed: int) -> None:  # noqa: ANN001
    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(1, 12))))
    chunks = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
    holder = StreamingToolCalls(TOOL_PARSERS["hermes"]())
    sent = "".join(holder.feed(chunk) for chunk in chunks)
    rest, extracted = holder.finish()
    assert [(n, json.loads(a)) for n, a in extracted.calls] == calls
    streamed_content = sent + rest
    assert streamed_content == (content or "")
    assert "<tool_call" not in sent or not calls
