"""Chat templates, in one place: where a model's template comes from, the built-in and
GGUF fallback templates, validating OpenAI-style messages, and rendering them into one
prompt string.

Where the template comes from (:func:`resolve_chat_template`): an explicit template (the
user's ``--chat-template`` or ``LLM.chat(chat_template=...)``: a Jinja string, a path to a
``.jinja`` file, or the name of one of the tokenizer's named templates), else the model's
own (:func:`folder_chat_template`: ``tokenizer_config.json``, ``chat_template.jinja`` or
``chat_template.json`` of the tokenizer folder; the tokenizer's ``chat_template``), else a
built-in template for the model family (:func:`builtin_chat_template`). The default Gemma 3
GGUF carries no template; GGUF conversion (``transformers_utils/resolve.py``) attaches the
official Gemma 3 one (:func:`fallback_chat_template`) to the converted tokenizer, and the
built-in Gemma template renders the same text for it.

BOS: most templates write the BOS token themselves (``{{ bos_token }}``). Tokenizing the
rendered text with ``add_special_tokens=True`` would then add a second one; use
:func:`tokenize_prompt`, which turns special tokens off when the text already starts with
the tokenizer's ``bos_token``.

Only text content is supported: a message's content is a string or a list of
``{"type": "text", "text": ...}`` parts, joined with newlines (as vLLM does).
"""

from __future__ import annotations

import copy
import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pagedserve.transformers_utils.utils import read_json

logger = logging.getLogger(__name__)

VALID_ROLES = ("system", "user", "assistant", "tool")

# Keyword arguments the renderer sets itself; chat_template_kwargs may not override them.
_RESERVED_TEMPLATE_KWARGS = frozenset(
    {
        "conversation",
        "messages",
        "tools",
        "documents",
        "chat_template",
        "add_generation_prompt",
        "continue_final_message",
        "tokenize",
        "sanitize_control_tokens",
        "padding",
        "truncation",
        "max_length",
        "return_tensors",
        "return_dict",
        "return_assistant_tokens_mask",
        "tokenizer_kwargs",
    }
)

# ----------------------------------------------------------------- built-in templates
# Gemma: no system role -- a system prompt is merged into the first user turn (followed by a
# blank line), "assistant" is called "model", user/model turns must alternate. For text
# messages this renders exactly what google/gemma-3-*-it's own template renders; unlike it,
# a "tool" message is rejected instead of rendered as a "tool" turn Gemma never saw.
_GEMMA_TEMPLATE = """\
{{- bos_token -}}
{%- if messages and messages[0]['role'] == 'system' -%}
  {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}
  {%- set loop_messages = messages[1:] -%}
{%- else -%}
  {%- set first_user_prefix = '' -%}
  {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
  {%- if message['role'] not in ('user', 'assistant')
        or (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
    {{- raise_exception('Gemma conversations must alternate user/assistant/user/... '
                        '(after an optional first system message; there is no tool role)') -}}
  {%- endif -%}
  {%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}
  {{- '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') -}}
  {{- message['content'] | trim -}}
  {{- '<end_of_turn>\\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
  {{- '<start_of_turn>model\\n' -}}
{%- endif -%}
"""

# Llama 3: header blocks; tool results use Llama 3.1's "ipython" role.
_LLAMA3_TEMPLATE = """\
{{- bos_token -}}
{%- for message in messages -%}
  {%- set role = 'ipython' if message['role'] == 'tool' else message['role'] -%}
  {{- '<|start_header_id|>' + role + '<|end_header_id|>\\n\\n' -}}
  {{- message['content'] | trim -}}
  {{- '<|eot_id|>' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
  {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}
{%- endif -%}
"""

