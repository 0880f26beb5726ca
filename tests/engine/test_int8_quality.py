"""Int8 quality on the real Gemma 3 270M: perplexity on ordinary English prose against the
unquantized float32 reference, computed here through the engine (prompt logprobs).

The kernels are pinned (every decoder linear weight-only int8, the LM head W8A8 at every
batch size) so the test measures the quantized kernels themselves on any CPU, whatever the
start-up measurement would choose for a step of this size (at a 512-token prefill it would
run the decoder in bf16). Measured on the project's AMD EPYC (AVX512-BF16): +0.9% to +1.3% in
bfloat16 and +1.2% in float32 over these 512 tokens (varies by run: the bf16 reductions' order); +1.3% and +0.75% over the whole text
(2,660 tokens; docs/design.md, "Quantization"). The target, and the bound, is 2%.
"""

from __future__ import annotations

import pytest

from pagedserve import LLM, SamplingParams
from tests.engine.conftest import PROMPTS, long_prompt
from tests.utils.quality import (
    greedy_agreement,
    perplexity,
    prose_token_ids,
    token_logprobs,
)

pytestmark = pytest.mark.slow

NUM_TOKENS = 512
# Relative perplexity increase allowed: the 2% target (measured +0.9% / +1.2%, see above).
MAX_RELATIVE_INCREASE = 0.02
PINNED_KERNELS = "linear=int8_wo;lm_head=w8a8"
# Greedy agreement with fp32 over the first 32 tokens of the 9 parity prompts (see the test).
AGREEMENT_TOKENS = 32
MIN_INT8_AGREEMENT = 0.40
MAX_AGREEMENT_GAP = 0.30


@pytest.fixture(scope="module")
def prose_ids(gemma_llm) -> list[int]:  # noqa: ANN001
    ids = prose_token_ids(gemma_llm.get_tokenizer(), NUM_TOKENS)
    assert len(ids) == NUM_TOKENS
    return ids


@pytest.fixture(scope="module")
def reference_perplexity(gemma_llm, prose_ids: list[int]) -> float:  # noqa: ANN001
    return perplexity(token_logprobs(gemma_llm, prose_ids))  # float32, quantization none


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])  # float32: bf16 activations in int8_wo
def test_int8_perplexity_stays_within_two_percent_of_fp32(
    prose_ids: list[int], reference_perplexity: float, monkeypatch, dtype: str
) -> None:
    ids, reference = prose_ids, reference_perplexity
    monkeypatch.setenv("PAGEDSERVE_INT8_KERNELS", PINNED_KERNELS)
    llm = LLM(dtype=dtype, quantization="int8", max_model_len=1024, kv_cache_memory="64MiB",
              max_num_seqs=4, max_step_latency_ms=0)
    assert PINNED_KERNELS in llm.llm_engine.quantization_info
    quantized = perplexity(token_logprobs(llm, ids))
    increase = quantized / reference - 1
    print(f"perplexity over {NUM_TOKENS} tokens: fp32 {reference:.3f}, int8 ({dtype}) "
          f"{quantized:.3f} ({increase:+.2%})")
    assert 10 < reference < 60  # ordinary English for a 270M model
    assert abs(increase) <= MAX_RELATIVE_INCREASE


@pytest.fixture(scope="module")
def reference_greedy(gemma_llm) -> list[list[int]]:  # noqa: ANN001
    params = SamplingParams(temperature=0.0, max_tokens=AGREEMENT_TOKENS, ignore_eos=True)
    outputs = gemma_llm.generate(PROMPTS + [long_prompt()], params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outputs]  # float32, quantization none


def test_int8_greedy_agreement_with_fp32(reference_greedy: list[list[int]], monkeypatch) -> None:
    """Greedy tokens of int8 (kernels pinned, bf16 activations) against the fp32 reference
    on the 9 parity prompts, next to what plain bf16 rounding alone gives: int8 may diverge
    earlier than bf16 (it rounds the weights as well), but not by more than the margin."""
    params = SamplingParams(temperature=0.0, max_tokens=AGREEMENT_TOKENS, ignore_eos=True)
    prompts = PROMPTS + [long_prompt()]
    results = {}
    for name, kwargs in (("bf16", {"quantization": "none"}), ("int8", {"quantization": "int8"})):
        if name == "int8":
            monkeypatch.setenv("PAGEDSERVE_INT8_KERNELS", PINNED_KERNELS)
        llm = LLM(dtype="bfloat16", max_model_len=2048, kv_cache_memory="64MiB", max_num_seqs=16,
                  **kwargs)
        tokens = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        results[name] = greedy_agreement(reference_greedy, tokens)
        print(f"greedy agreement with fp32 over {AGREEMENT_TOKENS} tokens, {name}: {results[name]}")
        del llm
    # Measured on the AVX512-BF16 EPYC: bf16 66-76% of tokens identical; int8 (pinned) 45-57%.
    assert results["int8"].identical_share >= MIN_INT8_AGREEMENT
    assert results["int8"].identical_share >= results["bf16"].identical_share - MAX_AGREEMENT_GAP
