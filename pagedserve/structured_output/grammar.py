"""llguidance grammars from structured-output parameters, validated without a tokenizer."""

from __future__ import annotations

import json
from functools import lru_cache

from pagedserve.sampling_params import StructuredOutputsParams


class GrammarError(ValueError):
    """The constraint is not a valid JSON schema, regex or grammar (what llguidance said)."""


# JSON as json.dumps writes it: no free whitespace. llguidance's default lets the model put
# any whitespace between tokens, and a small model then fills max_tokens with newlines and
# indentation instead of finishing the object (measured on Gemma 3 270M).
_JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@lru_cache(maxsize=256)
def _compile_text(kind: str, spec: str) -> str:
    import llguidance
    from llguidance.gbnf_to_lark import any_to_lark

    matcher = llguidance.LLMatcher
    try:
        if kind == "json":
            grammar = matcher.grammar_from_json_schema(spec, defaults=_JSON_LAYOUT)
        elif kind == "json_object":
            grammar = matcher.grammar_from_json_schema({"type": "object"}, defaults=_JSON_LAYOUT)
        elif kind == "regex":
            grammar = matcher.grammar_from_regex(spec)
        elif kind == "choice":
            choices = json.loads(spec)
            grammar = matcher.grammar_from_lark(
                "start: " + " | ".join(json.dumps(choice) for choice in choices)
            )
        else:
            grammar = matcher.grammar_from_lark(any_to_lark(spec))
    except Exception as exc:  # llguidance and the GBNF converter raise various types
        raise GrammarError(str(exc).strip()) from None
    error = matcher.validate_grammar(grammar)
    if error:
        raise GrammarError(error.strip())
    return grammar


def grammar_of(params: StructuredOutputsParams) -> str:
    """The llguidance grammar (its JSON text) of ``params``; :class:`GrammarError` when the
    schema, regex or grammar is invalid. Cached by the constraint's text."""
    kind = params.kind
    if kind == "json":
        spec = json.dumps(params.json, sort_keys=True)
    elif kind == "choice":
        spec = json.dumps(params.choice)
    elif kind == "json_object":
        spec = ""
    else:
        spec = params.regex if kind == "regex" else params.grammar  # type: ignore[assignment]
    return _compile_text(kind, spec)
