"""Forced tool calls (``tool_choice="required"`` or a named function): the answer is
constrained to JSON that parses into OpenAI's ``tool_calls``.

- A named function: the output is that function's arguments, constrained by its
  ``parameters`` schema.
- ``required``: the output is a JSON array of ``{"name", "parameters"}`` objects, one
  alternative per tool, at most as many elements as tools (one with
  ``parallel_tool_calls=false``).

``tool_choice="auto"`` needs a model-family parser (``--tool-call-parser``), which is not
there yet: with ``auto`` or ``none`` the tools are only rendered into the chat template and
the answer is free text.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

from pagedserve.engine.input_processor import InvalidRequestError


@dataclass(frozen=True)
class ForcedToolCall:
    """How to read the constrained output: one named function, or the array form."""

    function_name: str | None  # None: the "required" array form
    schema: dict[str, Any]  # the JSON schema the output is constrained by


def _functions(tools: list[dict[str, Any]] | None) -> dict[str, dict[str, Any]]:
    functions: dict[str, dict[str, Any]] = {}
    for i, tool in enumerate(tools or []):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type", "function") != "function" or not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise InvalidRequestError(
                f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ..., 'parameters': ...}}}}",
                param="tools",
            )
        parameters = function.get("parameters") or {"type": "object", "properties": {}}
        if not isinstance(parameters, dict):
            raise InvalidRequestError(f"tools[{i}].function.parameters must be a JSON schema", param="tools")
        functions[function["name"]] = parameters
    return functions


def forced_tool_call(
    tools: list[dict[str, Any]] | None, tool_choice: Any, parallel_tool_calls: bool | None
) -> ForcedToolCall | None:
    """The constraint ``tool_choice`` asks for (None for ``auto``, ``none`` or unset)."""
    if tool_choice is None or tool_choice in ("auto", "none"):
        if tool_choice is not None and not isinstance(tool_choice, str):
            raise InvalidRequestError("tool_choice is invalid", param="tool_choice")
        return None
    functions = _functions(tools)
    if not functions:
        raise InvalidRequestError(f"tool_choice={tool_choice!r} needs tools", param="tool_choice")
    if tool_choice == "required":
        alternatives = [
            {"type": "object", "properties": {"name": {"const": name}, "parameters": parameters},
             "required": ["name", "parameters"], "additionalProperties": False}
            for name, parameters in functions.items()
        ]
        # At most one call per tool (one in all without parallel calls): left unbounded, a
        # small model repeats calls until max_tokens and the array never closes.
        max_items = 1 if parallel_tool_calls is False else len(functions)
        schema: dict[str, Any] = {
            "type": "array", "minItems": 1, "maxItems": max_items, "items": {"anyOf": alternatives}
        }
        return ForcedToolCall(None, schema)
    if isinstance(tool_choice, dict) and isinstance(tool_choice.get("function"), dict):
        name = tool_choice["function"].get("name")
        if name not in functions:
            raise InvalidRequestError(
                f"tool_choice names function {name!r}, which is not in tools", param="tool_choice"
            )
        return ForcedToolCall(name, functions[name])
    raise InvalidRequestError(
        "tool_choice must be 'none', 'auto', 'required' or "
        "{'type': 'function', 'function': {'name': ...}}", param="tool_choice",
    )


def tool_calls_of(text: str, forced: ForcedToolCall) -> list[dict[str, Any]] | None:
    """OpenAI ``tool_calls`` from a finished constrained output (None if it does not
    parse, which a completed constraint rules out)."""
    try:
        value = json.loads(text)
    except ValueError:
        return None
    if forced.function_name is not None:
        calls = [(forced.function_name, value)]
    else:
        calls = [(item["name"], item["parameters"]) for item in value]
    return [
        {"id": f"chatcmpl-tool-{uuid.uuid4().hex[:24]}", "type": "function",
         "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)}}
        for name, arguments in calls
    ]
