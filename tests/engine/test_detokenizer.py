"""Incremental detokenization and stop strings.

The invariant under test: the deltas handed out concatenate to exactly
``tokenizer.decode(ids, skip_special_tokens=...)`` (cut at the first stop string), and a
partial stop string is never handed out before the request finishes. Checked on the real
Gemma 3 tokenizer (converted from the default GGUF, cached on disk) and on small tokenizers
built here: byte-level BPE (GPT-2 style), SentencePiece-style BPE with byte fallback and a
leading-space strip (Llama 2 style), WordPiece with transformers' clean-up, and a slow
(pure Python) SentencePiece tokenizer.
"""

from __future__ import annotations

import io
import random
import time

import pytest
from tokenizers import (
    AddedToken,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    trainers,
)
from transformers import PreTrainedTokenizerFast

from pagedserve.engine.detokenizer import IncrementalDetokenizer
from pagedserve.engine.stop_checker import find_stop_string, partial_stop_suffix_len

CORPUS = [
    "Hello world, this is a test. It isn't hard; we're done!",
    "日本語のテキストです。東京は大きい。",
    "Emoji 😀 party 🎉! Flags 🇫🇷 and family 👨‍👩‍👧.",
    "Ünïcödé façade naïve café — “quoted” «text»",
    "The end is near. STOP here! \n\nUser: next turn",
] * 20


# ------------------------------------------------------------------------- tokenizers
# gemma_tokenizer: the default model's tokenizer, a session fixture in tests/conftest.py.


