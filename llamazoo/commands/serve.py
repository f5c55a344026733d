"""`llamazoo serve [--config FILE] [section.key=value ...]`: an OpenAI-compatible HTTP server with continuous
batching (/v1/completions, /v1/chat/completions, /v1/models, /health, /metrics, a chat page at /).
Under `torchrun --nproc_per_node N ... parallel.tensor_parallel=N` rank 0 serves and all ranks decode."""
from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from llamazoo.cli import add_config_arguments
    from llamazoo.config import ServeConfig

    add_config_arguments(parser, ServeConfig, "checkpoint/model/generation/serve",
                         "serve.port=8000 serve.max_concurrent=16 generation.temperature=0.7")


def run(args: argparse.Namespace) -> int:
    from llamazoo.config import ServeConfig, load_config
    from llamazoo.distributed.generation_hooks import parallel_serving
    from llamazoo.serving.server import run_server

    cfg = load_config(ServeConfig, args.config, args.overrides)
    with parallel_serving(cfg) as kwargs:  # {} unless launched by torchrun with parallel.tensor_parallel
        if "follow" in kwargs:
            return kwargs["follow"]()
        return run_server(cfg, **kwargs)
