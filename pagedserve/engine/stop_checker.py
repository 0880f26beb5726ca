"""Stop-string matching on incrementally growing text.

Two pure functions used by :class:`pagedserve.engine.detokenizer.IncrementalDetokenizer`:

- :func:`find_stop_string` searches only the region that could hold a *new* match (the new
  text plus ``len(stop) - 1`` characters of overlap), never the whole text again.
- :func:`partial_stop_suffix_len` says how many trailing characters could still grow into a
  stop string; a streaming front end holds exactly those back so a stop string is never
  emitted partially.

Which match wins: the one that *completes* first in the text (smallest end offset), ties going
to the one that starts first (the longer one). That is what streaming token by token would
see, so the result does not depend on how the text was split into tokens or steps.
"""

from __future__ import annotations

from collections.abc import Sequence


def find_stop_string(
    text: str, stop: Sequence[str], new_text_start: int, min_end: int = 0
) -> tuple[str, int] | None:
    """Find the first stop string that completes in ``text[new_text_start:]``.

    Args:
        text: all text so far.
        stop: the stop strings (empty strings are ignored).
        new_text_start: offset where the text added since the last search begins; earlier
            text was already searched, so only matches *ending* after this offset are new.
        min_end: matches must end after this offset too (text produced before ``min_tokens``
            output tokens does not count).

    Returns:
        ``(stop_string, start_offset)`` of the winning match, or ``None``.
    """
    floor = max(new_text_start, min_end)
    best: tuple[str, int] | None = None
    best_end = len(text) + 1
    for s in stop:
        if not s:
            continue
        idx = text.find(s, max(0, floor - len(s) + 1))
        if idx < 0:
            continue
        end = idx + len(s)
        if end < best_end or (end == best_end and best is not None and idx < best[1]):
            best = (s, idx)
            best_end = end
    return best


def partial_stop_suffix_len(text: str, stop: Sequence[str]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of a stop string.

    Those characters may turn into a stop string once more text arrives, so they must not
    be streamed yet. At most ``max(len(s) for s in stop) - 1``.
    """
    if not text:
        return 0
    last = text[-1]
    best = 0
    for s in stop:
        if len(s) <= 1 or last not in s:
            continue
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if s[k - 1] == last and text.endswith(s[:k]):
                best = k
                break
    return best


def truncate_at_stop(text: str, stop_str: str, start: int, include_stop_str: bool) -> str:
    """Cut ``text`` before the matched stop string, or after it when it is included."""
    return text[: start + len(stop_str)] if include_stop_str else text[:start]