@pytest.fixture(scope="module")
def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    """GPT-2 style byte-level BPE: multi-byte characters split across tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>"
    )


@pytest.fixture(scope="module")
def llama2_style_tokenizer() -> PreTrainedTokenizerFast:
    """SentencePiece-style BPE: "▁" spaces, <0xHH> byte fallback, first leading space stripped."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for piece in ["▁", "▁Hello", "▁world", "Hello", "▁the", "▁STOP", "é", "日本", "▁▁"]:
        vocab[piece] = len(vocab)
    for ch in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?:'\n":
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    tok.add_special_tokens([AddedToken("<s>", special=True), AddedToken("</s>", special=True)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


@pytest.fixture(scope="module")
def wordpiece_cleanup_tokenizer() -> PreTrainedTokenizerFast:
    """BERT-like WordPiece whose decode applies transformers' clean_up_tokenization."""
    words = (
        "[UNK] [CLS] [SEP] hello world it is n't ' s 's 'm 've 're do we . , ! ? ##s ##ing go i a"
    )
    words = words.split()
    tok = Tokenizer(models.WordPiece({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tok.add_special_tokens([AddedToken("[CLS]", special=True), AddedToken("[SEP]", special=True)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        clean_up_tokenization_spaces=True,
    )


@pytest.fixture(scope="module")
def slow_sentencepiece_tokenizer(tmp_path_factory):
    """A pure-Python (transformers SentencePieceBackend) tokenizer from a trained model."""
    spm = pytest.importorskip("sentencepiece")
    from transformers.models.bert_generation.tokenization_bert_generation import (
        BertGenerationTokenizer,
    )

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS),
        model_writer=model,
        vocab_size=400,
        byte_fallback=True,
        model_type="bpe",
        character_coverage=0.995,
        minloglevel=2,
    )
    path = tmp_path_factory.mktemp("spm") / "sp.model"
    path.write_bytes(model.getvalue())
    return BertGenerationTokenizer(vocab_file=str(path))


# ---------------------------------------------------------------------------- helpers
def _stream(
    detok: IncrementalDetokenizer,
    ids: list[int],
    rng: random.Random | None = None,
    stop_terminated: bool = False,
) -> list[str]:
    """Feed ids in random-sized steps; return the deltas (the last one after finishing)."""
    deltas: list[str] = []
    i = 0
    while i < len(ids):
        k = rng.randint(1, 4) if rng is not None else 1
        last = i + k >= len(ids)
        stop_str = detok.update(ids[i : i + k], stop_terminated and last)
        cumulative = detok.get_next_output_text(finished=False, delta=False)
        deltas.append(detok.get_next_output_text(finished=False, delta=True))
        assert cumulative == "".join(deltas)
        i += k
        if stop_str is not None:
            break
    deltas.append(detok.get_next_output_text(finished=True, delta=True))
    return deltas


def _random_ids(
    rng: random.Random, tokenizer, n: int, byte_ids: list[int], special_ids: list[int]
) -> list[int]:
    vocab_size = len(tokenizer)
    ids = []
    for _ in range(n):
        r = rng.random()
        if r < 0.3 and byte_ids:
            ids.append(rng.choice(byte_ids))
        elif r < 0.4 and special_ids:
            ids.append(rng.choice(special_ids))
        else:
            ids.append(rng.randrange(vocab_size))
    return ids


def _check_random_sequences(
    tokenizer,
    seed: int,
    num_sequences: int,
    byte_ids: list[int],
    special_ids: list[int],
    decode_stream_modes=(True, False),
) -> None:
    rng = random.Random(seed)
    for _ in range(num_sequences):
        ids = _random_ids(rng, tokenizer, rng.randint(1, 24), byte_ids, special_ids)
        for skip in (True, False):
            expected = tokenizer.decode(ids, skip_special_tokens=skip)
            for use_stream in decode_stream_modes:
                detok = IncrementalDetokenizer(
                    tokenizer, [1, 2], skip_special_tokens=skip, use_decode_stream=use_stream
                )
                deltas = _stream(detok, ids, rng)
                assert "".join(deltas) == expected, (ids, skip, use_stream, deltas)
                assert detok.output_text == expected


def _byte_ids(tokenizer) -> list[int]:
    ids = [tokenizer.convert_tokens_to_ids(f"<0x{b:02X}>") for b in range(256)]
    return [i for i in ids if i is not None and i != tokenizer.unk_token_id]


# --------------------------------------------------------------------- decode equality
def test_gemma_random_ids_deltas_concatenate_to_decode(gemma_tokenizer):
    special = [0, 1, 2, 3, 4, 6, 105, 106]  # pad, eos, bos, unk, mask, unused0, turn markers
    _check_random_sequences(gemma_tokenizer, 0, 400, _byte_ids(gemma_tokenizer), special)


def test_gemma_real_text_token_by_token(gemma_tokenizer):
    text = (
        "Hello,  world!\n\n  Leading spaces, 日本語のテキスト, emoji 😀🎉👨‍👩‍👧, "
        "combining é and e\u0301, ǅ, 🇫🇷, tabs\tand “quotes”."
    )
    ids = gemma_tokenizer(text, add_special_tokens=False).input_ids
    for use_stream in (True, False):
        detok = IncrementalDetokenizer(gemma_tokenizer, [2], use_decode_stream=use_stream)
        deltas = _stream(detok, ids)
        assert "".join(deltas) == text == gemma_tokenizer.decode(ids)
        assert not any("\ufffd" in d for d in deltas)


def test_gemma_emoji_split_across_byte_tokens(gemma_tokenizer):
    emoji_bytes = "😀".encode()
    byte_tokens = [gemma_tokenizer.convert_tokens_to_ids(f"<0x{b:02X}>") for b in emoji_bytes]
    hello = gemma_tokenizer("Hi ", add_special_tokens=False).input_ids
    world = gemma_tokenizer(" there", add_special_tokens=False).input_ids
    ids = hello + byte_tokens + world
    for use_stream in (True, False):
        detok = IncrementalDetokenizer(gemma_tokenizer, [2], use_decode_stream=use_stream)
        emitted = []
        for token_id in ids:
            detok.update([token_id], False)
            emitted.append(detok.get_next_output_text(False, True))
        emitted.append(detok.get_next_output_text(True, True))
        assert "".join(emitted) == "Hi 😀 there" == gemma_tokenizer.decode(ids)
        assert all("\ufffd" not in d for d in emitted)
        # Released whole, with the token that ends the byte run (a later invalid byte could
        # still have turned the run into U+FFFDs).
        assert "😀 there" in emitted


def test_gemma_invalid_byte_run_matches_decode(gemma_tokenizer):
    # "<0x53>" alone is "S", but followed by a lone continuation byte the whole run is invalid
    # and decode() turns *both* bytes into U+FFFD: the "S" must never be streamed.
    s_byte, bad_byte = (gemma_tokenizer.convert_tokens_to_ids(t) for t in ("<0x53>", "<0x94>"))
    tail = gemma_tokenizer(" ok", add_special_tokens=False).input_ids
    ids = [s_byte, bad_byte, 105, *tail]  # 105 = <start_of_turn>, skipped
    expected = gemma_tokenizer.decode(ids, skip_special_tokens=True)
    assert expected == "\ufffd\ufffd ok"
    for use_stream in (True, False):
        detok = IncrementalDetokenizer(gemma_tokenizer, [2], use_decode_stream=use_stream)
        detok.update([s_byte], False)
        assert detok.get_next_output_text(False, True) == ""
        deltas = ["", *_stream(detok, ids[1:])]
        assert "".join(deltas) == expected
        assert all("S" not in d for d in deltas)


def test_byte_level_bpe_random_ids(byte_level_tokenizer):
    _check_random_sequences(byte_level_tokenizer, 1, 300, [], [0, 1, 2])


def test_byte_level_bpe_multibyte_split(byte_level_tokenizer):
    tok = byte_level_tokenizer
    text = "naïve 😀 日本 🇫🇷 done"
    # Encode every UTF-8 byte as its own token so characters straddle many tokens.
    byte_vocab = pre_tokenizers.ByteLevel.alphabet()
    mapping = {ch: tok.convert_tokens_to_ids(ch) for ch in byte_vocab}
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    b2u = bytes_to_unicode()
    ids = [mapping[b2u[b]] for b in text.encode()]
    for use_stream in (True, False):
        detok = IncrementalDetokenizer(tok, [], use_decode_stream=use_stream)
        deltas = _stream(detok, ids)
        assert "".join(deltas) == text == tok.decode(ids)
        assert all("\ufffd" not in d for d in deltas)


def test_llama2_style_leading_space_and_byte_fallback(llama2_style_tokenizer):
    tok = llama2_style_tokenizer
    text = "Hello world 😀 é the STOP 日本"
    ids = tok(text, add_special_tokens=False).input_ids
    for use_stream in (True, False):
        detok = IncrementalDetokenizer(tok, [1], use_decode_stream=use_stream)
        assert "".join(_stream(detok, ids)) == tok.decode(ids) == text
    _check_random_sequences(tok, 2, 300, _byte_ids(tok), [1, 2])


def test_transformers_cleanup_is_applied_exactly(wordpiece_cleanup_tokenizer):
    tok = wordpiece_cleanup_tokenizer
    words = "hello , it is n't a world . we 're go ##ing ' s i 'm ' do !".split()
    ids = tok.convert_tokens_to_ids(words)
    assert tok.unk_token_id not in ids
    assert tok.decode(ids) != tok.decode(ids, clean_up_tokenization_spaces=False)
    for use_stream in (True, False):
        detok = IncrementalDetokenizer(tok, [], use_decode_stream=use_stream)
        assert detok._cleanup is not None  # the clean-up stage is in use
        assert "".join(_stream(detok, ids)) == tok.decode(ids)
    _check_random_sequences(tok, 3, 300, [], [1, 2])


def test_slow_tokenizer_uses_window_decoding(slow_sentencepiece_tokenizer):
    tok = slow_sentencepiece_tokenizer
    detok = IncrementalDetokenizer(tok, [])
    assert not detok.uses_decode_stream
    with pytest.raises(ValueError, match="fast"):
        IncrementalDetokenizer(tok, [], use_decode_stream=True)
    text = "Hello world, this is a test. 日本語 😀"
    ids = tok(text, add_special_tokens=False).input_ids
    assert "".join(_stream(IncrementalDetokenizer(tok, []), ids)) == tok.decode(ids)
    _check_random_sequences(tok, 4, 150, _byte_ids(tok), list(tok.all_special_ids), (False,))


# ------------------------------------------------------------------------ stop strings
def test_stop_checker_functions():
    assert find_stop_string("abc STOP x", ["STOP"], 0) == ("STOP", 4)
    # Already-searched text is not searched again, except the len(stop) - 1 overlap.
    assert find_stop_string("STOP and more", ["STOP"], 5) is None
    assert find_stop_string("xxSTOP", ["STOP"], 5) == ("STOP", 2)
    # The match completing first wins; on a tie, the longer one.
    assert find_stop_string("xyz", ["xyz", "y"], 0) == ("y", 1)
    assert find_stop_string("abc", ["bc", "abc"], 0) == ("abc", 0)
    assert find_stop_string("a STOP b END", ["END", "STOP"], 0) == ("STOP", 2)
    # min_end: a match inside the first min_tokens' text does not count.
    assert find_stop_string("STOP STOP", ["STOP"], 0, min_end=5) == ("STOP", 5)
    assert partial_stop_suffix_len("hello ST", ["STOP"]) == 2
    assert partial_stop_suffix_len("hello S", ["STOP", "\n\nUser:"]) == 1
    assert partial_stop_suffix_len("hello\n\nUse", ["STOP", "\n\nUser:"]) == 5
    assert partial_stop_suffix_len("hello", ["STOP"]) == 0
    assert partial_stop_suffix_len("", ["STOP"]) == 0


def _stream_checking_prefix(detok: IncrementalDetokenizer, ids: list[int], expected: str) -> str:
    """Stream token by token; everything emitted must be a prefix of the final text."""
    emitted = ""
    for token_id in ids:
        stop_str = detok.update([token_id], False)
        emitted += detok.get_next_output_text(finished=False, delta=True)
        assert expected.startswith(emitted), emitted
        if stop_str is not None:
            break
    emitted += detok.get_next_output_text(finished=True, delta=True)
    return emitted


def test_stop_string_spanning_tokens_is_never_emitted(gemma_tokenizer):
    text = "Sure, here it is.\n\nUser: what next?\n\nUser: again"
    ids = gemma_tokenizer(text, add_special_tokens=False).input_ids
    pieces = gemma_tokenizer.convert_ids_to_tokens(ids)
    assert "User" in pieces or "▁User" in pieces  # the stop string spans several tokens
    stop = ["\n\nUser:"]
    for use_stream in (True, False):
        detok = IncrementalDetokenizer(
            gemma_tokenizer, [2], stop=stop, use_decode_stream=use_stream
        )
        emitted = _stream_checking_prefix(detok, ids, "Sure, here it is.")
        assert emitted == "Sure, here it is." == detok.output_text
        assert detok.stop_reason == "\n\nUser:"
        assert detok.finished


def test_stop_string_include_in_output(gemma_tokenizer):
    text = "The answer is 42. END of story, END again"
    ids = gemma_tokenizer(text, add_special_tokens=False).input_ids
    detok = IncrementalDetokenizer(
        gemma_tokenizer, [2], stop=["END"], include_stop_str_in_output=True
    )
    deltas = _stream(detok, ids)
    assert "".join(deltas) == "The answer is 42. END" == detok.output_text
    assert detok.stop_reason == "END"


def test_multiple_stop_strings_earliest_wins(gemma_tokenizer):
    text = "alpha beta gamma delta"
    ids = gemma_tokenizer(text, add_special_tokens=False).input_ids
    for chunked in (False, True):
        detok = IncrementalDetokenizer(gemma_tokenizer, [2], stop=["delta", "gamma", " beta"])
        if chunked:  # everything in one update: still the earliest match
            assert detok.update(ids, False) == " beta"
        else:
            _stream(detok, ids)
        assert detok.output_text == "alpha"
        assert detok.stop_reason == " beta"
        assert detok.get_next_output_text(True, False) == "alpha"


def test_stop_text_after_match_in_same_token_is_dropped(gemma_tokenizer):
    ids = gemma_tokenizer("one two three", add_special_tokens=False).input_ids
    detok = IncrementalDetokenizer(gemma_tokenizer, [2], stop=["tw"])
    assert _stream(detok, ids)[-1] == ""
    assert detok.output_text == "one "
    detok = IncrementalDetokenizer(
        gemma_tokenizer, [2], stop=["tw"], include_stop_str_in_output=True
    )
    _stream(detok, ids)
    assert detok.output_text == "one tw"


def test_min_tokens_ignores_early_stop_strings(gemma_tokenizer):
    ids = gemma_tokenizer("stop here, then stop again", add_special_tokens=False).input_ids
    detok = IncrementalDetokenizer(gemma_tokenizer, [2], stop=["stop"], min_tokens=3)
    assert detok.update(ids, False) == "stop"
    assert detok.output_text == "stop here, then "


def test_random_stop_strings_match_reference(byte_level_tokenizer):
    """Property: streaming result == decode(all ids) cut at the first-completing stop."""
    tok = byte_level_tokenizer
    rng = random.Random(5)
    alphabet = "ab c\n😀é"
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40)))
        ids = tok(text, add_special_tokens=False).input_ids
        full = tok.decode(ids)
        stop = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 4))) for _ in range(2)]
        include = rng.random() < 0.3
        match = find_stop_string(full, stop, 0)
        expected = full
        if match is not None:
            s, idx = match
            expected = full[: idx + len(s)] if include else full[:idx]
        detok = IncrementalDetokenizer(tok, [], stop=stop, include_stop_str_in_output=include)
        emitted = ""
        for i in range(0, len(ids)):
            hit = detok.update(ids[i : i + 1], False)
            emitted += detok.get_next_output_text(False, True)
            # Nothing emitted is ever taken back: no (partial) stop string got out early.
            assert expected.startswith(emitted), (text, stop, emitted)
            if hit is not None:
                break
        emitted += detok.get_next_output_text(True, True)
        assert emitted == expected == detok.output_text, (text, stop, include)
        assert detok.stop_reason == (match[0] if match else None)