# Qwen 2/3: ChatML; consecutive tool results go into one user turn as <tool_response> blocks.
_QWEN_TEMPLATE = """\
{%- for message in messages -%}
  {%- if message['role'] == 'tool' -%}
    {%- if loop.first or messages[loop.index0 - 1]['role'] != 'tool' -%}
      {{- '<|im_start|>user' -}}
    {%- endif -%}
    {{- '\\n<tool_response>\\n' + message['content'] + '\\n</tool_response>' -}}
    {%- if loop.last or messages[loop.index0 + 1]['role'] != 'tool' -%}
      {{- '<|im_end|>\\n' -}}
    {%- endif -%}
  {%- else -%}
    {{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}
  {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
  {{- '<|im_start|>assistant\\n' -}}
{%- endif -%}
"""

# Mistral (v0.1-style [INST]); a system prompt is prepended to the first user message.
_MISTRAL_TEMPLATE = """\
{{- bos_token -}}
{%- if messages and messages[0]['role'] == 'system' -%}
  {%- set system_prefix = messages[0]['content'] + '\\n\\n' -%}
  {%- set loop_messages = messages[1:] -%}
{%- else -%}
  {%- set system_prefix = '' -%}
  {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
  {%- if message['role'] not in ('user', 'assistant')
        or (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
    {{- raise_exception('Mistral conversations must alternate user/assistant/user/... '
                        '(after an optional first system message; there is no tool role)') -}}
  {%- endif -%}
  {%- if message['role'] == 'user' -%}
    {{- '[INST] ' + (system_prefix if loop.first else '') + message['content'] + ' [/INST]' -}}
  {%- else -%}
    {{- message['content'] + eos_token -}}
  {%- endif -%}
{%- endfor -%}
"""

# Anything else: generic ChatML.
_CHATML_TEMPLATE = """\
{%- for message in messages -%}
  {{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
  {{- '<|im_start|>assistant\\n' -}}
{%- endif -%}
"""

_BUILTIN_TEMPLATES = {
    "gemma": _GEMMA_TEMPLATE,
    "llama3": _LLAMA3_TEMPLATE,
    "qwen": _QWEN_TEMPLATE,
    "mistral": _MISTRAL_TEMPLATE,
    "chatml": _CHATML_TEMPLATE,
}


def chat_template_family(model_type: str | None) -> str:
    """Map an HF ``model_type`` (``gemma3_text``, ``qwen3``, ...) to a built-in template name."""
    name = (model_type or "").lower()
    if name in _BUILTIN_TEMPLATES:
        return name
    if name.startswith("gemma"):
        return "gemma"
    if name.startswith("llama"):
        return "llama3"
    if name.startswith("qwen"):
        return "qwen"
    if name.startswith(("mistral", "mixtral")):
        return "mistral"
    return "chatml"


def builtin_chat_template(model_type: str) -> str:
    """The built-in chat template for a model family (generic ChatML when unknown).

    ``model_type`` is an HF config ``model_type`` (gemma, gemma2, gemma3, gemma3_text, llama,
    qwen2, qwen3, mistral, mixtral, ...) or a family name (gemma, llama3, qwen, mistral, chatml).
    """
    return _BUILTIN_TEMPLATES[chat_template_family(model_type)]


# -------------------------------------------------------------- GGUF fallback templates
# Gemma 3's template (as in google/gemma-3-*-it tokenizer_config.json), text only.
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- if messages[0]['content'] is string -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}"
    "{%- endif -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = \"\" -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}"
    "{%- endif -%}"
    "{%- if (message['role'] == 'assistant') -%}"
    "{%- set role = \"model\" -%}"
    "{%- else -%}"
    "{%- set role = message['role'] -%}"
    "{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}"
    "{%- if message['content'] is string -%}"
    "{{ message['content'] | trim }}"
    "{%- elif message['content'] is iterable -%}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'text' -%}"
    "{{ item['text'] | trim }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- else -%}"
    "{{ raise_exception(\"Invalid content type\") }}"
    "{%- endif -%}"
    "{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{ '<start_of_turn>model\n' }}"
    "{%- endif -%}"
)


