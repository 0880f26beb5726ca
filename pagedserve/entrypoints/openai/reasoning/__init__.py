"""Reasoning parsers (``--reasoning-parser NAME``, vLLM's flag): split a thinking model's
``<think>…</think>`` reasoning from its answer into ``reasoning_content`` and ``content``.

- ``qwen3``: the output opens with ``<think>`` when the model thinks; without it (e.g.
  ``chat_template_kwargs={"enable_thinking": false}``) it is all content.
- ``deepseek_r1``: the template opens the think block in the prompt, so the output starts
  inside it: everything up to ``</think>`` is reasoning (all of it while no end came).

:class:`StreamingReasoning` splits deltas as they come, holding back only what could be
the start of a marker, so streamed and whole answers agree for any chunking.
"""

from __future__ import annotations

from dataclasses import dataclass

START, END = "<think>", "</think>"


@dataclass(frozen=True)
class ReasoningParser:
    """``opens_in_prompt``: the think block starts in the prompt (DeepSeek-R1 style)."""

    name: str
    opens_in_prompt: bool

    def extract(self, text: str) -> tuple[str | None, str | None]:
        """(reasoning, content) of a whole output; None for an empty part."""
        reasoning, content = _split(text, self.opens_in_prompt, final=True)
        return reasoning or None, content or None


def _split(text: str, opens_in_prompt: bool, final: bool) -> tuple[str, str]:
    """(reasoning, content) of ``text`` so far; while not ``final`` the possible start of a
    marker at the end is left out of both."""
    if not opens_in_prompt:
        if not text.startswith(START):
            if not final and START.startswith(text):
                return "", ""  # may still become "<think>"
            return "", text
        text = text[len(START):]
    elif text.startswith(START):
        text = text[len(START):]
    elif not final and START.startswith(text) and text:
        return "", ""
    end = text.find(END)
    if end >= 0:
        return text[:end], text[end + len(END):]
    if final:  # the think block never closed (cut by max_tokens): all reasoning
        return text, ""
    keep = next((k for k in range(min(len(END) - 1, len(text)), 0, -1) if END.startswith(text[-k:])), 0)
    return text[: len(text) - keep], ""


class StreamingReasoning:
    """Feeds deltas; returns the (reasoning, content) deltas that are safe to send."""

    def __init__(self, parser: ReasoningParser) -> None:
        self.parser = parser
        self.text = ""
        self.sent_reasoning = 0
        self.sent_content = 0

    def _emit(self, reasoning: str, content: str) -> tuple[str, str]:
        r, c = reasoning[self.sent_reasoning :], content[self.sent_content :]
        self.sent_reasoning = max(self.sent_reasoning, len(reasoning))
        self.sent_content = max(self.sent_content, len(content))
        return r, c

    def feed(self, delta: str) -> tuple[str, str]:
        self.text += delta
        return self._emit(*_split(self.text, self.parser.opens_in_prompt, final=False))

    def finish(self) -> tuple[str, str]:
        return self._emit(*_split(self.text, self.parser.opens_in_prompt, final=True))


REASONING_PARSERS = {
    "qwen3": ReasoningParser("qwen3", opens_in_prompt=False),
    "deepseek_r1": ReasoningParser("deepseek_r1", opens_in_prompt=True),
}
