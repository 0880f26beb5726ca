"""Structured outputs through the engine on the real default model (Gemma 3 270M, a base
model that writes free text when unconstrained): every constrained output parses and
validates; unconstrained requests in the same batch are untouched."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from pagedserve import LLM, SamplingParams, StructuredOutputsParams

pytestmark = pytest.mark.slow

PERSON_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 16},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["engineer", "artist", "farmer"]},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 16}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
        "skills": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3},
    },
    "required": ["name", "age", "role", "address"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(max_model_len=1024, max_num_seqs=32, kv_cache_memory="256MiB")


def _texts(llm: LLM, prompts: list[str], params: list[SamplingParams]) -> list:
    return [o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False)]


def test_fifty_json_schema_outputs_all_validate(llm: LLM) -> None:
    constraint = StructuredOutputsParams(json=PERSON_SCHEMA)
    params = [SamplingParams(temperature=0.8, seed=i, max_tokens=160, structured_outputs=constraint)
              for i in range(50)]
    outputs = _texts(llm, ["Here is a person described as JSON:\n"] * 50, params)
    for output in outputs:
        assert output.finish_reason == "stop", output.text
        jsonschema.validate(json.loads(output.text), PERSON_SCHEMA)
    assert len({o.text for o in outputs}) > 10  # sampled with different seeds: not one answer


def test_json_object_regex_choice_and_grammar(llm: LLM) -> None:
    kinds = [
        (StructuredOutputsParams(json_object=True), lambda t: isinstance(json.loads(t), dict)),
        (StructuredOutputsParams(regex=r"\(\d{3}\) \d{3}-\d{4}"),
         lambda t: re.fullmatch(r"\(\d{3}\) \d{3}-\d{4}", t) is not None),
        (StructuredOutputsParams(choice=["positive", "negative", "neutral"]),
         lambda t: t in ("positive", "negative", "neutral")),
        (StructuredOutputsParams(grammar='root ::= expr\nexpr ::= term ("+" term)*\nterm ::= [0-9]+'),
         lambda t: re.fullmatch(r"[0-9]+(\+[0-9]+)*", t) is not None),
    ]
    prompts, params, checks = [], [], []
    for constraint, check in kinds:
        for i in range(8):
            prompts.append(f"Example {i}:")
            params.append(SamplingParams(temperature=0.9, seed=i, max_tokens=64, structured_outputs=constraint))
            checks.append(check)
    for output, check in zip(_texts(llm, prompts, params), checks, strict=True):
        if output.finish_reason == "length":  # an unbounded grammar may run to max_tokens
            continue
        assert check(output.text), output.text


def test_unconstrained_requests_are_untouched_in_a_mixed_batch(llm: LLM) -> None:
    plain = ["The capital of France is", "def fibonacci(n):", "Once upon a time"]
    greedy = SamplingParams(temperature=0.0, max_tokens=24)
    alone = [o.token_ids for o in _texts(llm, plain, [greedy] * 3)]
    constrained = SamplingParams(temperature=0.0, max_tokens=24,
                                 structured_outputs=StructuredOutputsParams(regex="[a-z ]+"))
    mixed = _texts(llm, plain + plain, [greedy] * 3 + [constrained] * 3)
    assert [o.token_ids for o in mixed[:3]] == alone
    assert all(re.fullmatch("[a-z ]+", o.text) for o in mixed[3:])


def test_max_tokens_cut_leaves_a_valid_prefix(llm: LLM) -> None:
    import llguidance

    params = SamplingParams(temperature=0.0, max_tokens=5,
                            structured_outputs=StructuredOutputsParams(json=PERSON_SCHEMA))
    output = _texts(llm, ["Person:"], [params])[0]
    assert output.finish_reason == "length" and len(output.token_ids) == 5
    assert output.text.startswith("{")
    # The same tokens, replayed through a fresh matcher, never leave the grammar.
    manager = llm.llm_engine.engine_core.engine_core.structured_output_manager
    replay = manager.make_request(StructuredOutputsParams(json=PERSON_SCHEMA))
    assert all(replay.accept_token(t) for t in output.token_ids)
    assert isinstance(replay.matcher, llguidance.LLMatcher)


def test_an_invalid_constraint_is_a_value_error_and_others_still_run(llm: LLM) -> None:
    with pytest.raises(ValueError, match="regex"):
        llm.generate(["x"], SamplingParams(structured_outputs=StructuredOutputsParams(regex="[a-")),
                     use_tqdm=False)
    ok = _texts(llm, ["Answer:"], [SamplingParams(max_tokens=8, structured_outputs=StructuredOutputsParams(choice=["A", "B"]))])
    assert ok[0].text in ("A", "B")


def test_bitmask_filled_beside_the_forward_gives_the_same_tokens(llm: LLM, monkeypatch) -> None:
    manager = llm.llm_engine.engine_core.engine_core.structured_output_manager
    params = SamplingParams(temperature=0.0, max_tokens=40,
                            structured_outputs=StructuredOutputsParams(json=PERSON_SCHEMA))
    prompts = ["Person:", "Another person:"]
    results = []
    for overlap in (False, True):
        monkeypatch.setattr(manager, "overlap_with_forward", overlap)
        results.append([o.token_ids for o in _texts(llm, prompts, [params] * 2)])
    assert results[0] == results[1]


def test_the_engine_core_rejects_a_bad_grammar_alone(llm: LLM) -> None:
    """Past the API's check (or without it), the core's own compile refuses the request
    with a ValueError (the multiprocess loop reports it as that request's error) and
    serves the next one."""
    from pagedserve.engine.messages import EngineCoreRequest

    core = llm.llm_engine.engine_core.engine_core
    params = SamplingParams(max_tokens=4)
    params.structured_outputs = StructuredOutputsParams(regex="[a-")  # skips SamplingParams checks
    request = EngineCoreRequest("bad-grammar", [2, 651], params, 0.0)
    with pytest.raises(ValueError, match="unclosed"):
        core.add_request(request)
    assert core.scheduler.get_request("bad-grammar") is None
    ok = _texts(llm, ["Answer:"], [SamplingParams(max_tokens=8, structured_outputs=StructuredOutputsParams(choice=["A", "B"]))])
    assert ok[0].text in ("A", "B")
