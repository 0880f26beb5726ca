"""Session fixtures shared by the whole suite: tiny random-weight models (cached on disk
under tests/.cache/tiny-models) and the resolved default Gemma 3 270M GGUF."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.utils.tiny_models import TINY_ARCHS, build_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir() -> Callable[[str], str]:
    """``tiny_model_dir(arch) -> folder`` for arch in TINY_ARCHS; built once, cached on disk."""
    built: dict[str, str] = {}

    def get(arch: str) -> str:
        if arch not in built:
            built[arch] = build_tiny_model(arch)
        return built[arch]

    return get


@pytest.fixture(scope="session")
def tiny_model_dirs(tiny_model_dir: Callable[[str], str]) -> dict[str, str]:
    """All tiny checkpoints: ``{arch: folder}``."""
    return {arch: tiny_model_dir(arch) for arch in TINY_ARCHS}


@pytest.fixture(scope="session")
def default_resolved_model():
    """``resolve_model(None)``: the bundled GGUF, converted once into the user cache."""
    from pagedserve.transformers_utils.resolve import resolve_model

    return resolve_model(None)


@pytest.fixture(scope="session")
def gemma_tokenizer(default_resolved_model):  # noqa: ANN001, ANN201
    """The default model's tokenizer (converted from the bundled GGUF, cached on disk)."""
    from pagedserve.transformers_utils.tokenizer import load_tokenizer

    return load_tokenizer(default_resolved_model.tokenizer_path)
