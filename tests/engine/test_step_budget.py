"""The step-time budget in the engine core, on a tiny random model: the warm-up leaves no
trace, the stats and the banner report the budget, and chunking by the budget does not
change greedy tokens."""

from __future__ import annotations

from pagedserve import LLM, SamplingParams
from pagedserve.entrypoints.engine_flags import describe_engine

PROMPTS = ["hello world", "def fibonacci(n):", "the quick brown fox jumps over the lazy dog " * 4]
GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
ENGINE_KWARGS = {"dtype": "float32", "block_size": 4, "kv_cache_memory": "4MiB"}


def _core(llm: LLM):  # noqa: ANN202
    return llm.llm_engine.engine_core.engine_core


def test_auto_budget_warm_up_leaves_no_trace(tiny_model_dir) -> None:
    llm = LLM(model=tiny_model_dir("llama"), **ENGINE_KWARGS)
    core = _core(llm)
    budget = core.scheduler.step_budget
    assert budget is not None and budget.is_auto and budget.base_target_s > 0
    assert budget.cost_model.num_observations >= 3
    stats = llm.llm_engine.get_stats()
    assert (stats.num_running_reqs, stats.num_waiting_reqs, stats.prefix_cache_queries) == (0, 0, 0)
    assert stats.kv_cache_usage == 0.0 and stats.step_budget_ms > 0
    assert core.model_runner.input_batch.num_reqs == 0
    assert core.scheduler.kv_cache_manager.block_pool.get_num_free_blocks() == (
        core.kv_cache_config.num_usable_blocks
    )
    assert "auto:" in core.describe_step_budget()
    banner = describe_engine(llm.llm_engine.engine_config, core.kv_cache_config)
    assert "step budget: auto" in banner


def test_budget_chunking_keeps_greedy_tokens(tiny_model_dir) -> None:
    folder = tiny_model_dir("llama")
    off = LLM(model=folder, max_step_latency_ms=0, **ENGINE_KWARGS)
    assert _core(off).scheduler.step_budget is None and off.llm_engine.get_stats().step_budget_ms == 0
    expected = [o.outputs[0].token_ids for o in off.generate(PROMPTS, GREEDY, use_tqdm=False)]
    # 1e-3 ms: every step that carries a decode gets only the minimum chunk (one block).
    tight = LLM(model=folder, max_step_latency_ms=1e-3, **ENGINE_KWARGS)
    engine = tight.llm_engine
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(str(i), prompt, GREEDY)
    outputs: dict[str, list[int]] = {}
    prefill_budgets = set()
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                outputs[output.request_id] = output.outputs[0].token_ids
        prefill_budgets.add(engine.get_stats().prefill_token_budget)
    assert [outputs[str(i)] for i in range(len(PROMPTS))] == expected
    assert 4 in prefill_budgets  # the minimum chunk was used
    assert "step budget: 0.001 ms" in describe_engine(engine.engine_config, engine.kv_cache_config)
