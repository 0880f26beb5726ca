"""A hub id resolves through huggingface_hub's normal cache (offline, from a local snapshot)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from pagedserve.transformers_utils.resolve import resolve_model


def _make_hub_cache(cache: Path, repo_id: str, source: Path) -> Path:
    """Lay out a model the way huggingface_hub caches it: refs/main -> snapshots/<commit>."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo_dir / "snapshots" / commit
    shutil.copytree(source, snapshot)
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    return snapshot


def test_hub_id_resolves_from_the_hf_cache(tmp_path, monkeypatch, tiny_model_dir):
    import huggingface_hub.constants as hub_constants

    source = Path(tiny_model_dir("qwen3"))
    snapshot = _make_hub_cache(tmp_path, "tiny-org/tiny-qwen3", source)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)

    resolved = resolve_model("tiny-org/tiny-qwen3")
    assert Path(resolved.model_path).resolve() == snapshot.resolve()
    assert resolved.architecture == "Qwen3ForCausalLM"

    with pytest.raises(ValueError, match="hub"):
        resolve_model("tiny-org/not-in-cache")
