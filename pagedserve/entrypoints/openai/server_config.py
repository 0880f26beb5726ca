"""ServerConfig: the settings of the HTTP front end (`pagedserve serve`), frozen.

What the API server needs and the engine core never sees: the model names the API
accepts, the user's chat template override, the API key, where to listen and how to
shut down. Engine knobs are ``EngineArgs``'; the serve flags fill both.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from pagedserve import envs
from pagedserve.engine.arg_utils import DEFAULT_MODEL_NAME

UVICORN_LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")


@dataclass(frozen=True)
class ServerConfig:
    """The API server's settings (vLLM's serve flags of the same names)."""

    # Names the API accepts in "model"; the first is reported (--served-model-name).
    served_model_names: tuple[str, ...] = (DEFAULT_MODEL_NAME,)
    # The user's chat template (--chat-template): Jinja text, a template file, or the name
    # of one of the tokenizer's named templates; None: the model's own template.
    chat_template: str | None = None
    # Required as "Authorization: Bearer KEY" on /v1/* (--api-key, $PAGEDSERVE_API_KEY).
    api_key: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    uvicorn_log_level: str = "info"
    disable_uvicorn_access_log: bool = False
    # Seconds SIGTERM waits for in-flight requests before exiting (--shutdown-timeout).
    shutdown_timeout: float = 30.0
    # tool_choice "auto": read the calls the model wrote with this family's parser
    # (--enable-auto-tool-choice --tool-call-parser NAME, as vLLM).
    enable_auto_tool_choice: bool = False
    tool_call_parser: str | None = None
    # Split <think> reasoning into reasoning_content (--reasoning-parser NAME, as vLLM).
    reasoning_parser: str | None = None

    def __post_init__(self) -> None:
        if not self.served_model_names or not all(
            isinstance(name, str) and name for name in self.served_model_names
        ):
            raise ValueError(
                f"served_model_names must be non-empty names, got {self.served_model_names!r}"
            )
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in 0..65535, got {self.port}")
        if self.uvicorn_log_level not in UVICORN_LOG_LEVELS:
            raise ValueError(
                f"uvicorn_log_level must be one of {', '.join(UVICORN_LOG_LEVELS)}, "
                f"got {self.uvicorn_log_level!r}"
            )
        if not self.shutdown_timeout >= 0:
            raise ValueError(f"shutdown_timeout must be >= 0, got {self.shutdown_timeout}")
        from pagedserve.entrypoints.openai.tool_parsers import TOOL_PARSERS

        if self.enable_auto_tool_choice and self.tool_call_parser is None:
            raise ValueError("--enable-auto-tool-choice needs --tool-call-parser")
        from pagedserve.entrypoints.openai.reasoning import REASONING_PARSERS

        if self.reasoning_parser is not None and self.reasoning_parser not in REASONING_PARSERS:
            raise ValueError(
                f"unknown reasoning_parser {self.reasoning_parser!r}; choose from "
                f"{', '.join(REASONING_PARSERS)}"
            )
        if self.tool_call_parser is not None and self.tool_call_parser not in TOOL_PARSERS:
            raise ValueError(
                f"unknown tool_call_parser {self.tool_call_parser!r}; choose from "
                f"{', '.join(TOOL_PARSERS)}"
            )

    @property
    def model_name(self) -> str:
        """The name responses and metrics report."""
        return self.served_model_names[0]

    @classmethod
    def from_args(cls, args: argparse.Namespace, model: str | None) -> ServerConfig:
        """From the serve flags; ``model`` is the model as the user named it (None: default).

        With no --served-model-name the API serves the model under the name it was given
        (as vLLM), or ``gemma-3-270m`` for the bundled default model.
        """
        names = tuple(args.served_model_name or ()) or (model or DEFAULT_MODEL_NAME,)
        return cls(
            served_model_names=names,
            chat_template=args.chat_template,
            api_key=args.api_key or envs.PAGEDSERVE_API_KEY or None,
            host=args.host,
            port=args.port,
            uvicorn_log_level=args.uvicorn_log_level,
            disable_uvicorn_access_log=args.disable_uvicorn_access_log,
            shutdown_timeout=args.shutdown_timeout,
            enable_auto_tool_choice=args.enable_auto_tool_choice,
            tool_call_parser=args.tool_call_parser,
            reasoning_parser=args.reasoning_parser,
        )
