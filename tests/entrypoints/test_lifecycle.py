"""Servers of their own: --config YAML, 429 admission control, SIGTERM drain, and the
engine core dying (or stalling) under the server."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import httpx
import pytest

from tests.entrypoints.utils import BASE_ARGS, PROMPTS, RemoteServer

LONG = {"max_tokens": 1500, "ignore_eos": True, "temperature": 0}


def _wait_for(predicate, timeout: float, what: str):  # noqa: ANN001, ANN202
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def limited_server(tmp_path_factory):
    config = tmp_path_factory.mktemp("config") / "serve.yaml"
    config.write_text(
        "max-num-seqs: 1\n"
        "max_num_queued_requests: 1\n"
        "served-model-name: [my-model, alias]\n"
        "max-model-len: 1024\n"  # the command line's --max-model-len 2048 wins
        "enable-prefix-caching: false\n"
    )
    remote = RemoteServer([*BASE_ARGS, "--config", str(config)], api_key=None)
    yield remote
    remote.stop()


def test_config_file(limited_server):
    models = httpx.get(limited_server.url + "/v1/models").json()["data"]
    assert [m["id"] for m in models] == ["my-model", "alias"]
    assert models[0]["max_model_len"] == 2048
    response = httpx.post(
        limited_server.url + "/v1/completions",
        json={"model": "alias", "prompt": "Hi", "max_tokens": 2},
        timeout=60,
    )
    assert response.status_code == 200
    assert response.json()["model"] == "alias"


def test_queue_full_answers_429(limited_server):
    url = limited_server.url + "/v1/completions"
    body = {"prompt": PROMPTS[0], "stream": True, **LONG}
    with httpx.Client(timeout=120) as first, httpx.Client(timeout=120) as second:
        with first.stream("POST", url, json=body) as running:
            lines = running.iter_lines()
            assert next(lines).startswith("data: ")  # running (max-num-seqs 1)
            with second.stream("POST", url, json=body) as queued:
                assert queued.status_code == 200
                _wait_for(
                    lambda: limited_server.health().json()["num_requests_waiting"] == 1,
                    30, "the second request to wait",
                )
                refused = httpx.post(url, json={"prompt": "x", "max_tokens": 2}, timeout=30)
                assert refused.status_code == 429
                assert refused.headers["Retry-After"] == "1"
                error = refused.json()["error"]
                assert error["code"] == 429 and error["type"] == "RateLimitError"
                # n counts: two more would not fit either.
                chat = httpx.post(
                    limited_server.url + "/v1/chat/completions",
                    json={"messages": [{"role": "user", "content": "x"}], "max_tokens": 2},
                    timeout=30,
                )
                assert chat.status_code == 429


def test_sigterm_drains_in_flight_requests(limited_server):
    _wait_for(lambda: limited_server.health().json()["kv_cache_usage"] == 0, 30, "idle engine")
    result: dict = {}

    def run() -> None:
        response = httpx.post(
            limited_server.url + "/v1/completions",
            json={"prompt": PROMPTS[2], "max_tokens": 12, "ignore_eos": True, "stream": True,
                  "stream_options": {"include_usage": True}},
            timeout=120,
        )
        result["status"] = response.status_code
        result["body"] = response.text

    thread = threading.Thread(target=run)
    thread.start()
    _wait_for(
        lambda: limited_server.health().json()["num_requests_running"] == 1, 30, "a running request"
    )
    limited_server.proc.send_signal(signal.SIGTERM)
    thread.join(120)
    assert result["status"] == 200
    events = [line[6:] for line in result["body"].split("\n\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[-1]["usage"]["completion_tokens"] == 12
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert limited_server.wait_exit(60) == 0
    with pytest.raises(httpx.ConnectError):
        httpx.get(limited_server.url + "/health", timeout=5)


def test_engine_death_turns_health_503_and_exits_nonzero():
    env = {
        "PAGEDSERVE_ENGINE_HEARTBEAT_TIMEOUT": "2.5",
        "PAGEDSERVE_ENGINE_HEARTBEAT_INTERVAL": "0.5",
        "PAGEDSERVE_DEAD_ENGINE_EXIT_DELAY": "5",
    }
    with RemoteServer(BASE_ARGS, env=env, api_key=None) as remote:
        engine_pid = remote.health().json()["engine_pid"]

        # A stalled engine (alive, no heartbeat) is unhealthy; it recovers when it resumes.
        os.kill(engine_pid, signal.SIGSTOP)
        try:
            stalled = _wait_for(
                lambda: (r := remote.health()).status_code == 503 and r, 15, "503 while stalled"
            )
            assert stalled.json()["status"] == "stalled"
        finally:
            os.kill(engine_pid, signal.SIGCONT)
        _wait_for(lambda: remote.health().status_code == 200, 15, "200 after resuming")

        # A dead engine: in-flight streams get an error event, /health 503, the server exits.
        url = remote.url + "/v1/completions"
        with httpx.Client(timeout=60) as http:
            with http.stream("POST", url, json={"prompt": PROMPTS[1], "stream": True, **LONG}) as stream:
                lines = stream.iter_lines()
                assert next(lines).startswith("data: ")
                os.kill(engine_pid, signal.SIGKILL)
                rest = [line for line in lines if line.startswith("data: ")]
        assert rest[-1] == "data: [DONE]"
        error = json.loads(rest[-2][6:])["error"]
        assert error["code"] == 500 and "engine" in error["message"].lower()
        health = remote.health()
        assert health.status_code == 503 and health.json()["status"] == "dead"
        refused = httpx.post(url, json={"prompt": "x", "max_tokens": 2}, timeout=10)
        assert refused.status_code == 500
        assert remote.wait_exit(60) != 0
