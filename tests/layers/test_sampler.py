"""Sampler: exact greedy, exact support of the filters, penalties, seeds, logprobs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pagedserve import platform
from pagedserve.core.request import Request
from pagedserve.layers.logprobs import compute_logprobs, topk_rows
from pagedserve.layers.sampler import Sampler, SamplingMetadata
from pagedserve.sampling_params import SamplingParams
from pagedserve.worker.sampling_metadata import RowSamplingParams

DEVICE = platform.device()


def make_requests(
    params: list[SamplingParams],
    prompts: list[list[int]] | None = None,
    outputs: list[list[int]] | None = None,
) -> list[Request]:
    requests = []
    for i, p in enumerate(params):
        prompt = prompts[i] if prompts else [0, 1, 2]
        request = Request(f"r{i}", prompt, p)
        if outputs and outputs[i]:
            request.append_output_token_ids(outputs[i])
        requests.append(request)
    return requests


def make_metadata(
    params: list[SamplingParams],
    vocab: int,
    prompts: list[list[int]] | None = None,
    outputs: list[list[int]] | None = None,
    seed: int = 0,
    generators: dict[int, torch.Generator] | None = None,
) -> SamplingMetadata:
    requests = make_requests(params, prompts, outputs)
    rows = RowSamplingParams(len(params) + 3, vocab, DEVICE)
    # Use rows in a scrambled order, as the input batch does.
    row_ids = np.arange(len(params))[::-1].copy() + 1
    for i, (row, request) in enumerate(zip(row_ids, requests, strict=True)):
        generator = None
        if request.sampling_params.seed is not None:
            generator = (generators or {}).get(i)
            if generator is None:
                generator = torch.Generator(DEVICE).manual_seed(request.sampling_params.seed)
        rows.set_row(int(row), request.sampling_params, request.prompt_token_ids, generator)
    default = torch.Generator(DEVICE).manual_seed(seed)
    return rows.build(row_ids, [r.output_token_ids for r in requests], default)


def sample(logits: torch.Tensor, md: SamplingMetadata) -> torch.Tensor:
    return Sampler()(logits.to(DEVICE, copy=True), md).sampled_token_ids


def test_greedy_is_argmax_large_vocab() -> None:
    torch.manual_seed(0)
    logits = torch.randn(7, 262144)
    md = make_metadata([SamplingParams(temperature=0.0)] * 7, 262144)
    assert md.all_greedy and md.temperature is None
    assert torch.equal(sample(logits, md), logits.argmax(dim=-1))


def test_greedy_rows_in_mixed_batch_are_argmax() -> None:
    torch.manual_seed(1)
    logits = torch.randn(6, 1000)
    params = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.8, top_k=5),
        SamplingParams(temperature=0.0, top_p=0.1, top_k=3),  # filters don't matter for greedy
        SamplingParams(temperature=1.2),
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.5, top_p=0.5),
    ]
    md = make_metadata(params, 1000)
    out = sample(logits, md)
    argmax = logits.argmax(dim=-1)
    for i in (0, 2, 4):
        assert out[i] == argmax[i]
    top5 = set(torch.topk(logits[1], 5).indices.tolist())
    assert int(out[1]) in top5


def _support(logits_row: torch.Tensor, params: SamplingParams, num_samples: int) -> np.ndarray:
    vocab = logits_row.shape[0]
    logits = logits_row.unsqueeze(0).expand(num_samples, vocab).contiguous()
    md = make_metadata([params] * num_samples, vocab, seed=123)
    return sample(logits, md).numpy()


# probs 0.5, 0.3, 0.1, 0.05, 0.05 on tokens 4, 0, 2, 1, 3
_PROBS = {4: 0.5, 0: 0.3, 2: 0.1, 1: 0.05, 3: 0.05}


def _small_logits(vocab: int = 5) -> torch.Tensor:
    logits = torch.full((vocab,), float("-inf"))
    for token, p in _PROBS.items():
        logits[token] = math.log(p)
    return logits


_FILTER_CASES = [
    (SamplingParams(temperature=1.0), {4, 0, 2, 1, 3}),
    (SamplingParams(temperature=1.0, top_k=2), {4, 0}),
    (SamplingParams(temperature=1.0, top_k=1), {4}),
    (SamplingParams(temperature=1.0, top_p=0.75), {4, 0}),
    (SamplingParams(temperature=1.0, top_p=0.85), {4, 0, 2}),
    (SamplingParams(temperature=1.0, top_p=0.3), {4}),
    (SamplingParams(temperature=1.0, min_p=0.15), {4, 0, 2}),
    (SamplingParams(temperature=1.0, min_p=0.7), {4}),
    (SamplingParams(temperature=1.0, top_k=3, top_p=0.6), {4, 0}),
    (SamplingParams(temperature=1.0, top_k=4, min_p=0.5), {4, 0}),
    (SamplingParams(temperature=2.0, top_p=0.75), {4, 0, 2}),  # flatter: 0.42,0.33,0.15..
]


@pytest.mark.parametrize("params, expected", _FILTER_CASES)
def test_filters_restrict_support_exactly(params: SamplingParams, expected: set[int]) -> None:
    tokens = _support(_small_logits(5), params, 3000)
    assert set(np.unique(tokens).tolist()) == expected


@pytest.mark.parametrize("case", [0, 1, 3, 6, 9])
def test_filters_restrict_support_large_vocab(case: int) -> None:
    # The large-vocabulary code paths: chunked top-k, top-p candidates, two-level CDF.
    params, expected = _FILTER_CASES[case]
    tokens = _support(_small_logits(70003), params, 300)
    assert set(np.unique(tokens).tolist()) == expected


def test_frequencies_follow_distribution_full_vocab() -> None:
    # Tokens spread over several CDF chunks and the tail of a vocab that is not a
    # multiple of the chunk length.
    vocab = 4100
    logits = torch.full((vocab,), float("-inf"))
    probs = {3: 0.1, 1500: 0.2, 4099: 0.3, 2048: 0.4}
    for token, p in probs.items():
        logits[token] = math.log(p)
    tokens = _support(logits, SamplingParams(temperature=1.0), 8000)
    values, counts = np.unique(tokens, return_counts=True)
    assert set(values.tolist()) == set(probs)
    for token, count in zip(values.tolist(), counts.tolist(), strict=True):
        assert abs(count / 8000 - probs[token]) < 0.03


def test_frequencies_follow_distribution_top_k_top_p() -> None:
    logits = _small_logits(100)
    tokens = _support(logits, SamplingParams(temperature=1.0, top_k=3, top_p=0.95), 8000)
    # top-k 3 -> {0.5, 0.3, 0.1} renormalized; top-p 0.95 keeps all three.
    expected = {4: 0.5 / 0.9, 0: 0.3 / 0.9, 2: 0.1 / 0.9}
    values, counts = np.unique(tokens, return_counts=True)
    assert set(values.tolist()) == set(expected)
    for token, count in zip(values.tolist(), counts.tolist(), strict=True):
        assert abs(count / 8000 - expected[token]) < 0.03


def test_top_p_falls_back_to_sorting_on_flat_rows() -> None:
    # Nearly flat distribution over 20000 tokens: the 1024 best hold < top_p of the mass.
    vocab = 20000
    torch.manual_seed(3)
    logits = torch.randn(vocab) * 0.01
    params = SamplingParams(temperature=1.0, top_p=0.5)
    tokens = _support(logits, params, 60)
    order = torch.argsort(logits, descending=True)
    probs = torch.softmax(logits.double(), -1)[order]
    num_kept = int(((probs.cumsum(0) - probs) < 0.5).sum())
    kept = set(order[:num_kept].tolist())
    assert set(tokens.tolist()) <= kept
    assert len(set(tokens.tolist())) > 40


def test_penalties_match_hand_computation() -> None:
    vocab = 10
    logits = torch.tensor(
        [[2.0, -1.0, 0.5, -0.5, 3.0, 1.0, -2.0, 0.0, 4.0, -3.0]] * 2, dtype=torch.float32
    )
    prompt = [0, 1, 7]
    output = [2, 3, 2, 9, 2]
    params = [
        SamplingParams(temperature=0.0, repetition_penalty=2.0),
        SamplingParams(temperature=0.0, frequency_penalty=0.5, presence_penalty=0.25),
    ]
    md = make_metadata(params, vocab, prompts=[prompt, prompt], outputs=[output, output])
    edited = logits.to(DEVICE, copy=True)
    Sampler._apply_logits_edits(edited, md)
    edited = edited.cpu()
    expected_rep = logits[0].clone()
    for token in set(prompt) | set(output):
        value = expected_rep[token]
        expected_rep[token] = value / 2.0 if value > 0 else value * 2.0
    expected_freq = logits[1].clone()
    for token in set(output):
        expected_freq[token] -= 0.5 * output.count(token) + 0.25
    torch.testing.assert_close(edited[0], expected_rep)
    torch.testing.assert_close(edited[1], expected_freq)


def test_logit_bias_and_allowed_tokens() -> None:
    vocab = 50
    torch.manual_seed(4)
    logits = torch.randn(3, vocab)
    params = [
        SamplingParams(temperature=0.0, logit_bias={7: 100.0}),
        SamplingParams(temperature=0.0, allowed_token_ids=[3, 11, 40]),
        SamplingParams(temperature=1.0, allowed_token_ids=[5, 6], logit_bias={6: -100.0}),
    ]
    md = make_metadata(params, vocab)
    edited = logits.to(DEVICE, copy=True)
    Sampler._apply_logits_edits(edited, md)
    edited = edited.cpu()
    assert edited[0, 7] == pytest.approx(float(logits[0, 7]) + 100.0)
    allowed = torch.full((vocab,), float("-inf"))
    allowed[[3, 11, 40]] = logits[1, [3, 11, 40]]
    assert torch.equal(edited[1], allowed)
    for _ in range(5):
        out = sample(logits, md)
        assert out[0] == 7
        assert out[1] == int(torch.tensor([3, 11, 40])[logits[1, [3, 11, 40]].argmax()])
        assert out[2] == 5


def test_min_tokens_masks_stop_ids_until_reached() -> None:
    vocab = 20
    logits = torch.zeros(2, vocab)
    logits[:, 9] = 10.0  # the stop token is the clear favourite
    logits[:, 4] = 5.0
    params = SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=[9])
    md = make_metadata([params, params], vocab, outputs=[[1, 2], [1, 2, 3]])
    out = sample(logits, md)
    assert out.tolist() == [4, 9]  # 2 outputs < 3: masked; 3 outputs: free to stop
    eos_params = SamplingParams(temperature=0.0, min_tokens=2)
    eos_params.update_from_generation_config({9})
    md = make_metadata([eos_params], vocab, outputs=[[1]])
    assert sample(logits[:1], md).tolist() == [4]


def test_seeded_rows_independent_of_batch() -> None:
    vocab = 5000
    torch.manual_seed(5)
    row = torch.randn(vocab)
    seeded = [
        SamplingParams(temperature=1.0, seed=42),
        SamplingParams(temperature=0.7, top_k=50, seed=42),
        SamplingParams(temperature=0.9, top_p=0.9, seed=42),
        SamplingParams(temperature=1.0, min_p=0.05, seed=7),
    ]
    for params in seeded:
        # Batch A: the seeded row first, with two unseeded rows; batch B: other rows and
        # a different position. The generator persists across steps (one draw each).
        gen_a = torch.Generator(DEVICE).manual_seed(params.seed)
        gen_b = torch.Generator(DEVICE).manual_seed(params.seed)
        tokens_a, tokens_b = [], []
        for step in range(8):
            others = torch.randn(3, vocab)
            batch_a = torch.stack([row, others[0], others[1]])
            md_a = make_metadata(
                [params, SamplingParams(temperature=1.0), SamplingParams(temperature=0.0)],
                vocab, seed=step, generators={0: gen_a},
            )
            tokens_a.append(int(sample(batch_a, md_a)[0]))
            batch_b = torch.stack([others[2], others[1], row])
            md_b = make_metadata(
                [SamplingParams(temperature=0.5, top_k=3), SamplingParams(temperature=1.0, seed=1),
                 params],
                vocab, seed=1000 + step, generators={2: gen_b},
            )
            tokens_b.append(int(sample(batch_b, md_b)[2]))
        assert tokens_a == tokens_b
        assert len(set(tokens_a)) > 1  # it does sample


def test_unseeded_rows_vary_across_steps() -> None:
    vocab = 1000
    logits = torch.zeros(1, vocab)
    md = make_metadata([SamplingParams(temperature=1.0)], vocab)
    tokens = {int(sample(logits, md)[0]) for _ in range(20)}
    assert len(tokens) > 10


def test_logprobs_and_ranks_match_log_softmax() -> None:
    vocab = 3000
    torch.manual_seed(6)
    logits = torch.randn(4, vocab) * 3
    params = [
        SamplingParams(temperature=0.0, logprobs=5),
        SamplingParams(temperature=1.0, logprobs=0),
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=1.0, top_k=20, logprobs=2, repetition_penalty=1.5),
    ]
    md = make_metadata(params, vocab)
    out = Sampler()(logits.to(DEVICE, copy=True), md)
    assert out.logprobs is not None and out.logprob_rows is not None
    assert out.logprob_rows.tolist() == [0, 1, 3]
    reference = torch.log_softmax(logits, dim=-1)
    entries = out.logprobs.to_lists(md.num_logprobs_np[out.logprob_rows])
    for entry, row in zip(entries, out.logprob_rows.tolist(), strict=True):
        token, logprob, rank = entry[0]
        assert token == int(out.sampled_token_ids[row])
        assert logprob == pytest.approx(float(reference[row, token]), abs=1e-5)
        assert rank == 1 + int((reference[row] > reference[row, token]).sum())
        num = params[row].logprobs
        assert len(entry) == 1 + num
        top = torch.topk(reference[row], num) if num else None
        for j, (top_token, top_logprob, top_rank) in enumerate(entry[1:]):
            assert top is not None
            assert top_token == int(top.indices[j])
            assert top_logprob == pytest.approx(float(top.values[j]), abs=1e-5)
            assert top_rank == j + 1
    # Greedy with raw logprobs: the chosen token is the argmax, rank 1.
    assert entries[0][0][2] == 1


def test_compute_logprobs_large_vocab() -> None:
    torch.manual_seed(7)
    logits = torch.randn(3, 262144)
    tokens = torch.tensor([5, 100000, 262143])
    tensors = compute_logprobs(logits.to(DEVICE), tokens, 4)
    reference = torch.log_softmax(logits, dim=-1)
    torch.testing.assert_close(
        tensors.token_logprobs, reference.gather(1, tokens[:, None]).squeeze(1), atol=1e-5, rtol=0
    )
    expected_ranks = 1 + (logits > logits.gather(1, tokens[:, None])).sum(-1)
    assert torch.equal(tensors.token_ranks, expected_ranks)
    torch.testing.assert_close(tensors.topk_logprobs, torch.topk(reference, 4).values, atol=1e-5,
                               rtol=0)


@pytest.mark.parametrize("k", [1, 7, 64, 1000, 20000])
def test_topk_rows_matches_torch_topk(k: int) -> None:
    torch.manual_seed(k)
    x = torch.randn(5, 262147).to(DEVICE)  # not a multiple of the chunk length
    values, indices = topk_rows(x, k)
    expected = torch.topk(x, k)
    assert torch.equal(values, expected.values)
    assert torch.equal(x.gather(1, indices), values)
    x[:, -1] = 100.0  # the tail chunk must be searched too
    values, indices = topk_rows(x, k)
    assert int(indices[0, 0]) == 262146


@pytest.mark.parametrize("temperatures", [(0.0, 0.0), (0.0, 1.0), (1.0, 0.7)])
def test_logprobs_are_raw_whatever_the_path(temperatures: tuple[float, float]) -> None:
    vocab = 2000
    torch.manual_seed(8)
    logits = torch.randn(2, vocab) * 2
    params = [SamplingParams(temperature=t, logprobs=1) for t in temperatures]
    md = make_metadata(params, vocab)
    out = Sampler()(logits.to(DEVICE, copy=True), md)
    assert out.logprobs is not None
    reference = torch.log_softmax(logits, dim=-1)
    for row in range(2):
        token = int(out.sampled_token_ids[row])
        assert float(out.logprobs.token_logprobs[row]) == pytest.approx(
            float(reference[row, token]), abs=1e-5
        )
        assert int(out.logprobs.topk_ids[row, 0]) == int(reference[row].argmax())