# ------------------------------------------------------------------- finishing rules
def test_stop_terminated_token_text_excluded_unless_included(gemma_tokenizer):
    eos = gemma_tokenizer.eos_token_id
    ids = gemma_tokenizer("Done.", add_special_tokens=False).input_ids + [eos]
    detok = IncrementalDetokenizer(gemma_tokenizer, [2], skip_special_tokens=False)
    assert "".join(_stream(detok, ids, stop_terminated=True)) == "Done."
    assert detok.output_token_ids == ids
    assert detok.finished
    detok = IncrementalDetokenizer(
        gemma_tokenizer, [2], skip_special_tokens=False, include_stop_str_in_output=True
    )
    assert "".join(_stream(detok, ids, stop_terminated=True)) == "Done.<eos>"


def test_updates_after_finish_are_ignored(gemma_tokenizer):
    ids = gemma_tokenizer("a b c STOP d e", add_special_tokens=False).input_ids
    detok = IncrementalDetokenizer(gemma_tokenizer, [2], stop=["STOP"])
    assert detok.update(ids, False) == "STOP"
    assert detok.update(ids, False) is None
    assert detok.get_next_output_text(True, False) == "a b c "


def test_held_back_text_is_released_on_finish(gemma_tokenizer):
    ids = gemma_tokenizer("wait for ST", add_special_tokens=False).input_ids
    detok = IncrementalDetokenizer(gemma_tokenizer, [2], stop=["STOP"])
    detok.update(ids, False)
    assert detok.get_next_output_text(False, False) == "wait for "
    assert detok.get_next_output_text(False, True) == "wait for "
    assert detok.get_next_output_text(True, True) == "ST"
    assert detok.get_next_output_text(True, False) == "wait for ST"


