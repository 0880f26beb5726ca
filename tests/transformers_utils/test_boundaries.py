"""The API process does not import model code: the front end and transformers_utils stay
clear of pagedserve.models / worker / attention (the engine core process owns those)."""

from __future__ import annotations

import subprocess
import sys

from pagedserve.transformers_utils.config import SUPPORTED_ARCHITECTURES, check_architecture

_ENGINE_CORE_PACKAGES = ("pagedserve.models", "pagedserve.worker", "pagedserve.attention")


def _imported_after(code: str) -> list[str]:
    """pagedserve modules imported by a fresh interpreter after running ``code``."""
    script = (
        f"import sys\n{code}\n"
        "print('\\n'.join(sorted(m for m in sys.modules if m.startswith('pagedserve'))))"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=120, check=True)
    return result.stdout.split()


def _forbidden(modules: list[str], prefixes: tuple[str, ...]) -> list[str]:
    return [m for m in modules if m.startswith(prefixes)]


def test_front_end_imports_no_model_code() -> None:
    modules = _imported_after(
        "import pagedserve.entrypoints.openai.api_server, pagedserve.entrypoints.cli, "
        "pagedserve.engine.arg_utils, pagedserve.engine.async_llm"
    )
    assert _forbidden(modules, _ENGINE_CORE_PACKAGES) == []


def test_resolving_a_model_imports_no_model_code(tiny_model_dir) -> None:
    folder = tiny_model_dir("qwen3")
    modules = _imported_after(
        "from pagedserve.transformers_utils.resolve import resolve_model\n"
        "from pagedserve.transformers_utils.chat_templates import resolve_model_chat_template\n"
        "from pagedserve.transformers_utils.tokenizer import load_tokenizer\n"
        f"resolved = resolve_model({folder!r})\n"
        "tokenizer = load_tokenizer(resolved.tokenizer_path)\n"
        "resolve_model_chat_template(tokenizer, resolved.tokenizer_path, 'qwen3')"
    )
    assert "pagedserve.transformers_utils.resolve" in modules
    forbidden = (*_ENGINE_CORE_PACKAGES, "pagedserve.engine", "pagedserve.entrypoints")
    assert _forbidden(modules, forbidden) == []


def test_supported_architectures_agree_with_the_model_registry() -> None:
    from pagedserve.models.registry import supported_architectures

    assert sorted(SUPPORTED_ARCHITECTURES) == supported_architectures()
    assert check_architecture("LlamaForCausalLM") == "LlamaForCausalLM"
    import pytest

    with pytest.raises(ValueError, match="unsupported model architecture 'GPT2LMHeadModel'"):
        check_architecture("GPT2LMHeadModel")
