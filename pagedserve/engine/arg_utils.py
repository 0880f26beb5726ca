"""EngineArgs: the user-facing knobs (LLM kwargs, CLI flags) resolved into a frozen EngineConfig.

``EngineArgs`` is the one source of every engine knob's name, default and help text: the
CLI flags (``pagedserve.entrypoints.engine_flags.add_engine_flags``) and ``LLM(...)``'s
keyword arguments are generated from its fields (help text, choices and the like live in
each field's metadata; see :func:`arg_field`). Front-end settings (served model names, the
user's chat template, the API key) are not engine knobs: they live in the server's
``ServerConfig`` (``pagedserve.entrypoints.openai.server_config``).
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass, field, fields
from functools import cache
from typing import Any, get_type_hints

from pagedserve import platform
from pagedserve.config import (
    CacheConfig,
    EngineConfig,
    ModelConfig,
    SchedulerConfig,
    parse_size,
)

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "gemma-3-270m"
# Per-step token budget when --max-num-batched-tokens is not given (see create_engine_config).
_DEFAULT_MAX_NUM_BATCHED_TOKENS_CPU = 2048
_DEFAULT_MAX_NUM_BATCHED_TOKENS_CUDA = 8192


def arg_field(
    default: Any,
    help: str,
    *,
    choices: tuple[str, ...] | None = None,
    metavar: str | None = None,
    flag_type: type | None = None,
) -> Any:
    """A dataclass field of EngineArgs with what its CLI flag needs in ``metadata``.

    ``flag_type`` overrides the type a flag parses to (by default: the field's type, with
    ``None`` dropped; a bool field becomes ``--flag/--no-flag``).
    """
    metadata = {"help": help, "choices": choices, "metavar": metavar, "flag_type": flag_type}
    return field(default=default, metadata=metadata)


@dataclass
class EngineArgs:
    """Arguments for the engine, with vLLM's names and defaults where the concept is the same."""

    model: str | None = arg_field(
        None, "HF folder, hub id or .gguf file (default: the bundled Gemma 3 270M)")
    revision: str | None = arg_field(
        None, "branch, tag or commit of a Hugging Face hub model (default: main)")
    dtype: str = arg_field(
        "auto", "weights and activations dtype; auto: bfloat16 on CUDA and on CPUs with "
        "AMX/AVX512-BF16, else float32", choices=("auto", "bfloat16", "float32", "float16"))
    quantization: str = arg_field(
        "auto", "weights of the linear layers and LM head; int8: per-channel int8 with "
        "kernels chosen per CPU (CPU only); auto: int8 for a GGUF whose weights are "
        "quantized (e.g. Q4_K_M), else none (the checkpoint's dtype)",
        choices=("auto", "none", "int8"))
    max_model_len: int | None = arg_field(
        None, "context length, prompt plus output (default: the model's "
        "max_position_embeddings)")
    max_num_seqs: int = arg_field(128, "most sequences in one engine step")
    max_num_batched_tokens: int | None = arg_field(
        None, f"most tokens in one engine step (default: "
        f"{_DEFAULT_MAX_NUM_BATCHED_TOKENS_CPU} on CPU, "
        f"{_DEFAULT_MAX_NUM_BATCHED_TOKENS_CUDA} on CUDA)")
    max_step_latency_ms: float | None = arg_field(
        None, "target time of an engine step that carries decodes, in ms: prefill chunks "
        "are sized from a step-cost model learnt online so decoding streams are not "
        "stalled (max_num_batched_tokens stays the hard cap). Default: auto, 7x the "
        "single-decode step (measured at start-up) or 2x a step's decodes "
        "when longer; 0: off", metavar="MS")
    long_prefill_token_threshold: int | None = arg_field(
        None, "a prefill takes at most this many tokens per step, so other requests run "
        "alongside (default and 0: no limit but the step's token budget)")
    block_size: int = arg_field(16, "tokens per KV cache block (a power of two)")
    kv_cache_memory: int | str | None = arg_field(
        None, "KV cache size: bytes or e.g. 4GiB (default: a share of free memory)",
        flag_type=str)
    enable_prefix_caching: bool = arg_field(
        True, "reuse the KV cache of prompts' shared prefixes")
    scheduling_policy: str = arg_field(
        "fcfs", "fcfs: first come first served; priority: lower request priority first",
        choices=("fcfs", "priority"))
    max_num_queued_requests: int = arg_field(
        0, "refuse new requests (HTTP 429) while this many wait (0: unbounded)")
    seed: int = arg_field(
        0, "seed of the engine's random generator (sampling of requests without a seed)")
    num_threads: int | None = arg_field(
        None, "torch threads of the engine (default: $PAGEDSERVE_NUM_THREADS, else all cores)")

    @classmethod
    def from_kwargs(cls, caller: str = "EngineArgs", **kwargs: Any) -> EngineArgs:
        """EngineArgs from keyword arguments; TypeError naming any unknown one."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            import difflib

            hints = []
            for name in unknown:
                close = difflib.get_close_matches(name, known, n=1)
                hints.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            raise TypeError(
                f"{caller}() got unknown engine argument(s) {', '.join(hints)}; engine "
                f"arguments are: {', '.join(f.name for f in fields(cls))}"
            )
        return cls(**kwargs)

    @staticmethod
    def specs() -> tuple[EngineArgSpec, ...]:
        """Every engine argument: name, type, default, help (what flags and LLM are made of)."""
        return _engine_arg_specs()

    @staticmethod
    def signature_parameters() -> list[inspect.Parameter]:
        """Keyword-only parameters, one per engine argument (for a generated signature)."""
        return [
            inspect.Parameter(
                spec.name, inspect.Parameter.KEYWORD_ONLY, default=spec.default,
                annotation=spec.annotation,
            )
            for spec in _engine_arg_specs()
        ]

    def create_engine_config(self) -> EngineConfig:
        """Resolve the model and every "auto" value, then freeze."""
        from pagedserve.transformers_utils.resolve import resolve_model

        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_queued_requests < 0:
            raise ValueError(
                f"max_num_queued_requests must be >= 0 (0: unbounded), "
                f"got {self.max_num_queued_requests}"
            )
        resolved = resolve_model(self.model, revision=self.revision)
        dtype, dtype_reason = platform.resolve_dtype(self.dtype)
        quantization, quantization_reason = self._resolve_quantization(resolved)
        hf_config = resolved.hf_config
        model_max_len = int(
            getattr(hf_config, "max_position_embeddings", 0) or 2048
        )
        if self.max_model_len is None:
            max_model_len = model_max_len
        else:
            if self.max_model_len < 2:
                raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")
            if self.max_model_len > model_max_len:
                raise ValueError(
                    f"max_model_len={self.max_model_len} exceeds the model's "
                    f"max_position_embeddings={model_max_len}"
                )
            max_model_len = self.max_model_len
        model_config = ModelConfig(
            model=self.model if self.model is not None else DEFAULT_MODEL_NAME,
            model_path=resolved.model_path,
            tokenizer_path=resolved.tokenizer_path,
            hf_config=hf_config,
            architecture=resolved.architecture,
            dtype=dtype,
            dtype_reason=dtype_reason,
            max_model_len=max_model_len,
            seed=self.seed,
            eos_token_ids=frozenset(resolved.eos_token_ids),
            quantization=quantization,
            quantization_reason=quantization_reason,
        )
        # Only the budget: the engine core sizes the cache in blocks once the model is
        # loaded, where the memory is (pagedserve.worker.kv_cache).
        cache_config = CacheConfig(
            block_size=self.block_size,
            kv_cache_memory_bytes=(
                None if self.kv_cache_memory is None else parse_size(self.kv_cache_memory)
            ),
            enable_prefix_caching=self.enable_prefix_caching,
        )
        scheduler_config = SchedulerConfig(
            max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=self._resolve_max_num_batched_tokens(),
            max_model_len=max_model_len,
            # None and 0: a prefill is limited only by the step's token budget. vLLM's default
            # is 0 as well; it only sets 4% of max_model_len when max_num_partial_prefills > 1
            # (several concurrent partial prefills), which pagedserve does not have.
            long_prefill_token_threshold=self.long_prefill_token_threshold or 0,
            policy=self.scheduling_policy,
            max_num_queued_requests=self.max_num_queued_requests,
            max_step_latency_ms=self.max_step_latency_ms,
        )
        return EngineConfig(
            model_config=model_config,
            cache_config=cache_config,
            scheduler_config=scheduler_config,
            num_threads=self.num_threads or 0,
        )

    def _resolve_quantization(self, resolved: Any) -> tuple[str, str]:
        """The quantization method ("none" or "int8") and why.

        auto follows the checkpoint, as llama.cpp and vLLM do: a GGUF whose weights are
        block-quantized runs on the int8 kernels; an unquantized checkpoint keeps its
        dtype. The int8 kernels are CPU kernels: on CUDA the model runs unquantized.
        """
        requested = self.quantization
        if requested not in ("auto", "none", "int8"):
            raise ValueError(f"quantization must be auto, none or int8, got {requested!r}")
        if requested == "none":
            return "none", "requested"
        if requested == "auto":
            from pagedserve.transformers_utils.gguf_reader import has_quantized_weights, read_gguf

            if not (resolved.is_gguf and has_quantized_weights(read_gguf(resolved.model_path))):
                return "none", "auto: unquantized checkpoint"
            reason = "auto: quantized GGUF"
        else:
            reason = "requested"
        if platform.is_cuda():
            logger.warning(
                "quantization int8 (%s) has CPU kernels only: running unquantized on CUDA", reason
            )
            return "none", f"{reason}; int8 is CPU-only, unquantized on CUDA"
        return "int8", reason

    def _resolve_max_num_batched_tokens(self) -> int:
        """The per-step token budget: the flag, else the platform's default.

        The one place this default lives. A step runs every scheduled token through the
        model at once, so the budget bounds how long a step that carries a prefill chunk
        takes, and with it how long running decodes wait for their next token: 2048 keeps
        a CPU step short, while a GPU is only well used with larger batches (8192; vLLM's
        API-server default is 2048, and 8192 on GPUs with 70 GiB or more).
        """
        if self.max_num_batched_tokens is not None:
            return self.max_num_batched_tokens
        if platform.is_cuda():
            return _DEFAULT_MAX_NUM_BATCHED_TOKENS_CUDA
        return _DEFAULT_MAX_NUM_BATCHED_TOKENS_CPU


@dataclass(frozen=True)
class EngineArgSpec:
    """One engine argument as the flag and signature generators see it."""

    name: str
    annotation: Any  # the field's resolved type, e.g. int | None
    default: Any
    help: str
    choices: tuple[str, ...] | None
    metavar: str | None
    flag_type: type | None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


@cache
def _engine_arg_specs() -> tuple[EngineArgSpec, ...]:
    hints = get_type_hints(EngineArgs)
    return tuple(
        EngineArgSpec(
            name=f.name,
            annotation=hints[f.name],
            default=f.default,
            help=str(f.metadata.get("help", "")),
            choices=f.metadata.get("choices"),
            metavar=f.metadata.get("metavar"),
            flag_type=f.metadata.get("flag_type"),
        )
        for f in fields(EngineArgs)
    )
