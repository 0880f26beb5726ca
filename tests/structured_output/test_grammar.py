"""Structured-output parameters and grammars (no model): validation and error messages."""

from __future__ import annotations

import pytest

from pagedserve import SamplingParams, StructuredOutputsParams
from pagedserve.engine.input_processor import InvalidRequestError, check_structured_outputs
from pagedserve.entrypoints.openai.protocol import ChatCompletionRequest, CompletionRequest
from pagedserve.structured_output.grammar import GrammarError, grammar_of


@pytest.mark.parametrize("fields", [
    {}, {"regex": "a+", "choice": ["a"]}, {"choice": []}, {"choice": ["", "b"]}, {"json": "{oops"},
    {"json": 3}, {"grammar": "  "},
])
def test_params_take_exactly_one_valid_constraint(fields: dict) -> None:
    with pytest.raises(ValueError, match="structured_outputs"):
        StructuredOutputsParams(**fields)


def test_params_normalise_and_travel_in_sampling_params() -> None:
    params = StructuredOutputsParams(json='{"type": "object"}')
    assert params.json == {"type": "object"} and params.kind == "json"
    sampling = SamplingParams(structured_outputs={"choice": ["yes", "no"]})
    assert isinstance(sampling.structured_outputs, StructuredOutputsParams)
    assert sampling.structured_outputs.kind == "choice"
    assert sampling.clone().structured_outputs == sampling.structured_outputs


@pytest.mark.parametrize(("fields", "message"), [
    ({"regex": "[a-"}, "unclosed character class"),
    ({"json": {"type": "objectx"}}, "objectx"),
    ({"grammar": "start: undefined_rule"}, "undefined_rule"),
    ({"grammar": "root ::= (("}, "."),
])
def test_invalid_constraints_are_grammar_errors(fields: dict, message: str) -> None:
    with pytest.raises(GrammarError, match=message):
        grammar_of(StructuredOutputsParams(**fields))
    with pytest.raises(InvalidRequestError) as info:
        check_structured_outputs(StructuredOutputsParams(**fields), "guided_regex")
    assert info.value.param == "guided_regex"


@pytest.mark.parametrize("fields", [
    {"regex": r"\d{3}-\d{4}"}, {"choice": ['say "hi"', "no"]}, {"json_object": True},
    {"json": {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}},
    {"grammar": 'start: "yes" | "no"'}, {"grammar": 'root ::= "a" root | "b"'},
])
def test_valid_constraints_compile_once(fields: dict) -> None:
    params = StructuredOutputsParams(**fields)
    assert grammar_of(params) is grammar_of(StructuredOutputsParams(**fields))  # cached by text


def test_api_fields_map_to_one_constraint_and_name_the_bad_field() -> None:
    chat = ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], response_format={
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}})
    assert chat.to_sampling_params(8).structured_outputs.json == {"type": "object"}
    assert ChatCompletionRequest(messages=[], response_format={"type": "text"}).to_sampling_params(
        8).structured_outputs is None
    completion = CompletionRequest(prompt="x", guided_choice=["a", "b"])
    assert completion.to_sampling_params(8).structured_outputs.choice == ["a", "b"]
    completion = CompletionRequest(prompt="x", structured_outputs={"regex": "a+", "backend": "guidance"})
    assert completion.to_sampling_params(8).structured_outputs.regex == "a+"
    cases = [
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format"),
        ({"response_format": {"type": "yaml"}}, "response_format"),
        ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "nope"}}}},
         "response_format"),
        ({"guided_regex": "[a-"}, "guided_regex"),
        ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs"),
        ({"guided_regex": "a", "guided_choice": ["b"]}, "guided_choice"),
    ]
    for fields, param in cases:
        with pytest.raises(InvalidRequestError) as info:
            CompletionRequest(prompt="x", **fields).to_sampling_params(8)
        assert info.value.param == param, fields
