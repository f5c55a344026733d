"""`llamazoo chat [--config FILE] [section.key=value ...]`: an interactive conversation with streaming.

/reset, /system TEXT, /exit; Ctrl-C stops the current answer. Reads messages line by line from stdin when
it is not a terminal (e.g. `echo "Hi" | llamazoo chat`).
"""
from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from llamazoo.cli import add_config_arguments
    from llamazoo.config import GenerateConfig

    add_config_arguments(parser, GenerateConfig, "checkpoint/model/generation",
                         "generation.system='You are terse.' generation.do_sample=true generation.temperature=0.7")


def run(args: argparse.Namespace) -> int:
    from llamazoo.config import GenerateConfig, load_config
    from llamazoo.generation.app import run_chat

    run_chat(load_config(GenerateConfig, args.config, args.overrides))
    return 0
