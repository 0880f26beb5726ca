"""Start the real `pagedserve serve` as a subprocess on 127.0.0.1 and a free port."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parents[2]
API_KEY = "test-key"
# The default model in float32: greedy equals the offline engine exactly.
# Unquantized float32: the server's greedy outputs must equal the offline LLM's (and
# transformers'); --quantization auto would run the Q4_K_M GGUF on int8 kernels.
BASE_ARGS = ["--dtype", "float32", "--quantization", "none", "--max-model-len", "2048",
             "--kv-cache-memory", "192MiB"]

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village by the sea,",
    "The three primary colors are",
    "1, 2, 3, 5, 8, 13,",
    "Photosynthesis is the process by which",
    "My favourite programming language is Python because",
    "Water boils at",
]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RemoteServer:
    """A `pagedserve serve` subprocess; its output goes to a log file shown on failure."""

    def __init__(
        self,
        args: list[str],
        env: dict[str, str] | None = None,
        api_key: str | None = API_KEY,
        startup_timeout: float = 240.0,
    ) -> None:
        self.port = free_port()
        self.api_key = api_key
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile(prefix="pagedserve-server-", suffix=".log", delete=False)
        command = [
            sys.executable, "-m", "pagedserve.entrypoints.cli", "serve",
            "--host", "127.0.0.1", "--port", str(self.port),
            "--disable-uvicorn-access-log", *args,
        ]
        if api_key:
            command += ["--api-key", api_key]
        full_env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), **(env or {})}
        full_env.pop("PAGEDSERVE_API_KEY", None)
        self.proc = subprocess.Popen(
            command, cwd=REPO_ROOT, env=full_env, stdout=self.log, stderr=subprocess.STDOUT
        )
        self._wait_ready(startup_timeout)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.logs()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"server not ready in {timeout} s:\n{self.logs()}")

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def http(self, timeout: float = 120.0) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=self.headers, timeout=timeout)

    def openai(self, **kwargs):  # noqa: ANN201
        import openai

        return openai.OpenAI(
            base_url=self.url + "/v1", api_key=self.api_key or "none", max_retries=0, **kwargs
        )

    def async_openai(self, **kwargs):  # noqa: ANN201
        import openai

        return openai.AsyncOpenAI(
            base_url=self.url + "/v1", api_key=self.api_key or "none", max_retries=0, **kwargs
        )

    def health(self) -> httpx.Response:
        return httpx.get(self.url + "/health", timeout=10)

    def logs(self) -> str:
        try:
            return Path(self.log.name).read_text(errors="replace")[-6000:]
        except OSError:
            return ""

    def wait_exit(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"server still running after {timeout} s:\n{self.logs()}") from None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()
        try:
            os.unlink(self.log.name)
        except OSError:
            pass

    def __enter__(self) -> RemoteServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
