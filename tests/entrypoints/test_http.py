"""Raw HTTP against the real server: SSE framing, error bodies and statuses, auth,
unknown fields, the small endpoints, and client disconnects freeing the KV cache."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from tests.entrypoints.utils import PROMPTS


def _events(raw: bytes) -> list[bytes]:
    """Split an SSE body into its `data:` payloads, checking the framing byte for byte."""
    assert raw.endswith(b"data: [DONE]\n\n"), raw[-200:]
    frames = raw.split(b"\n\n")
    assert frames[-1] == b""
    payloads = []
    for frame in frames[:-1]:
        assert frame.startswith(b"data: "), frame
        assert b"\n" not in frame
        payloads.append(frame[len(b"data: "):])
    assert payloads[-1] == b"[DONE]"
    assert b"[DONE]" not in payloads[:-1]
    return payloads[:-1]


def _compact(obj: object) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()


def test_sse_framing_completions(server):
    body = {"prompt": PROMPTS[0], "max_tokens": 6, "temperature": 0, "model": "gemma-3-270m"}
    with server.http() as http:
        full = http.post("/v1/completions", json=body).json()
        response = http.post(
            "/v1/completions", json={**body, "stream": True, "stream_options": {"include_usage": True}}
        )
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    raw = response.content
    payloads = _events(raw)
    chunks = [json.loads(p) for p in payloads]
    # Byte for byte: each event is exactly `data: <compact json>\n\n`, then `data: [DONE]\n\n`.
    assert raw == b"".join(b"data: " + _compact(c) + b"\n\n" for c in chunks) + b"data: [DONE]\n\n"
    ids = {c["id"] for c in chunks}
    assert len(ids) == 1 and ids.pop().startswith("cmpl-")
    text_chunks = chunks[:-1]
    for chunk in text_chunks:
        assert chunk["object"] == "text_completion"
        assert chunk["model"] == "gemma-3-270m"
        assert set(chunk["choices"][0]) >= {"index", "text", "logprobs", "finish_reason"}
        assert chunk["usage"] is None
    assert "".join(c["choices"][0]["text"] for c in text_chunks) == full["choices"][0]["text"]
    assert text_chunks[-1]["choices"][0]["finish_reason"] == full["choices"][0]["finish_reason"]
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == full["usage"] | {
        "prompt_tokens_details": chunks[-1]["usage"]["prompt_tokens_details"]
    }


def test_sse_framing_chat(server):
    body = {
        "messages": [{"role": "user", "content": "Hi there"}],
        "max_tokens": 6,
        "temperature": 0,
    }
    with server.http() as http:
        full = http.post("/v1/chat/completions", json=body).json()
        raw = http.post("/v1/chat/completions", json={**body, "stream": True}).content
    chunks = [json.loads(p) for p in _events(raw)]
    assert raw == b"".join(b"data: " + _compact(c) + b"\n\n" for c in chunks) + b"data: [DONE]\n\n"
    assert chunks[0]["object"] == "chat.completion.chunk"
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all("role" not in c["choices"][0]["delta"] for c in chunks[1:])
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == full["choices"][0]["message"]["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == full["choices"][0]["finish_reason"]
    assert "stop_reason" in chunks[-1]["choices"][0]
    assert "usage" not in chunks[0]


LONG_IDS = [2] + [236743] * 2100

BAD_REQUESTS = [
    ("/v1/completions", {"prompt": "x", "top_p": 5}, 400, "top_p"),
    ("/v1/completions", {"prompt": "x", "temperature": -1}, 400, "temperature"),
    ("/v1/completions", {"prompt": "x", "max_tokens": "abc"}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "n": 0}, 400, "n"),
    ("/v1/completions", {"prompt": "x", "logprobs": 50}, 400, "logprobs"),
    ("/v1/completions", {"prompt": "x", "stop": [""]}, 400, "stop"),
    ("/v1/completions", {"max_tokens": 3}, 400, "prompt"),
    ("/v1/completions", {"prompt": []}, 400, "prompt"),
    ("/v1/completions", {"prompt": [10**9]}, 400, "prompt"),
    ("/v1/completions", {"prompt": "x", "stream_options": {"include_usage": True}}, 400, None),
    ("/v1/completions", {"prompt": "x", "priority": 5}, 400, "priority"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"abc": 1}}, 400, "logit_bias"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 5000}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": LONG_IDS}, 400, "input_tokens"),
    ("/v1/chat/completions", {"messages": []}, 400, None),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, 400, None),
    ("/v1/chat/completions", {"messages": "hello"}, 400, "messages"),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 3},
        400,
        None,
    ),
    ("/v1/completions", {"prompt": "x", "model": "not-a-model"}, 404, "model"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "model": "gpt-4"},
     404, "model"),
]


@pytest.mark.parametrize(("path", "body", "status", "param"), BAD_REQUESTS)
def test_bad_requests(server, path, body, status, param):
    with server.http() as http:
        response = http.post(path, json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == status
    assert error["message"]
    assert error["type"] == {400: "BadRequestError", 404: "NotFoundError"}[status]
    if param is not None:
        assert error["param"] == param, error


def test_context_length_message(server):
    with server.http() as http:
        error = http.post("/v1/completions", json={"prompt": LONG_IDS}).json()["error"]
    assert error["message"].startswith(
        f"This model's maximum context length is 2048 tokens. However, your request has "
        f"{len(LONG_IDS)} input tokens."
    )


def test_malformed_json_and_non_object_body(server):
    with server.http() as http:
        for content in (b'{"prompt": "x",', b"[1, 2]", b"not json"):
            response = http.post(
                "/v1/completions", content=content, headers={"Content-Type": "application/json"}
            )
            assert response.status_code == 400, response.text
            assert response.json()["error"]["code"] == 400


def test_api_key(server):
    body = {"prompt": "x", "max_tokens": 1}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "test-key"}):
        response = httpx.post(server.url + "/v1/completions", json=body, headers=headers)
        assert response.status_code == 401
        assert response.json()["error"]["code"] == 401
        assert httpx.get(server.url + "/v1/models", headers=headers).status_code == 401
    # Only /v1 is guarded, as in vLLM.
    assert httpx.get(server.url + "/health").status_code == 200
    assert httpx.get(server.url + "/version").status_code == 200


def test_unknown_fields_are_accepted(server):
    with server.http() as http:
        response = http.post(
            "/v1/completions",
            json={"prompt": "Hello", "max_tokens": 2, "some_future_field": {"x": 1}, "foo": True},
        )
        assert response.status_code == 200, response.text
        response = http.post(
            "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2,
                  "response_format_v9": "x", "metadata": {"a": "b"}},
        )
        assert response.status_code == 200, response.text


def test_small_endpoints(server):
    with server.http() as http:
        models = http.get("/v1/models").json()
        assert models["object"] == "list"
        assert models["data"][0]["id"] == "gemma-3-270m"
        assert models["data"][0]["max_model_len"] == 2048
        assert http.get("/version").json()["version"]
        tokens = http.post("/tokenize", json={"prompt": "Hello world"}).json()
        assert tokens["count"] == len(tokens["tokens"]) and tokens["max_model_len"] == 2048
        text = http.post("/detokenize", json={"tokens": tokens["tokens"]}).json()["prompt"]
        assert text.endswith("Hello world")
        chat_tokens = http.post(
            "/tokenize", json={"messages": [{"role": "user", "content": "Hi"}]}
        ).json()
        assert chat_tokens["tokens"][0] == 2 and chat_tokens["tokens"].count(2) == 1
        assert http.get("/openapi.json").status_code == 200
        assert http.get("/docs").status_code == 200
        health = http.get("/health")
        assert health.status_code == 200 and health.json()["engine_pid"] > 0


def _wait_idle(server, timeout: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        health = server.health().json()
        if (
            health["kv_cache_usage"] == 0
            and health["num_requests_running"] == 0
            and health["num_requests_waiting"] == 0
        ):
            return health
        if time.monotonic() > deadline:
            raise AssertionError(f"KV cache not released: {health}")
        time.sleep(0.2)


def test_disconnects_free_the_kv_cache(server):
    _wait_idle(server)
    body = {"prompt": PROMPTS[1], "max_tokens": 1500, "ignore_eos": True, "stream": True}
    clients = [server.http() for _ in range(6)]
    contexts = [http.stream("POST", "/v1/completions", json=body) for http in clients]
    try:
        # Response headers come at once; the first event only after the first token.
        responses = [ctx.__enter__() for ctx in contexts]
        assert all(r.status_code == 200 for r in responses)
        # Keep the line iterators referenced: dropping one closes its stream.
        line_iterators = [r.iter_lines() for r in responses]
        for lines in line_iterators:
            assert next(lines).startswith("data: ")  # generation has started
        health = server.health().json()
        assert health["num_requests_running"] + health["num_requests_waiting"] == 6
        assert health["kv_cache_usage"] > 0
    finally:
        for ctx in contexts:
            ctx.__exit__(None, None, None)
        for http in clients:
            http.close()
    _wait_idle(server)

    # A non-streaming client that gives up (timeout) is aborted too.
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            server.url + "/v1/completions", headers=server.headers, timeout=1.5,
            json={"prompt": PROMPTS[2], "max_tokens": 1500, "ignore_eos": True},
        )
    _wait_idle(server)


def test_bad_request_does_not_disturb_a_running_one(server):
    body = {"prompt": PROMPTS[0], "max_tokens": 8, "temperature": 0}
    with server.http() as http:
        expected = http.post("/v1/completions", json=body).json()["choices"][0]["text"]
    result: dict = {}

    def run() -> None:
        with server.http() as http:
            result["text"] = http.post("/v1/completions", json=body).json()["choices"][0]["text"]

    thread = threading.Thread(target=run)
    thread.start()
    with server.http() as http:
        for path, bad, status, _ in BAD_REQUESTS[:8]:
            assert http.post(path, json=bad).status_code == status
    thread.join(120)
    assert result["text"] == expected
