"""Fixtures: one real server per session (default model, float32), and the offline LLM."""

from __future__ import annotations

import pytest

from tests.entrypoints.utils import BASE_ARGS, RemoteServer


@pytest.fixture(scope="session")
def server():
    """`pagedserve serve` on the bundled Gemma 3 270M with an API key."""
    with RemoteServer(BASE_ARGS) as remote:
        yield remote


@pytest.fixture(scope="session")
def client(server):
    return server.openai()


@pytest.fixture(scope="session")
def offline_llm():
    """The offline engine with the server's settings: greedy outputs must match."""
    from pagedserve import LLM

    return LLM(dtype="float32", quantization="none", max_model_len=2048, kv_cache_memory="192MiB")