def test_update_cost_per_token_on_gemma(gemma_tokenizer):
    """Per-token cost of update() + a delta read, as the output processor does each step."""
    text = "The quick brown fox jumps over the lazy dog. 日本語 😀 “quotes” — done.\n" * 40
    ids = gemma_tokenizer(text, add_special_tokens=False).input_ids
    detok = IncrementalDetokenizer(gemma_tokenizer, [2], stop=["\n\nUser:", "###"])
    start = time.perf_counter()
    for token_id in ids:
        detok.update([token_id], False)
        detok.get_next_output_text(False, True)
    per_token_us = (time.perf_counter() - start) / len(ids) * 1e6
    detok.get_next_output_text(True, True)
    assert detok.output_text == text
    # Generous bound: catches accidental O(n) work per token, not machine noise.
    assert per_token_us < 200, per_token_us


# --------------------------------------------------------------------- safety nets
class _FailingStream:
    """Wraps a DecodeStream and fails once, like tokenizers' "Invalid prefix" error."""

    def __init__(self, inner, fail_on_call: int) -> None:
        self.inner = inner
        self.fail_on_call = fail_on_call
        self.calls = 0

    def step(self, tokenizer, ids):
        self.calls += 1
        if self.calls == self.fail_on_call:
            raise Exception("Invalid prefix encountered while decoding stream")
        return self.inner.step(tokenizer, ids)


