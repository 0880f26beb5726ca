"""Forced tool calls (tool_choice "required" or a named function) with the official client."""

from __future__ import annotations

import json
import re

import jsonschema
import openai
import pytest

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 20},
                           "unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {"type": "object", "properties": {"timezone": {"type": "string", "maxLength": 12}},
                       "required": ["timezone"], "additionalProperties": False},
    },
}
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}


def _calls(message) -> list[tuple[str, dict]]:  # noqa: ANN001
    return [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls]


@pytest.mark.parametrize("tool_choice", [{"type": "function", "function": {"name": "get_weather"}}, "required"])
def test_forced_calls_parse_validate_and_stream_identically(client, tool_choice) -> None:  # noqa: ANN001
    kwargs = {"model": "gemma-3-270m", "messages": MESSAGES, "tools": [WEATHER, TIME],
              "tool_choice": tool_choice, "max_tokens": 120, "temperature": 0}
    response = client.chat.completions.create(**kwargs)
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    calls = _calls(choice.message)
    assert calls and all(c.id.startswith("chatcmpl-tool-") for c in choice.message.tool_calls)
    for name, arguments in calls:
        jsonschema.validate(arguments, SCHEMAS[name])
    if isinstance(tool_choice, dict):
        assert [name for name, _ in calls] == ["get_weather"]
    streamed: dict[int, dict] = {}
    finish = None
    for chunk in client.chat.completions.create(**kwargs, stream=True):
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        finish = chunk.choices[0].finish_reason or finish
        for call in delta.tool_calls or []:
            entry = streamed.setdefault(call.index, {"name": "", "arguments": ""})
            if call.function.name:
                entry["name"] = call.function.name
            entry["arguments"] += call.function.arguments or ""
    assert finish == "tool_calls"
    assert [(e["name"], json.loads(e["arguments"])) for _, e in sorted(streamed.items())] == calls


def test_parallel_tool_calls_false_allows_one_call(client) -> None:
    response = client.chat.completions.create(
        model="gemma-3-270m", messages=MESSAGES, tools=[WEATHER, TIME], tool_choice="required",
        parallel_tool_calls=False, max_tokens=120, temperature=0.9, seed=5,
    )
    assert len(response.choices[0].message.tool_calls) == 1


@pytest.mark.parametrize(("body", "message"), [
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}, "tools": [WEATHER]}, "not in tools"),
    ({"tool_choice": "required"}, "needs tools"),
    ({"tool_choice": "sometimes", "tools": [WEATHER]}, "tool_choice must be"),
])
def test_bad_tool_choice_is_400(client, body: dict, message: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="gemma-3-270m", messages=MESSAGES, max_tokens=4, **body)
    assert info.value.body["param"] == "tool_choice" and message in info.value.body["message"]


def test_auto_needs_the_parser_flags(client) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="gemma-3-270m", messages=MESSAGES, tools=[WEATHER],
                                       tool_choice="auto", max_tokens=4)
    assert info.value.body["param"] == "tool_choice"
    assert "--enable-auto-tool-choice" in info.value.body["message"]


# A hermes-format answer, forced with a regex so this base model writes it (the parser is
# what is under test: it must find the call in the text, streamed or not).
HERMES_REGEX = (r'Checking\. <tool_call>\n\{"name": "get_weather", "arguments": '
                r'\{"city": "(Paris|Rome)", "unit": "celsius"\}\}\n</tool_call>')


@pytest.fixture(scope="module")
def hermes_client():
    from tests.entrypoints.utils import BASE_ARGS, RemoteServer

    with RemoteServer([*BASE_ARGS, "--enable-auto-tool-choice", "--tool-call-parser", "hermes"]) as server:
        yield server.openai()


def test_auto_tool_choice_parses_hermes_calls_streamed_and_not(hermes_client) -> None:
    kwargs = {"model": "gemma-3-270m", "messages": MESSAGES, "tools": [WEATHER, TIME],
              "max_tokens": 60, "temperature": 0, "extra_body": {"structured_outputs": {"regex": HERMES_REGEX}}}
    response = hermes_client.chat.completions.create(**kwargs)
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Checking. "
    calls = _calls(choice.message)
    assert [name for name, _ in calls] == ["get_weather"]
    jsonschema.validate(calls[0][1], SCHEMAS["get_weather"])
    content, streamed, finish = "", {}, None
    for chunk in hermes_client.chat.completions.create(**kwargs, stream=True):
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        content += delta.content or ""
        finish = chunk.choices[0].finish_reason or finish
        for call in delta.tool_calls or []:
            entry = streamed.setdefault(call.index, {"name": "", "arguments": ""})
            entry["name"] += call.function.name or ""
            entry["arguments"] += call.function.arguments or ""
    assert finish == "tool_calls" and content == "Checking. "
    assert [(e["name"], json.loads(e["arguments"])) for e in streamed.values()] == calls
    # Plain text stays content.
    plain = hermes_client.chat.completions.create(model="gemma-3-270m", messages=MESSAGES,
                                                  tools=[WEATHER], max_tokens=8, temperature=0)
    assert plain.choices[0].message.tool_calls in (None, []) and plain.choices[0].message.content


THINKING_REGEX = r"<think>\nThe user asks about Paris\.\n</think>\n\nIt is (sunny|rainy) in Paris\."


@pytest.fixture(scope="module")
def reasoning_client():
    from tests.entrypoints.utils import BASE_ARGS, RemoteServer

    with RemoteServer([*BASE_ARGS, "--reasoning-parser", "qwen3"]) as server:
        yield server.openai()


def test_qwen3_reasoning_is_split_streamed_and_not(reasoning_client) -> None:
    kwargs = {"model": "gemma-3-270m", "messages": MESSAGES, "max_tokens": 60, "temperature": 0,
              "extra_body": {"structured_outputs": {"regex": THINKING_REGEX}}}
    message = reasoning_client.chat.completions.create(**kwargs).choices[0].message
    assert message.reasoning_content == "\nThe user asks about Paris.\n"
    assert re.fullmatch(r"\n\nIt is (sunny|rainy) in Paris\.", message.content)
    reasoning, content = "", ""
    for chunk in reasoning_client.chat.completions.create(**kwargs, stream=True):
        if chunk.choices:
            delta = chunk.choices[0].delta
            reasoning += getattr(delta, "reasoning_content", None) or ""
            content += delta.content or ""
    assert (reasoning, content) == (message.reasoning_content, message.content)
