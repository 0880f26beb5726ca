"""Structured outputs through the real server with the official `openai` client."""

from __future__ import annotations

import json
import re

import openai
import pytest
from pydantic import BaseModel, Field


class City(BaseModel):
    name: str = Field(max_length=20)
    country: str = Field(max_length=20)
    population_millions: int = Field(ge=0, le=100)


def test_parse_returns_a_pydantic_object(client) -> None:
    completion = client.chat.completions.parse(
        model="gemma-3-270m",
        messages=[{"role": "user", "content": "Give me a city as JSON."}],
        response_format=City, max_tokens=120, temperature=0,
    )
    message = completion.choices[0].message
    assert isinstance(message.parsed, City), message.content
    assert City.model_validate_json(message.content) == message.parsed


def test_json_object_streamed_deltas_reassemble_to_json(client) -> None:
    stream = client.chat.completions.create(
        model="gemma-3-270m", messages=[{"role": "user", "content": "A JSON object, please."}],
        response_format={"type": "json_object"}, max_tokens=120, temperature=0.7, seed=3,
        stream=True,
    )
    parts, finish = [], None
    for chunk in stream:
        if chunk.choices:
            parts.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
    text = "".join(parts)
    if finish == "stop":
        assert isinstance(json.loads(text), dict)
    else:  # cut by max_tokens: still the start of an object
        assert finish == "length" and text.startswith("{")


def test_vllm_fields_on_completions(client) -> None:
    response = client.completions.create(
        model="gemma-3-270m", prompt="Is water wet? Answer:", max_tokens=8, temperature=0,
        extra_body={"structured_outputs": {"choice": ["yes", "no"]}},
    )
    assert response.choices[0].text in ("yes", "no")
    response = client.completions.create(
        model="gemma-3-270m", prompt="A date:", max_tokens=16, temperature=0, n=2, seed=1,
        extra_body={"guided_regex": r"20[0-9]{2}-[01][0-9]-[0-3][0-9]"},
    )
    for choice in response.choices:
        assert re.fullmatch(r"20[0-9]{2}-[01][0-9]-[0-3][0-9]", choice.text), choice.text


@pytest.mark.parametrize(("body", "param"), [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}},
     "response_format"),
    ({"extra_body": {"guided_regex": "(unclosed"}}, "guided_regex"),
    ({"extra_body": {"structured_outputs": {"grammar": "start: missing_rule"}}}, "structured_outputs"),
])
def test_invalid_constraints_are_400_naming_the_parameter(client, body: dict, param: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model="gemma-3-270m", messages=[{"role": "user", "content": "hi"}], max_tokens=4, **body
        )
    error = info.value.body
    assert error["param"] == param and error["type"] == "BadRequestError"
    # The server keeps serving.
    ok = client.completions.create(model="gemma-3-270m", prompt="Hi", max_tokens=2)
    assert ok.choices[0].text is not None
