"""The model runner end to end on tiny random-weight models against transformers (fp32)."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest
import torch

from pagedserve.attention.backend import get_attn_backend
from pagedserve.config import CacheConfig, EngineConfig, KVCacheConfig, ModelConfig, SchedulerConfig
from pagedserve.core.request import Request
from pagedserve.core.sched_output import (
    CachedRequestData,
    ModelRunnerOutput,
    NewRequestData,
    SchedulerOutput,
)
from pagedserve.sampling_params import SamplingParams
from pagedserve.transformers_utils.resolve import resolve_model
from pagedserve.worker.kv_cache import kv_cache_bytes_per_block
from pagedserve.worker.model_runner import ModelRunner

BLOCK_SIZE = 4
NUM_BLOCKS = 96


def make_engine_config(
    folder: str, max_num_batched_tokens: int = 256, kv_cache_memory_bytes: int | None = None
) -> EngineConfig:
    resolved = resolve_model(folder)
    model_config = ModelConfig(
        model=folder,
        model_path=resolved.model_path,
        tokenizer_path=resolved.tokenizer_path,
        hf_config=resolved.hf_config,
        architecture=resolved.architecture,
        dtype=torch.float32,
        dtype_reason="test",
        max_model_len=128,
        eos_token_ids=resolved.eos_token_ids,
    )
    return EngineConfig(
        model_config=model_config,
        cache_config=CacheConfig(
            block_size=BLOCK_SIZE, kv_cache_memory_bytes=kv_cache_memory_bytes
        ),
        scheduler_config=SchedulerConfig(
            max_num_seqs=8, max_num_batched_tokens=max_num_batched_tokens, max_model_len=128
        ),
    )


class MiniScheduler:
    """Just enough scheduling to drive the runner by hand: shuffled block ids, exact
    chunks, and the plain-data SchedulerOutput the real scheduler sends (full block
    list for a request (re)entering the batch, only the new block ids afterwards)."""

    def __init__(self, runner: ModelRunner, seed: int = 0) -> None:
        self.runner = runner
        self.free_blocks = list(range(1, NUM_BLOCKS))
        random.Random(seed).shuffle(self.free_blocks)
        self.blocks: dict[str, list[int]] = {}
        self.in_batch: set[str] = set()
        self.finished: set[str] = set()
        self.preempted: set[str] = set()

    def step(self, plan: list[tuple[Request, int]]) -> ModelRunnerOutput:
        new_reqs: list[NewRequestData] = []
        cached = CachedRequestData()
        for request, num_new in plan:
            rid = request.request_id
            blocks = self.blocks.setdefault(rid, [])
            num_old_blocks = len(blocks)
            needed = -(-(request.num_computed_tokens + num_new) // BLOCK_SIZE)
            while len(blocks) < needed:
                blocks.append(self.free_blocks.pop())
            if rid in self.in_batch:
                cached.append(rid, blocks[num_old_blocks:], request.num_computed_tokens)
            else:
                self.in_batch.add(rid)
                new_reqs.append(
                    NewRequestData(
                        req_id=rid,
                        prompt_token_ids=request.prompt_token_ids,
                        sampling_params=request.sampling_params,
                        block_ids=list(blocks),
                        num_computed_tokens=request.num_computed_tokens,
                        output_token_ids=list(request.output_token_ids),
                    )
                )
        # Batch order is cached then new, as the scheduler's; plans list them that way.
        order = cached.req_ids + [r.req_id for r in new_reqs]
        assert order == [request.request_id for request, _ in plan], order
        so = SchedulerOutput(
            scheduled_new_reqs=new_reqs,
            scheduled_cached_reqs=cached,
            num_scheduled_tokens={request.request_id: n for request, n in plan},
            total_num_scheduled_tokens=sum(n for _, n in plan),
            finished_req_ids=self.finished,
            preempted_req_ids=self.preempted,
        )
        self.finished, self.preempted = set(), set()
        output = self.runner.execute_model(so)
        for request, num_new in plan:
            request.num_computed_tokens += num_new
            token = output.sampled_token_ids.get(request.request_id)
            if token is not None:
                request.append_output_token_ids(token)
        return output

    def free(self, request: Request, preempt: bool = False) -> None:
        self.free_blocks.extend(reversed(self.blocks.pop(request.request_id)))
        self.in_batch.discard(request.request_id)
        if preempt:
            self.preempted.add(request.request_id)
            request.num_computed_tokens = 0
        else:
            self.finished.add(request.request_id)


def hf_greedy(hf_model: torch.nn.Module, prompt: list[int], num_tokens: int) -> list[int]:
    ids = list(prompt)
    with torch.inference_mode():
        for _ in range(num_tokens):
            logits = hf_model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1]
            ids.append(int(logits.argmax()))
    return ids[len(prompt):]


def load_hf(folder: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def runner_factory(tiny_model_dir: Callable[[str], str]) -> Callable[..., tuple[ModelRunner, str]]:
    def make(arch: str, **kwargs: int) -> tuple[ModelRunner, str]:
        folder = tiny_model_dir(arch)
        runner = ModelRunner(make_engine_config(folder, **kwargs))
        runner.load_model()
        bytes_per_block = runner.get_kv_cache_bytes_per_block()
        runner.initialize_kv_cache(
            KVCacheConfig(NUM_BLOCKS, BLOCK_SIZE, bytes_per_block, NUM_BLOCKS * bytes_per_block)
        )
        return runner, folder

    return make


PROMPTS = [
    [1, 17, 42, 99, 5, 250, 7, 8, 300, 11, 12],
    [1, 200, 3],
    [1, 64, 65, 66, 67, 68, 69, 70, 71, 72, 73, 74, 75, 76, 77, 78, 79, 80],
    [1, 9],
]
NUM_NEW = 10


@pytest.mark.parametrize("arch", ["llama", "gemma3", "qwen3"])
def test_greedy_matches_transformers(arch: str, runner_factory) -> None:
    runner, folder = runner_factory(arch)
    hf_model = load_hf(folder)
    expected = [hf_greedy(hf_model, prompt, NUM_NEW) for prompt in PROMPTS]

    scheduler = MiniScheduler(runner)
    greedy = SamplingParams(temperature=0.0, max_tokens=NUM_NEW)
    requests = [Request(f"r{i}", prompt, greedy) for i, prompt in enumerate(PROMPTS)]
    # Step 1: request 0 whole, request 2 as a partial chunk (no token), request 1 whole.
    out = scheduler.step([(requests[0], 11), (requests[2], 7), (requests[1], 3)])
    assert set(out.sampled_token_ids) == {"r0", "r1"}
    # Step 2: decodes, the rest of request 2, and request 3 joins.
    out = scheduler.step([(requests[0], 1), (requests[1], 1), (requests[2], 11), (requests[3], 2)])
    assert set(out.sampled_token_ids) == {"r0", "r1", "r2", "r3"}
    while any(r.num_output_tokens < NUM_NEW for r in requests):
        plan = [(r, 1) for r in requests if r.num_output_tokens < NUM_NEW]
        scheduler.step(plan)
        for r, _ in plan:
            if r.num_output_tokens == NUM_NEW:
                scheduler.free(r)
    for request, tokens in zip(requests, expected, strict=True):
        assert request.output_token_ids == tokens, request.request_id
    scheduler.step([])
    assert runner.input_batch.num_reqs == 0 and not runner.input_batch.request_states


def test_preemption_and_row_reuse_keep_tokens(runner_factory) -> None:
    runner, folder = runner_factory("llama")
    hf_model = load_hf(folder)
    scheduler = MiniScheduler(runner, seed=1)
    greedy = SamplingParams(temperature=0.0)
    a = Request("a", PROMPTS[0], greedy)
    b = Request("b", PROMPTS[1], greedy)
    scheduler.step([(a, 11), (b, 3)])
    for _ in range(3):
        scheduler.step([(a, 1), (b, 1)])
    # Preempt a (recompute): it comes back later with prompt + outputs as its prefill.
    scheduler.free(a, preempt=True)
    scheduler.step([(b, 1)])
    c = Request("c", PROMPTS[3], greedy)
    scheduler.step([(b, 1), (c, 2), (a, a.num_tokens)])
    for _ in range(4):
        scheduler.step([(a, 1), (b, 1), (c, 1)])
    assert a.output_token_ids == hf_greedy(hf_model, PROMPTS[0], a.num_output_tokens)
    assert b.output_token_ids == hf_greedy(hf_model, PROMPTS[1], b.num_output_tokens)
    assert c.output_token_ids == hf_greedy(hf_model, PROMPTS[3], c.num_output_tokens)


def test_logprobs_and_prompt_logprobs_match_transformers(runner_factory) -> None:
    runner, folder = runner_factory("qwen3")
    hf_model = load_hf(folder)
    prompt = PROMPTS[2]
    params = SamplingParams(temperature=0.0, logprobs=3, prompt_logprobs=2)
    request = Request("p", prompt, params)
    scheduler = MiniScheduler(runner)
    prompt_entries: list = []
    sample_entries: list = []
    for chunk in (5, 6, 7, 1, 1):
        out = scheduler.step([(request, chunk)])
        prompt_entries.extend(out.prompt_logprobs.get("p", []))
        if "p" in out.logprobs:
            sample_entries.append(out.logprobs["p"])
    assert len(prompt_entries) == len(prompt) - 1
    assert len(sample_entries) == 3
    all_ids = request.all_token_ids
    with torch.inference_mode():
        logits = hf_model(input_ids=torch.tensor([all_ids]), use_cache=False).logits[0]
    reference = torch.log_softmax(logits.float(), dim=-1)
    for position, entry in enumerate(prompt_entries):
        target = prompt[position + 1]
        token, logprob, rank = entry[0]
        assert token == target
        assert logprob == pytest.approx(float(reference[position, target]), abs=1e-4)
        assert rank == 1 + int((reference[position] > reference[position, target]).sum())
        top = torch.topk(reference[position], 2)
        assert [e[0] for e in entry[1:]] == top.indices.tolist()
        assert [e[2] for e in entry[1:]] == [1, 2]
    for step, entry in enumerate(sample_entries):
        position = len(prompt) - 1 + step
        token, logprob, rank = entry[0]
        assert token == request.output_token_ids[step]
        assert rank == 1  # greedy: the raw argmax
        assert logprob == pytest.approx(float(reference[position, token]), abs=1e-4)
        assert len(entry) == 4


def test_seeded_sampling_is_reproducible_through_runner(runner_factory) -> None:
    runner, _ = runner_factory("llama")
    tokens = []
    for others, seed in ((0, 1234), (2, 1234), (1, 99)):
        scheduler = MiniScheduler(runner, seed=others)
        params = SamplingParams(temperature=3.0, seed=seed)
        seeded = Request(f"s{others}", PROMPTS[0], params)
        extra = [
            Request(f"x{others}-{i}", PROMPTS[1 + i], SamplingParams(temperature=1.0))
            for i in range(others)
        ]
        scheduler.step([(seeded, 11)] + [(r, r.num_tokens) for r in extra])
        for _ in range(8):
            scheduler.step([(seeded, 1)] + [(r, 1) for r in extra])
        tokens.append(seeded.output_token_ids)
        scheduler.free(seeded)
        for r in extra:
            scheduler.free(r)
        scheduler.step([])
    assert tokens[0] == tokens[1]  # same seed, different batch
    assert tokens[0] != tokens[2]  # another seed samples something else


def test_kv_cache_sizes(runner_factory) -> None:
    runner, _ = runner_factory("gemma3")
    config = runner.model_config
    assert len(runner.kv_caches) == config.num_layers
    # The cache has the shape the attention backend declares.
    assert runner.kv_caches[0].shape == get_attn_backend().get_kv_cache_shape(
        NUM_BLOCKS, BLOCK_SIZE, config.num_kv_heads, config.head_dim
    )
    assert runner.kv_caches[0].shape == (2, NUM_BLOCKS, BLOCK_SIZE, config.num_kv_heads,
                                         config.head_dim)
    per_block = runner.get_kv_cache_bytes_per_block()
    total = sum(c.numel() * c.element_size() for c in runner.kv_caches)
    assert total == per_block * NUM_BLOCKS
    backend = get_attn_backend()
    assert kv_cache_bytes_per_block(backend, config, 16, torch.bfloat16) == (
        2 * config.num_layers * 16 * config.num_kv_heads * config.head_dim * 2
    )


def test_kv_cache_sized_after_loading(tiny_model_dir: Callable[[str], str]) -> None:
    """The runner turns the user's budget into whole blocks of its backend's layout, and
    refuses a budget under 2 blocks with a ValueError that says what to do."""
    folder = tiny_model_dir("llama")
    runner = ModelRunner(make_engine_config(folder, kv_cache_memory_bytes=1 << 20))
    runner.load_model()
    per_block = runner.get_kv_cache_bytes_per_block()
    kv_cache_config = runner.determine_kv_cache_config()
    assert kv_cache_config.bytes_per_block == per_block
    assert kv_cache_config.num_blocks == (1 << 20) // per_block
    assert kv_cache_config.kv_cache_memory_bytes == kv_cache_config.num_blocks * per_block
    assert kv_cache_config.block_size == BLOCK_SIZE

    tiny = ModelRunner(make_engine_config(folder, kv_cache_memory_bytes=per_block + 1))
    tiny.model = runner.model
    with pytest.raises(ValueError, match="raise kv_cache_memory"):
        tiny.determine_kv_cache_config()
