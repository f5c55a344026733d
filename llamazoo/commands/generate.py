"""`llamazoo generate [--config FILE] [section.key=value ...]`: completions, streamed, plus the latency report.

With no arguments it completes "Once upon a time" with the embedded default model (greedy, 20 tokens).
"""
from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from llamazoo.cli import add_config_arguments
    from llamazoo.config import GenerateConfig

    add_config_arguments(parser, GenerateConfig, "checkpoint/model/generation",
                         "generation.max_new_tokens=64 'generation.prompts=[\"a\",\"b\"]' "
                         "generation.do_sample=true generation.output_format=jsonl")


def run(args: argparse.Namespace) -> int:
    from llamazoo.config import GenerateConfig, load_config
    from llamazoo.distributed.generation_hooks import parallel_generation
    from llamazoo.generation.app import run_generation

    cfg = load_config(GenerateConfig, args.config, args.overrides)
    with parallel_generation(cfg) as kwargs:  # {} unless launched by torchrun with parallel.tensor_parallel
        run_generation(cfg, **kwargs)
    return 0