def fallback_chat_template(gguf_arch: str, vocab: list[str]) -> str | None:
    """A known template for this GGUF architecture when its special tokens exist."""
    if gguf_arch == "gemma3" and "<start_of_turn>" in vocab and "<end_of_turn>" in vocab:
        return GEMMA3_CHAT_TEMPLATE
    return None


# ------------------------------------------------------------------ template resolution
def load_chat_template(chat_template: str | os.PathLike[str]) -> str:
    """A template given on the command line or in a request: a file path or Jinja text."""
    text = os.fspath(chat_template)
    if "{{" in text or "{%" in text:
        return text
    if os.path.isfile(text):
        with open(text, encoding="utf-8") as f:
            return f.read()
    raise ValueError(
        f"chat template {text[:200]!r} is neither an existing file nor a Jinja template "
        "(no '{{' or '{%' in it)"
    )


def _has_token(tokenizer: Any, token: str) -> bool:
    try:
        token_id = tokenizer.convert_tokens_to_ids(token)
    except (KeyError, ValueError, TypeError):
        return False
    return token_id is not None and token_id != getattr(tokenizer, "unk_token_id", None)


def guess_chat_template_family(tokenizer: Any) -> str:
    """Guess the model family from the tokenizer's control tokens (ChatML when unsure)."""
    if _has_token(tokenizer, "<start_of_turn>"):
        return "gemma"
    if _has_token(tokenizer, "<|start_header_id|>"):
        return "llama3"
    if _has_token(tokenizer, "<|im_start|>"):
        return "qwen"
    if _has_token(tokenizer, "[INST]"):
        return "mistral"
    return "chatml"


def resolve_chat_template(
    tokenizer: Any, model_type: str | None, chat_template_arg: str | None
) -> str:
    """Pick the template: explicit argument > the tokenizer's own > built-in for the family.

    ``chat_template_arg`` may be Jinja text, a path to a template file, or the name of one of
    the tokenizer's named templates. With no ``model_type`` the family is guessed from the
    tokenizer's control tokens.
    """
    own = getattr(tokenizer, "chat_template", None)
    if chat_template_arg is not None:
        if isinstance(own, Mapping) and chat_template_arg in own:
            return own[chat_template_arg]
        return load_chat_template(chat_template_arg)
    if isinstance(own, Mapping):
        if "default" in own:
            return own["default"]
        raise ValueError(
            f"the tokenizer has several chat templates ({sorted(own)}) and none is 'default'; "
            "choose one with --chat-template"
        )
    if own:
        return own
    family = (
        chat_template_family(model_type) if model_type else guess_chat_template_family(tokenizer)
    )
    if model_type and family == "llama3" and not _has_token(tokenizer, "<|start_header_id|>"):
        family = "mistral"  # Llama 1/2 tokenizers: [INST] format
    logger.info("The tokenizer has no chat template; using the built-in %s template", family)
    return _BUILTIN_TEMPLATES[family]


def folder_chat_template(folder: str | os.PathLike[str]) -> str | None:
    """The model's own chat template in a model/tokenizer folder, or None.

    ``tokenizer_config.json``'s ``chat_template`` (its "default" when the templates are
    named), else ``chat_template.jinja``, else ``chat_template.json``.
    """
    folder = Path(folder)
    template = read_json(folder / "tokenizer_config.json").get("chat_template")
    if isinstance(template, list):  # named templates: take "default"
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if isinstance(template, str) and template:
        return template
    jinja = folder / "chat_template.jinja"
    if jinja.exists():
        return jinja.read_text()
    as_json = read_json(folder / "chat_template.json").get("chat_template")
    return as_json if isinstance(as_json, str) and as_json else None


