"""Flags of `pagedserve serve`, mirroring `vllm serve`, and `--config FILE.yaml`.

Three groups: the server's own (-> ``ServerConfig``, defaults from there), the engine's
(generated from ``EngineArgs``) and observability (-> ``ObservabilityConfig``).

A YAML config holds flag names (``max-num-seqs: 8`` or ``max_num_seqs: 8``) and values;
flags given on the command line win over the file, as in vLLM.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from typing import Any

from pagedserve.entrypoints.engine_flags import add_engine_flags
from pagedserve.entrypoints.observability_args import add_observability_flags
from pagedserve.entrypoints.openai.reasoning import REASONING_PARSERS
from pagedserve.entrypoints.openai.server_config import UVICORN_LOG_LEVELS, ServerConfig
from pagedserve.entrypoints.openai.tool_parsers import TOOL_PARSERS


class ConfigFileArgumentParser(argparse.ArgumentParser):
    """An ArgumentParser that expands ``--config FILE.yaml`` into flags before parsing."""

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        if args is not None:
            args = self._expand_config(list(args))
        return super().parse_known_args(args, namespace)

    def _expand_config(self, args: list[str]) -> list[str]:
        path = None
        rest: list[str] = []
        i = 0
        while i < len(args):
            arg = args[i]
            if arg == "--config":
                if i + 1 >= len(args):
                    self.error("--config needs a file name")
                path = args[i + 1]
                i += 2
                continue
            if arg.startswith("--config="):
                path = arg.split("=", 1)[1]
                i += 1
                continue
            rest.append(arg)
            i += 1
        if path is None:
            return args
        # Positionals (the model) stay first; file flags come before CLI flags, so CLI wins.
        num_leading_positionals = 0
        while num_leading_positionals < len(rest) and not rest[num_leading_positionals].startswith("-"):
            num_leading_positionals += 1
        head, tail = rest[:num_leading_positionals], rest[num_leading_positionals:]
        return head + self._config_flags(path) + tail + ["--config", path]

    def _config_flags(self, path: str) -> list[str]:
        import yaml

        if not os.path.isfile(path):
            self.error(f"config file {path!r} does not exist")
        with open(path) as f:
            try:
                data = yaml.safe_load(f) or {}
            except yaml.YAMLError as exc:
                self.error(f"cannot parse config file {path!r}: {exc}")
        if not isinstance(data, dict):
            self.error(f"config file {path!r} must be a mapping of flag names to values")
        actions = {
            option: action
            for action in self._actions
            for option in action.option_strings
        }
        flags: list[str] = []
        for key, value in data.items():
            option = "--" + str(key).replace("_", "-")
            action = actions.get(option)
            if action is None:
                self.error(f"unknown key {key!r} in config file {path!r}")
            flags.extend(_to_flags(option, action, value))
        return flags


def _to_flags(option: str, action: argparse.Action, value: Any) -> list[str]:
    if isinstance(action, argparse.BooleanOptionalAction):
        return [option if value else "--no-" + option[2:]]
    if isinstance(action, argparse._StoreTrueAction):
        return [option] if value else []
    if isinstance(action, argparse._StoreFalseAction):
        return [] if value else [option]
    if isinstance(value, list):
        return [option, *[str(v) for v in value]]
    if value is None:
        return []
    return [option, str(value)]


def add_serve_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `pagedserve serve [MODEL]` on the CLI's subparsers."""
    parser_class = subparsers._parser_class
    subparsers._parser_class = ConfigFileArgumentParser
    try:
        parser = subparsers.add_parser(
            "serve",
            help="start the OpenAI-compatible server (like `vllm serve`)",
            description="Serve a model over an OpenAI-compatible HTTP API "
            "(/v1/completions, /v1/chat/completions, /v1/models, /health).",
        )
    finally:
        subparsers._parser_class = parser_class
    parser.add_argument("model_tag", nargs="?", default=None,
                        help="HF folder, hub id or .gguf file (default: bundled Gemma 3 270M)")
    add_serve_flags(parser)
    parser.set_defaults(func=_serve)
    return parser


def _serve(args: argparse.Namespace) -> int:
    # Imported here so other subcommands do not pay for FastAPI/uvicorn.
    from pagedserve.entrypoints.openai.api_server import run_server

    return run_server(args)


def add_serve_flags(parser: argparse.ArgumentParser) -> None:
    defaults = ServerConfig()
    parser.add_argument("--config", default=None,
                        help="YAML file of flag values (command-line flags win)")
    server = parser.add_argument_group("server")
    server.add_argument("--host", default=defaults.host,
                        help=f"address to listen on (default: {defaults.host})")
    server.add_argument("--port", type=int, default=defaults.port,
                        help=f"port to listen on (default: {defaults.port})")
    server.add_argument("--served-model-name", nargs="+", default=None,
                        help="model name(s) the API accepts; the first is reported "
                        "(default: the model as named)")
    server.add_argument("--api-key", default=None,
                        help="require 'Authorization: Bearer KEY' on /v1/* "
                        "(default: $PAGEDSERVE_API_KEY)")
    server.add_argument("--chat-template", default=None,
                        help="chat template: a file, the template itself, or the name of one "
                        "of the tokenizer's templates (default: the model's own)")
    server.add_argument("--uvicorn-log-level", default=defaults.uvicorn_log_level,
                        choices=list(UVICORN_LOG_LEVELS))
    server.add_argument("--disable-uvicorn-access-log", action="store_true")
    server.add_argument("--shutdown-timeout", type=float, default=defaults.shutdown_timeout,
                        help="seconds SIGTERM waits for in-flight requests before exiting")
    server.add_argument("--enable-auto-tool-choice", action="store_true",
                        help="tool_choice auto: parse the calls the model writes "
                             "(needs --tool-call-parser)")
    server.add_argument("--tool-call-parser", default=None, choices=sorted(TOOL_PARSERS),
                        help="the model family's tool-call format (hermes: Qwen2/Qwen3)")
    server.add_argument("--reasoning-parser", default=None, choices=sorted(REASONING_PARSERS),
                        help="split <think> reasoning into reasoning_content (qwen3, "
                             "deepseek_r1)")
    add_engine_flags(parser)
    add_observability_flags(parser)
