"""`cache_salt` isolates tenants in the prefix cache, end to end through the real server;
POST /reset_prefix_cache drops cached prefixes."""

from __future__ import annotations

import uuid

import httpx

BLOCK_SIZE = 16  # the server's --block-size (default)


def _complete(http: httpx.Client, prompt: str, salt: str | None = None) -> dict:
    body = {"prompt": prompt, "max_tokens": 1, "temperature": 0}
    if salt is not None:
        body["cache_salt"] = salt
    response = http.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    return response.json()["usage"]


def _expected_hit(prompt_tokens: int) -> int:
    # Every full block of the prompt except the one holding its last token (which must be
    # computed to sample from) can come from the cache.
    return (prompt_tokens - 1) // BLOCK_SIZE * BLOCK_SIZE


def _prompt() -> str:
    # Unique per test, so other tests' cached blocks never match; ~100 tokens.
    return f"[{uuid.uuid4().hex}] " + "The quick brown fox jumps over the lazy dog. " * 9


def test_cache_salt_isolates_prefix_cache_entries(server):
    prompt = _prompt()
    with server.http() as http:
        first = _complete(http, prompt, salt="tenant-a")
        assert first["prompt_tokens_details"]["cached_tokens"] == 0
        expected = _expected_hit(first["prompt_tokens"])
        assert expected >= 4 * BLOCK_SIZE
        # Another tenant with the same prompt: no hit on tenant A's blocks.
        other = _complete(http, prompt, salt="tenant-b")
        assert other["prompt_tokens_details"]["cached_tokens"] == 0
        # No salt at all: no hit on salted blocks either.
        unsalted = _complete(http, prompt)
        assert unsalted["prompt_tokens_details"]["cached_tokens"] == 0
        # The same tenant again: every full block but the last hits.
        again = _complete(http, prompt, salt="tenant-a")
        assert again["prompt_tokens_details"]["cached_tokens"] == expected
        again_b = _complete(http, prompt, salt="tenant-b")
        assert again_b["prompt_tokens_details"]["cached_tokens"] == expected


def test_cache_salt_in_chat_and_bad_salt(server):
    messages = [{"role": "user", "content": _prompt()}]
    with server.http() as http:
        body = {"messages": messages, "max_tokens": 1, "temperature": 0, "cache_salt": "s1"}
        first = http.post("/v1/chat/completions", json=body).json()["usage"]
        second = http.post("/v1/chat/completions", json=body).json()["usage"]
        third = http.post("/v1/chat/completions", json={**body, "cache_salt": "s2"}).json()["usage"]
        bad = http.post("/v1/completions", json={"prompt": "x", "cache_salt": ""})
    assert first["prompt_tokens_details"]["cached_tokens"] == 0
    assert second["prompt_tokens_details"]["cached_tokens"] == _expected_hit(first["prompt_tokens"])
    assert third["prompt_tokens_details"]["cached_tokens"] == 0
    assert bad.status_code == 400
    assert bad.json()["error"]["param"] == "cache_salt"


def test_reset_prefix_cache(server):
    prompt = _prompt()
    with server.http() as http:
        first = _complete(http, prompt)
        assert _complete(http, prompt)["prompt_tokens_details"]["cached_tokens"] == _expected_hit(
            first["prompt_tokens"]
        )
        assert httpx.post(server.url + "/reset_prefix_cache").status_code == 401
        assert http.post("/reset_prefix_cache").status_code == 200
        assert _complete(http, prompt)["prompt_tokens_details"]["cached_tokens"] == 0