def resolve_model_chat_template(
    tokenizer: Any,
    tokenizer_path: str | os.PathLike[str] | None,
    model_type: str | None,
    override: str | None = None,
) -> str:
    """The template a front end renders with: ``override`` (the user's) when given, else the
    model's own from its tokenizer folder, else the tokenizer's, else the family's built-in.

    Raises ValueError when ``override`` is neither a template, a file nor a named template.
    """
    if override is None and tokenizer_path is not None:
        override = folder_chat_template(tokenizer_path)
    return resolve_chat_template(tokenizer, model_type, override)


# --------------------------------------------------------------------- validation
def _content_text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, Sequence) or isinstance(content, bytes | bytearray):
        raise ValueError(
            f"{where}.content must be a string or a list of content parts, "
            f"got {type(content).__name__}"
        )
    texts: list[str] = []
    for j, part in enumerate(content):
        if not isinstance(part, Mapping):
            raise ValueError(
                f"{where}.content[{j}] must be an object like {{'type': 'text', 'text': '...'}}, "
                f"got {type(part).__name__}"
            )
        part_type = part.get("type")
        if part_type != "text":
            raise ValueError(
                f"{where}.content[{j}] has type {part_type!r}: only 'text' content parts are "
                "supported"
            )
        text = part.get("text")
        if not isinstance(text, str):
            raise ValueError(
                f"{where}.content[{j}].text must be a string, got {type(text).__name__}"
            )
        texts.append(text)
    return "\n".join(texts)


def _normalize_tool_calls(tool_calls: Any, where: str) -> list[Any]:
    if not isinstance(tool_calls, Sequence) or isinstance(tool_calls, str):
        raise ValueError(f"{where}.tool_calls must be a list, got {type(tool_calls).__name__}")
    result = []
    for call in tool_calls:
        call = copy.deepcopy(dict(call)) if isinstance(call, Mapping) else call
        function = call.get("function") if isinstance(call, dict) else None
        if isinstance(function, dict) and isinstance(function.get("arguments"), str):
            # HF templates (Llama 3.1, Qwen) expect arguments as a mapping, as vLLM passes them.
            try:
                arguments = json.loads(function["arguments"])
            except json.JSONDecodeError:
                arguments = None
            if isinstance(arguments, dict):
                function["arguments"] = arguments
        result.append(call)
    return result


def validate_conversation(conversation: Any) -> list[dict[str, Any]]:
    """Check OpenAI-style messages and return normalized copies (content as one string).

    Raises ValueError naming the message and field that is wrong.
    """
    if isinstance(conversation, str | bytes) or not isinstance(conversation, Sequence):
        raise ValueError(
            f"messages must be a list of message objects, got {type(conversation).__name__}"
        )
    if not conversation:
        raise ValueError("messages must contain at least one message")
    messages: list[dict[str, Any]] = []
    for i, message in enumerate(conversation):
        where = f"messages[{i}]"
        if hasattr(message, "model_dump"):  # pydantic request models
            message = message.model_dump(exclude_none=True)
        if not isinstance(message, Mapping):
            raise ValueError(
                f"{where} must be an object with 'role' and 'content', got {type(message).__name__}"
            )
        role = message.get("role")
        if role not in VALID_ROLES:
            raise ValueError(
                f"{where}.role must be one of {', '.join(map(repr, VALID_ROLES))}; got {role!r}"
            )
        normalized = {k: v for k, v in message.items() if v is not None}
        content = message.get("content")
        if content is None:
            if role != "assistant":
                raise ValueError(f"{where} (role {role!r}) has no content")
            normalized["content"] = ""  # e.g. an assistant turn that only has tool_calls
        else:
            normalized["content"] = _content_text(content, where)
        if "tool_calls" in normalized:
            if role != "assistant":
                raise ValueError(f"{where}: only assistant messages may have tool_calls")
            normalized["tool_calls"] = _normalize_tool_calls(normalized["tool_calls"], where)
        messages.append(normalized)
    return messages


