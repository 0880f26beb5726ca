"""Our models vs transformers on tiny random checkpoints of every supported architecture:
paged prefill (chunked) + decode, mixed batches, windows longer than the sliding window."""

from __future__ import annotations

import random

import pytest
import torch

from tests.models.helpers import hf_logits, load_hf, load_ours
from tests.utils.paged import PagedSequenceRunner
from tests.utils.tiny_models import TINY_ARCHS, TINY_VOCAB_SIZE

ATOL = 1e-4
RTOL = 1e-4


@pytest.fixture(scope="module", params=TINY_ARCHS)
def models(request, tiny_model_dir):
    folder = tiny_model_dir(request.param)
    ours, resolved = load_ours(folder)
    return request.param, ours, load_hf(folder), resolved


def _prompt(length: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [1] + [rng.randrange(4, TINY_VOCAB_SIZE) for _ in range(length - 1)]


def _generate(
    runner: PagedSequenceRunner, seq_id: str, prompt: list[int], chunks: list[int], num_decode: int
) -> tuple[list[int], torch.Tensor]:
    """Chunked prefill then greedy decoding; returns all token ids and every position's logits."""
    assert sum(chunks) == len(prompt)
    runner.add(seq_id, prompt)
    logits = [runner.step([(seq_id, n)])[seq_id] for n in chunks]
    for _ in range(num_decode):
        runner.append(seq_id, int(logits[-1][-1].argmax()))
        logits.append(runner.step([(seq_id, 1)])[seq_id])
    return runner.sequences[seq_id].token_ids, torch.cat(logits)


def test_prefill_and_decode_match_transformers(models) -> None:
    arch, ours, hf, resolved = models
    runner = PagedSequenceRunner(ours, resolved.hf_config, block_size=4)
    prompt = _prompt(13, seed=1)
    tokens, logits = _generate(runner, "a", prompt, [5, 8], num_decode=8)
    expected = hf_logits(hf, tokens)
    torch.testing.assert_close(logits, expected, atol=ATOL, rtol=RTOL)
    generated = tokens[len(prompt):]
    assert generated == expected[len(prompt) - 1 : -1].argmax(-1).tolist()


def test_long_sequence_beyond_sliding_window(models) -> None:
    arch, ours, hf, resolved = models
    runner = PagedSequenceRunner(ours, resolved.hf_config, block_size=4, num_blocks=64, seed=3)
    prompt = _prompt(43, seed=2)
    tokens, logits = _generate(runner, "long", prompt, [16, 1, 19, 7], num_decode=12)
    torch.testing.assert_close(logits, hf_logits(hf, tokens), atol=ATOL, rtol=RTOL)


def test_mixed_batch_matches_each_alone(models) -> None:
    arch, ours, hf, resolved = models
    runner = PagedSequenceRunner(ours, resolved.hf_config, block_size=4, num_blocks=96, seed=5)
    prompts = {"a": _prompt(10, 11), "b": _prompt(9, 12), "c": _prompt(23, 13), "d": _prompt(2, 14)}
    collected: dict[str, list[torch.Tensor]] = {k: [] for k in prompts}
    for seq_id, prompt in prompts.items():
        runner.add(seq_id, prompt)

    def run(schedule: list[tuple[str, int]]) -> None:
        for seq_id, out in runner.step(schedule).items():
            collected[seq_id].append(out)
            seq = runner.sequences[seq_id]
            if seq.num_computed == len(seq.token_ids):  # sample the next token
                runner.append(seq_id, int(out[-1].argmax()))

    run([("a", 6), ("b", 9)])  # a: partial prefill, b: whole prompt
    run([("b", 1), ("a", 4), ("c", 11)])  # decode + last chunk + new prefill
    run([("c", 12), ("a", 1), ("b", 1), ("d", 2)])
    for _ in range(5):  # decodes, with d's first decode mixed in
        run([("a", 1), ("b", 1), ("c", 1), ("d", 1)])
    for seq_id, pieces in collected.items():
        tokens = runner.sequences[seq_id].token_ids
        logits = torch.cat(pieces)
        expected = hf_logits(hf, tokens[: logits.shape[0]])
        torch.testing.assert_close(logits, expected, atol=ATOL, rtol=RTOL, msg=f"{arch}/{seq_id}")
