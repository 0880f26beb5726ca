"""Incremental detokenization with stop strings, per request, in the front-end process.

The contract (design.md, "Detokenization"): when a request finishes, its text equals
``tokenizer.decode(ids, skip_special_tokens=...)`` of the token ids it detokenized, truncated
at the first stop string (kept when ``include_stop_str_in_output``), and the deltas handed out
along the way concatenate to exactly that text. A partial stop string is never streamed.

How text grows:

1. **Stable tokens.** With byte-fallback vocabularies (``<0xHH>`` tokens, e.g. Gemma, Llama 2)
   the decoder turns a whole *run* of consecutive byte tokens into text at once, and an
   invalid run becomes one U+FFFD per byte -- so even an already valid ``"S"`` can turn into
   ``"�"`` when an invalid continuation byte follows. A trailing run of byte tokens (special
   tokens that decoding skips are transparent) is therefore held back until a non-byte token
   ends it.
2. **Decoding.** Stable tokens go to the fast tokenizer's ``tokenizers.decoders.DecodeStream``
   (Rust, ~2 us/token); slow tokenizers (or a DecodeStream error) use the prefix/read-offset
   window algorithm of vLLM/TGI. Both only emit text that does not end in an incomplete UTF-8
   sequence (U+FFFD).
3. **Clean-up.** Tokenizers whose ``decode`` applies ``clean_up_tokenization`` get it applied
   to the whole text, holding back a tail that a later replacement could still change.
4. **Stop strings.** Only the new text (plus ``len(stop) - 1`` characters of overlap) is
   searched; see :mod:`pagedserve.engine.stop_checker`.
5. **Finishing** flushes what was held back and checks the result against one full
   ``tokenizer.decode`` (a few hundred microseconds per thousand tokens, once per request); a
   difference (never seen with the supported tokenizers) is logged and the full decode wins.

``prompt_token_ids`` are accepted for vLLM compatibility but not used as decoding context: the
output is exactly the decode of the *output* ids (for SentencePiece-style tokenizers that strip
a leading space, that strip applies to the first output token, as in ``tokenizer.decode``).
``spaces_between_special_tokens`` has no effect: transformers 5 ``decode`` ignores it too.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pagedserve.engine.stop_checker import (
    find_stop_string,
    partial_stop_suffix_len,
    truncate_at_stop,
)

logger = logging.getLogger(__name__)

_REPLACEMENT_CHAR = "\ufffd"
# transformers' stock clean_up_tokenization is 10 chained str.replace passes whose patterns
# are at most 4 characters long; each pass can change at most len(pattern) - 1 characters at
# the end of a growing text, 19 in total. Hold back a little more than that.
_CLEANUP_TAIL = 24
# Context tokens kept before the read offset when the window algorithm takes over.
_WINDOW_CONTEXT = 5
_NO_STOP_CHECK = 1 << 62  # a min_stop_end no match can reach


@dataclass(frozen=True)
class TokenizerDecodeInfo:
    """What incremental decoding needs to know about a tokenizer (computed once, cached)."""

    backend: Any | None  # tokenizers.Tokenizer of a fast tokenizer, else None
    byte_token_ids: frozenset[int]  # ids of "<0xHH>" byte-fallback tokens
    special_token_ids: frozenset[int]  # ids that decode(skip_special_tokens=True) drops
    byte_or_special_token_ids: frozenset[int]  # union of the two (precomputed)
    cleanup: Callable[[str], str] | None  # decode's clean_up_tokenization, when it applies
    cleanup_tail: int | None  # characters the clean-up may still change; None: unbounded


_INFO_CACHE: weakref.WeakKeyDictionary[Any, TokenizerDecodeInfo] = weakref.WeakKeyDictionary()
_INFO_CACHE_BY_ID: dict[int, tuple[Any, TokenizerDecodeInfo]] = {}


def get_tokenizer_decode_info(tokenizer: Any) -> TokenizerDecodeInfo:
    """Return (and cache per tokenizer object) the facts incremental decoding relies on."""
    try:
        info = _INFO_CACHE.get(tokenizer)
    except TypeError:  # not weak-referenceable / hashable
        entry = _INFO_CACHE_BY_ID.get(id(tokenizer))
        info = entry[1] if entry is not None and entry[0] is tokenizer else None
    if info is not None:
        return info
    info = _compute_decode_info(tokenizer)
    try:
        _INFO_CACHE[tokenizer] = info
    except TypeError:
        if len(_INFO_CACHE_BY_ID) > 64:
            _INFO_CACHE_BY_ID.clear()
        _INFO_CACHE_BY_ID[id(tokenizer)] = (tokenizer, info)
    return info


def _compute_decode_info(tokenizer: Any) -> TokenizerDecodeInfo:
    from tokenizers import Tokenizer

    byte_names = [f"<0x{b:02X}>" for b in range(256)]
    if isinstance(tokenizer, Tokenizer):
        backend: Any | None = tokenizer
    else:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if not isinstance(backend, Tokenizer):
            backend = None
    if backend is not None:
        byte_ids = {backend.token_to_id(name) for name in byte_names}
        byte_ids.discard(None)
        special = {i for i, tok in backend.get_added_tokens_decoder().items() if tok.special}
    else:
        vocab = tokenizer.get_vocab()
        byte_ids = {vocab[name] for name in byte_names if name in vocab}
        special = set(getattr(tokenizer, "all_special_ids", ()))
    cleanup, cleanup_tail = _cleanup_of(tokenizer, backend)
    return TokenizerDecodeInfo(
        backend=backend,
        byte_token_ids=frozenset(byte_ids),
        special_token_ids=frozenset(special),
        byte_or_special_token_ids=frozenset(byte_ids | special),
        cleanup=cleanup,
        cleanup_tail=cleanup_tail,
    )


def _cleanup_of(
    tokenizer: Any, backend: Any | None
) -> tuple[Callable[[str], str] | None, int | None]:
    """The clean-up ``tokenizer.decode`` applies by default (mirrors transformers 5)."""
    if not getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return None, None
    if (
        backend is not None
        and type(backend.model).__name__ == "BPE"
        and not getattr(
            tokenizer,
            "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output",
            False,
        )
    ):
        return None, None  # transformers skips it for BPE tokenizers
    cleanup = getattr(tokenizer, "clean_up_tokenization", None)
    if cleanup is None:
        return None, None
    try:
        from transformers.tokenization_utils_base import PreTrainedTokenizerBase

        stock = (
            type(tokenizer).clean_up_tokenization is PreTrainedTokenizerBase.clean_up_tokenization
        )
    except (ImportError, AttributeError):
        stock = False
    return cleanup, (_CLEANUP_TAIL if stock else None)


class _WindowDecoder:
    """Prefix/read-offset incremental decoding (vLLM's ``detokenize_incrementally``, TGI).

    Decodes ``ids[prefix_offset:end]`` and emits what it adds to ``ids[prefix_offset:
    read_offset]``; the few context tokens keep a SentencePiece leading space or a
    multi-byte character intact. Text ending in U+FFFD waits for more tokens.
    """

    def __init__(
        self,
        decode: Callable[[list[int]], str],
        prefix_offset: int = 0,
        read_offset: int = 0,
        ids: Sequence[int] = (),
    ) -> None:
        self._decode = decode
        self.prefix_offset = prefix_offset
        self.read_offset = read_offset
        self._prefix_text = decode(list(ids[prefix_offset:read_offset])) if read_offset else ""

    def feed(self, ids: list[int], end: int) -> str:
        if end <= self.read_offset:
            return ""
        new_text = self._decode(ids[self.prefix_offset : end])
        if len(new_text) <= len(self._prefix_text) or new_text.endswith(_REPLACEMENT_CHAR):
            return ""
        chunk = new_text[len(self._prefix_text) :]
        self.prefix_offset = self.read_offset
        self.read_offset = end
        self._prefix_text = self._decode(ids[self.prefix_offset : end])
        return chunk


class _StreamDecoder:
    """``tokenizers.decoders.DecodeStream`` over stable tokens, with a window fallback."""

    def __init__(
        self, backend: Any, skip_special_tokens: bool, decode: Callable[[list[int]], str]
    ) -> None:
        from tokenizers.decoders import DecodeStream

        self._backend = backend
        self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)
        self._decode = decode
        self._fed = 0
        self._anchor = 0  # all ids before it are reflected in the text emitted so far
        self._window: _WindowDecoder | None = None

    def feed(self, ids: list[int], end: int) -> str:
        if self._window is not None:
            return self._window.feed(ids, end)
        if end <= self._fed:
            return ""
        new = ids[self._fed : end]
        try:
            chunk = self._stream.step(self._backend, new if len(new) > 1 else new[0])
        except Exception as exc:  # tokenizers raises a plain Exception ("Invalid prefix ...")
            logger.warning("DecodeStream failed (%s); continuing with window decoding", exc)
            self._window = _WindowDecoder(
                self._decode, max(0, self._anchor - _WINDOW_CONTEXT), self._anchor, ids
            )
            return self._window.feed(ids, end)
        self._fed = end
        if chunk is None:
            return ""
        self._anchor = end
        return chunk


class IncrementalDetokenizer:
    """Turns one request's output token ids into text, step by step, with stop strings.

    ``update`` takes each step's new token ids and returns the stop string that matched, if
    any; ``get_next_output_text`` hands out the text (delta or cumulative) while holding
    back any suffix that could still become a stop string. See the module docstring for the
    equality guarantee with ``tokenizer.decode``.

    ``min_tokens`` (vLLM semantics): stop strings only count once they end after the text of
    the first ``min_tokens`` output tokens. ``use_decode_stream`` forces (True) or disables
    (False) the ``DecodeStream`` path; by default it is used for fast tokenizers.
    """

    def __init__(
        self,
        tokenizer: Any,
        prompt_token_ids: Sequence[int] | None = None,
        skip_special_tokens: bool = True,
        spaces_between_special_tokens: bool = True,
        stop: Sequence[str] | None = None,
        include_stop_str_in_output: bool = False,
        min_tokens: int = 0,
        use_decode_stream: bool | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.prompt_token_ids = prompt_token_ids
        self.skip_special_tokens = skip_special_tokens
        self.spaces_between_special_tokens = spaces_between_special_tokens
        self.stop: list[str] = [s for s in (stop or []) if s]
        self.include_stop_str_in_output = include_stop_str_in_output
        self.min_tokens = min_tokens

        info = get_tokenizer_decode_info(tokenizer)
        self._info = info
        # Tokens a trailing byte run may contain: skipped special tokens are transparent.
        self._hold_ids = (
            info.byte_or_special_token_ids if skip_special_tokens else info.byte_token_ids
        )
        self._cleanup = info.cleanup
        if use_decode_stream is None:
            use_decode_stream = info.backend is not None
        elif use_decode_stream and info.backend is None:
            raise ValueError("use_decode_stream=True needs a fast (tokenizers-backed) tokenizer")
        self.uses_decode_stream = use_decode_stream
        raw_decode = self._make_raw_decode()
        self._decoder: _StreamDecoder | _WindowDecoder = (
            _StreamDecoder(info.backend, skip_special_tokens, raw_decode)
            if use_decode_stream
            else _WindowDecoder(raw_decode)
        )

        self.output_token_ids: list[int] = []  # every id given to update()
        self.token_ids: list[int] = []  # the ids that are detokenized
        self._raw_text = ""  # decoder output before clean-up (only kept with clean-up)
        self._text = ""  # stable text, not truncated at a stop string
        self._stop_match: tuple[str, int] | None = None
        self._min_stop_end = 0
        self._emitted = 0  # characters handed out as deltas
        # Trailing run of byte-fallback tokens (held back until a non-byte token ends it).
        self._run_start: int | None = None
        self._run_has_byte = False
        self.finished = False
        self._finalized = False

    # ------------------------------------------------------------------ public API
    @classmethod
    def from_sampling_params(
        cls, tokenizer: Any, prompt_token_ids: Sequence[int] | None, params: Any
    ) -> IncrementalDetokenizer:
        """Build from a :class:`pagedserve.sampling_params.SamplingParams`."""
        return cls(
            tokenizer,
            prompt_token_ids,
            skip_special_tokens=params.skip_special_tokens,
            spaces_between_special_tokens=params.spaces_between_special_tokens,
            stop=list(params.stop or []),
            include_stop_str_in_output=params.include_stop_str_in_output,
            min_tokens=params.min_tokens,
        )

    @property
    def stop_reason(self) -> str | None:
        """The stop string that ended the text, if one did."""
        return self._stop_match[0] if self._stop_match is not None else None

    @property
    def output_text(self) -> str:
        """All text so far (nothing held back), truncated at a matched stop string."""
        if self._stop_match is None:
            return self._text
        return truncate_at_stop(self._text, *self._stop_match, self.include_stop_str_in_output)

    def update(self, new_token_ids: Sequence[int], stop_terminated: bool) -> str | None:
        """Add one step's token ids; return the stop string that matched, else None.

        ``stop_terminated``: the engine finished the request on an EOS / stop token id, the
        last of ``new_token_ids``; its text is left out unless ``include_stop_str_in_output``
        (as in vLLM). The detokenizer is then finished and everything held back is flushed.
        Updates after the detokenizer finished are ignored.
        """
        if self.finished:
            if new_token_ids:
                logger.debug("Ignoring %d token ids after finish", len(new_token_ids))
            return None
        new_token_ids = list(new_token_ids)
        self.output_token_ids.extend(new_token_ids)
        detok_ids = new_token_ids
        if stop_terminated and not self.include_stop_str_in_output and detok_ids:
            detok_ids = detok_ids[:-1]
        if detok_ids:
            num_before = len(self.token_ids)
            if num_before < self.min_tokens:
                # The text of the first min_tokens tokens cannot hold a stop string:
                # advance token by token until its end is known.
                num_free = self.min_tokens - num_before
                for token_id in detok_ids[:num_free]:
                    self._min_stop_end = _NO_STOP_CHECK
                    self._append_and_decode([token_id])
                    self._min_stop_end = len(self._text)
                if len(detok_ids) > num_free:
                    self._append_and_decode(detok_ids[num_free:])
            else:
                self._append_and_decode(detok_ids)
        if self._stop_match is not None:
            self.finished = True
            return self._stop_match[0]
        if stop_terminated:
            return self.finalize()
        return None

    def finalize(self) -> str | None:
        """Finish: flush held-back text, verify against one full decode; idempotent.

        Returns the stop string that matched (possibly in text released only now).
        """
        if self._finalized:
            return self.stop_reason
        self.finished = True
        self._finalized = True
        expected = self.tokenizer.decode(
            self.token_ids, skip_special_tokens=self.skip_special_tokens
        )
        if expected.startswith(self._text):
            if self._stop_match is None and len(expected) > len(self._text):
                self._add_text(expected[len(self._text) :])
        else:
            logger.warning(
                "Incremental detokenization differs from tokenizer.decode (%d vs %d chars, "
                "first difference at %d); using the full decode",
                len(self._text),
                len(expected),
                _common_prefix_len(self._text, expected),
            )
            self._text = ""
            self._stop_match = None
            self._add_text(expected)
        return self.stop_reason

    def get_next_output_text(self, finished: bool, delta: bool) -> str:
        """Text to hand out: new since the last call (``delta``) or everything so far.

        While not finished, a trailing part that could still become a stop string is held
        back. ``finished=True`` finalizes (flushes everything).
        """
        if finished:
            self.finalize()
        text = self.output_text
        end = len(text)
        if not self.finished and self.stop and not self.include_stop_str_in_output:
            end -= partial_stop_suffix_len(text, self.stop)
        if not delta:
            return text[:end]
        if end <= self._emitted:
            if end < self._emitted:
                # Only after a (logged) mismatch at finalize: the stream cannot be rewritten.
                self._emitted = end
            return ""
        chunk = text[self._emitted : end]
        self._emitted = end
        return chunk

    # ----------------------------------------------------------------- internals
    def _make_raw_decode(self) -> Callable[[list[int]], str]:
        skip = self.skip_special_tokens
        backend = self._info.backend
        if backend is not None:
            return lambda ids: backend.decode(ids, skip_special_tokens=skip)
        tokenizer = self.tokenizer
        return lambda ids: tokenizer.decode(
            ids, skip_special_tokens=skip, clean_up_tokenization_spaces=False
        )

    def _append_and_decode(self, ids: list[int]) -> None:
        token_ids = self.token_ids
        if self._info.byte_token_ids:
            # Track the trailing run of byte (and skipped special) tokens in O(1) per token.
            hold, byte_ids = self._hold_ids, self._info.byte_token_ids
            for token_id in ids:
                if token_id in hold:
                    if self._run_start is None:
                        self._run_start = len(token_ids)
                    if token_id in byte_ids:
                        self._run_has_byte = True
                else:
                    self._run_start = None
                    self._run_has_byte = False
                token_ids.append(token_id)
        else:
            token_ids.extend(ids)
        stable_end = len(token_ids)
        if self._run_has_byte and self._run_start is not None:
            stable_end = self._run_start
        chunk = self._decoder.feed(token_ids, stable_end)
        if self._cleanup is None:
            if chunk:
                self._add_text(chunk)
            return
        if not chunk:
            return
        self._raw_text += chunk
        tail = self._info.cleanup_tail
        if tail is None:
            return  # unbounded custom clean-up: everything is released at finalize()
        cleaned = self._cleanup(self._raw_text)
        stable = len(cleaned) - tail
        if stable > len(self._text) and cleaned.startswith(self._text):
            self._add_text(cleaned[len(self._text) : stable])

    def _add_text(self, chunk: str) -> None:
        """Append stable text and search the new region for stop strings."""
        start = len(self._text)
        self._text += chunk
        if self.stop and self._stop_match is None:
            self._stop_match = find_stop_string(self._text, self.stop, start, self._min_stop_end)


def _common_prefix_len(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
