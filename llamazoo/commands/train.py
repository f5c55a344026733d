"""`llamazoo train`: fine-tune or pre-train on a prepared HDF5 folder (the original's training app).

Usage: llamazoo train [--config FILE] [section.key=value ...]; also `python -m llamazoo train` and
torchrun-launchable (rank and world size come from torch.distributed).
"""
from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    from llamazoo.cli import add_config_arguments
    from llamazoo.config import TrainConfig

    add_config_arguments(p, TrainConfig, "model/checkpoint/training/parallel",
                         "training.dataset=data/ training.batch_size=4 checkpoint.model_name_or_path=default")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from llamazoo.cli import UserError
    from llamazoo.config import TrainConfig, load_config
    from llamazoo.distributed.trainer_hooks import parallel_training
    from llamazoo.training.trainer import TrainingError, train

    cfg = load_config(TrainConfig, args.config, args.overrides)
    try:
        with parallel_training(cfg) as hooks:  # None unless launched by torchrun (cfg.parallel)
            result = train(cfg, hooks=hooks, progress=not args.no_progress)
    except TrainingError as e:
        raise UserError(str(e)) from None
    return 0 if result["interrupted"] is None or result["checkpoint"] else 1
