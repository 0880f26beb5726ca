"""pagedserve.envs is the one home of PAGEDSERVE_* environment variables, read lazily."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pagedserve import envs

PACKAGE = Path(__file__).resolve().parents[1] / "pagedserve"


def test_values_are_read_when_asked(monkeypatch, tmp_path) -> None:
    monkeypatch.delenv("PAGEDSERVE_ENGINE_READY_TIMEOUT", raising=False)
    assert envs.PAGEDSERVE_ENGINE_READY_TIMEOUT == 1800.0
    monkeypatch.setenv("PAGEDSERVE_ENGINE_READY_TIMEOUT", "12.5")
    assert envs.PAGEDSERVE_ENGINE_READY_TIMEOUT == 12.5
    monkeypatch.setenv("PAGEDSERVE_CACHE_DIR", str(tmp_path))
    assert envs.get("PAGEDSERVE_CACHE_DIR") == str(tmp_path)
    monkeypatch.setenv("PAGEDSERVE_CACHE_DIR", "")
    assert envs.PAGEDSERVE_CACHE_DIR.endswith(str(Path(".cache") / "pagedserve"))
    monkeypatch.setenv("PAGEDSERVE_NUM_THREADS", "0")
    assert envs.PAGEDSERVE_NUM_THREADS == 0


def test_bad_values_and_names_are_errors(monkeypatch) -> None:
    monkeypatch.setenv("PAGEDSERVE_ENGINE_HEARTBEAT_TIMEOUT", "soon")
    with pytest.raises(ValueError, match="PAGEDSERVE_ENGINE_HEARTBEAT_TIMEOUT"):
        _ = envs.PAGEDSERVE_ENGINE_HEARTBEAT_TIMEOUT
    monkeypatch.setenv("PAGEDSERVE_NUM_THREADS", "-2")
    with pytest.raises(ValueError, match="PAGEDSERVE_NUM_THREADS"):
        _ = envs.PAGEDSERVE_NUM_THREADS
    with pytest.raises(AttributeError):
        _ = envs.PAGEDSERVE_NO_SUCH_THING


def test_every_variable_the_package_names_is_declared_and_read_only_by_envs() -> None:
    named: set[str] = set()
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        named.update(re.findall(r"PAGEDSERVE_[A-Z0-9_]+[A-Z0-9]", text))
        if path.name != "envs.py":
            assert not re.search(r"environ(\.get)?[\[(]\s*[\"']PAGEDSERVE_", text), path
            assert not re.search(r"getenv\(\s*[\"']PAGEDSERVE_", text), path
    assert named <= set(envs.ENV_VARS), named - set(envs.ENV_VARS)
    for var in envs.ENV_VARS.values():
        assert var.doc
