"""`llamazoo serve [--config FILE] [section.key=value ...]`: an OpenAI-compatible HTTP server with continuous
batching (/v1/completions, /v1/chat/completions, /v1/models, /health, /metrics, a chat page at /)."""
from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from llamazoo.cli import add_config_arguments
    from llamazoo.config import ServeConfig

    add_config_arguments(parser, ServeConfig, "checkpoint/model/generation/serve",
                         "serve.port=8000 serve.max_concurrent=16 generation.temperature=0.7")


def run(args: argparse.Namespace) -> int:
    from llamazoo.config import ServeConfig, load_config
    from llamazoo.serving.server import run_server

    cfg = load_config(ServeConfig, args.config, args.overrides)
    return run_server(cfg)