def test_decode_stream_error_falls_back_to_window_decoding(gemma_tokenizer, caplog):
    text = "Streaming survives a decoder error: 日本語 😀 and more words here."
    ids = gemma_tokenizer(text, add_special_tokens=False).input_ids
    for fail_on_call in (1, 3, len(ids) - 1):
        detok = IncrementalDetokenizer(gemma_tokenizer, [2], use_decode_stream=True)
        detok._decoder._stream = _FailingStream(detok._decoder._stream, fail_on_call)
        with caplog.at_level("WARNING"):
            assert "".join(_stream(detok, ids)) == text
        assert "DecodeStream failed" in caplog.text


class _NonLocalDecodeTokenizer(PreTrainedTokenizerFast):
    """decode() rewrites text across token boundaries, which no stream can foresee."""

    def _decode(self, token_ids, skip_special_tokens=False, **kwargs):
        return super()._decode(token_ids, skip_special_tokens, **kwargs).replace("ab", "X")


def test_finalize_prefers_full_decode_when_stream_differs(byte_level_tokenizer, caplog):
    tok = _NonLocalDecodeTokenizer(tokenizer_object=byte_level_tokenizer.backend_tokenizer)
    ids = [tok.convert_tokens_to_ids(c) for c in "xab"]
    detok = IncrementalDetokenizer(tok, [])
    with caplog.at_level("WARNING"):
        _stream(detok, ids)
    assert detok.output_text == tok.decode(ids) == "xX"
    assert "differs from tokenizer.decode" in caplog.text


def test_from_sampling_params(gemma_tokenizer):
    from pagedserve.sampling_params import SamplingParams

    params = SamplingParams(stop="END", include_stop_str_in_output=True, min_tokens=1)
    detok = IncrementalDetokenizer.from_sampling_params(gemma_tokenizer, [2], params)
    assert detok.stop == ["END"] and detok.include_stop_str_in_output and detok.min_tokens == 1
    ids = gemma_tokenizer("x END y", add_special_tokens=False).input_ids
    assert detok.update(ids, False) == "END"
    assert detok.get_next_output_text(True, False) == "x END"