# ------------------------------------------------------------------------ rendering
def apply_chat_template(
    tokenizer: Any,
    conversation: list[dict[str, Any]],
    chat_template: str | None = None,
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
    chat_template_kwargs: dict[str, Any] | None = None,
    tools: list[dict[str, Any]] | None = None,
    model_type: str | None = None,
) -> str:
    """Validate ``conversation`` and render it to prompt text (not tokenized).

    ``chat_template``: Jinja text or a path to a template file; by default the tokenizer's
    template, else the built-in one for ``model_type`` (guessed from the tokenizer's control
    tokens when not given). ``continue_final_message`` leaves the last (assistant) message
    open so the model continues it; it excludes ``add_generation_prompt``.
    ``chat_template_kwargs`` become extra template variables (e.g. ``enable_thinking``).
    Template errors (e.g. roles that do not alternate) raise ValueError.
    """
    messages = validate_conversation(conversation)
    if continue_final_message and add_generation_prompt:
        raise ValueError(
            "continue_final_message and add_generation_prompt cannot both be true: either the "
            "model continues the final message or it starts a new one"
        )
    if continue_final_message and messages[-1]["role"] != "assistant":
        raise ValueError(
            "continue_final_message needs the final message to be from the assistant, got "
            f"role {messages[-1]['role']!r}"
        )
    kwargs = dict(chat_template_kwargs or {})
    reserved = sorted(_RESERVED_TEMPLATE_KWARGS.intersection(kwargs))
    if reserved:
        raise ValueError(f"chat_template_kwargs may not set {reserved}; use the request fields")
    template = resolve_chat_template(tokenizer, model_type, chat_template)

    import jinja2

    try:
        if hasattr(tokenizer, "apply_chat_template"):
            rendered = tokenizer.apply_chat_template(
                messages,
                tools=tools,
                chat_template=template,
                add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message,
                tokenize=False,
                **kwargs,
            )
        else:
            rendered = _render(
                tokenizer,
                template,
                messages,
                tools,
                add_generation_prompt,
                continue_final_message,
                kwargs,
            )
    except jinja2.TemplateError as exc:
        raise ValueError(f"chat template error: {exc}") from exc
    assert isinstance(rendered, str), type(rendered)
    return rendered


def _render(
    tokenizer: Any,
    template: str,
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None,
    add_generation_prompt: bool,
    continue_final_message: bool,
    kwargs: dict[str, Any],
) -> str:
    """Render without transformers (a bare ``tokenizers.Tokenizer``)."""
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
    variables = {"bos_token": "", "eos_token": "", **kwargs}
    tag = "\x00CONTINUE_FINAL_MESSAGE\x00"
    if continue_final_message:
        messages = [*messages[:-1], {**messages[-1], "content": messages[-1]["content"] + tag}]
    text = env.from_string(template).render(
        messages=messages, tools=tools, add_generation_prompt=add_generation_prompt, **variables
    )
    if continue_final_message:
        if tag not in text:
            raise ValueError("continue_final_message: the template dropped the final message")
        text = text[: text.rindex(tag)]
    return text


# ----------------------------------------------------------------------- tokenizing
def prompt_has_bos(tokenizer: Any, text: str) -> bool:
    """Whether rendered prompt text already starts with the tokenizer's BOS token."""
    bos = getattr(tokenizer, "bos_token", None)
    return bool(bos) and text.startswith(bos)


def tokenize_prompt(tokenizer: Any, text: str, add_special_tokens: bool = True) -> list[int]:
    """Tokenize prompt text without doubling the BOS token.

    For chat prompts pass ``add_special_tokens=True``: when the rendered text already starts
    with ``bos_token`` (Gemma, Llama and Mistral templates write it), special tokens are not
    added again; when it does not (ChatML), the tokenizer's usual special tokens are added.
    """
    if add_special_tokens and prompt_has_bos(tokenizer, text):
        add_special_tokens = False
    from tokenizers import Tokenizer

    if isinstance(tokenizer, Tokenizer):
        return list(tokenizer.encode(text, add_special_tokens=add_special_tokens).ids)
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])
