"""Bad input raises ValueError saying what is allowed; running requests are unaffected."""

from __future__ import annotations

import json

import pytest

from pagedserve import LLM, SamplingParams
from pagedserve.sampling_params import RequestOutputKind


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_tokens": 0}, "max_tokens must be at least 1"),
        ({"top_p": 0.0}, "top_p must be in (0, 1]"),
        ({"top_p": 1.5}, "top_p must be in (0, 1]"),
        ({"temperature": -0.5}, "temperature must be >= 0"),
        ({"n": 0}, "n must be an integer >= 1"),
        ({"top_k": -3}, "top_k"),
        ({"min_p": 2.0}, "min_p"),
        ({"presence_penalty": 3.0}, "presence_penalty"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"min_tokens": 5, "max_tokens": 2}, "min_tokens"),
        ({"stop": [""]}, "stop"),
    ],
)
def test_sampling_params_validation(kwargs, message):
    with pytest.raises(ValueError) as info:
        SamplingParams(**kwargs)
    assert message in str(info.value)


def test_bad_requests_do_not_disturb_running_ones(gemma_llm):
    engine = gemma_llm.llm_engine
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    reference = gemma_llm.generate("The weather today is", params, use_tqdm=False)[0]

    running = params.clone()
    running.output_kind = RequestOutputKind.FINAL_ONLY
    engine.add_request("survivor", "The weather today is", running)
    engine.step()
    engine.step()

    max_len = engine.model_config.max_model_len
    with pytest.raises(ValueError, match="maximum context length"):
        gemma_llm.generate({"prompt_token_ids": [5] * max_len}, params, use_tqdm=False)
    with pytest.raises(ValueError, match="out of vocabulary"):
        gemma_llm.generate({"prompt_token_ids": [10**9]}, params, use_tqdm=False)
    with pytest.raises(ValueError, match="empty"):
        gemma_llm.generate({"prompt_token_ids": []}, params, use_tqdm=False)
    with pytest.raises(ValueError, match="sampling params"):
        gemma_llm.generate(["a", "b"], [params], use_tqdm=False)

    final = None
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.request_id == "survivor" and output.finished:
                final = output
    assert final is not None
    assert final.outputs[0].token_ids == reference.outputs[0].token_ids
    assert engine.get_stats().kv_cache_usage == 0.0


@pytest.mark.parametrize(
    ("architecture", "model_type"),
    [("FancyNetForCausalLM", "fancynet"), ("GPT2LMHeadModel", "gpt2")],
)
def test_unknown_architecture(tmp_path, architecture, model_type):
    (tmp_path / "config.json").write_text(
        json.dumps({"architectures": [architecture], "model_type": model_type,
                    "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 1,
                    "n_embd": 8, "n_layer": 1, "n_head": 1, "vocab_size": 16})
    )
    with pytest.raises(ValueError) as info:
        LLM(model=str(tmp_path))
    text = str(info.value)
    assert architecture in text
    for arch in ("LlamaForCausalLM", "Qwen3ForCausalLM", "Gemma3ForCausalLM"):
        assert arch in text


def test_missing_model_path(tmp_path):
    with pytest.raises(ValueError):
        LLM(model=str(tmp_path / "does-not-exist"))
    with pytest.raises(ValueError):
        LLM(model=str(tmp_path / "missing.gguf"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError):
        LLM(model=str(tmp_path / "empty"))


def test_bad_engine_args():
    with pytest.raises(ValueError, match="scheduling_policy"):
        LLM(scheduling_policy="random", kv_cache_memory="64MiB")
    with pytest.raises(ValueError, match="dtype"):
        LLM(dtype="int3", kv_cache_memory="64MiB")
    with pytest.raises(ValueError, match="memory size"):
        LLM(kv_cache_memory="lots")
