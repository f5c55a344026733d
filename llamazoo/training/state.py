"""Training checkpoints: everything a run needs to continue exactly where it stopped.

A checkpoint is a folder `checkpoints/step_{N}` inside output_dir, holding the model weights as a
HF folder (config.json + model.safetensors, so any checkpoint can be loaded by transformers), and
`train_state.pt` (optimizer, scheduler, fp32 master weights, sampler, RNG states) plus a readable
`train_state.json`. It is written into a hidden temporary folder and renamed into place, so a run
killed while saving leaves the previous checkpoint untouched and no half-written one that looks valid.

How state dicts are gathered and who writes is in `CheckpointIO`, so that data/tensor parallel code
can substitute sharded or gathered versions without touching the loop.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

CHECKPOINT_DIR = re.compile(r"^step_(\d+)$")


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class CheckpointIO:
    """Single-process defaults; a parallel setup overrides these (e.g. full state dicts gathered to
    rank 0 with torch.distributed.checkpoint.state_dict) and sets `is_writer` on one rank only."""

    is_writer: bool = True

    def model_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        sd = {k: v.detach() for k, v in model.state_dict().items()}
        if getattr(getattr(model, "config", None), "tie_word_embeddings", False):
            sd.pop("lm_head.weight", None)
        return sd

    def load_model_state_dict(self, model: nn.Module, sd: dict[str, torch.Tensor]) -> None:
        missing, unexpected = model.load_state_dict(sd, strict=False)
        missing = [m for m in missing if m != "lm_head.weight"]
        if missing or unexpected:
            raise ValueError(f"checkpoint does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}")

    def optimizer_state_dict(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        return optimizer.state_dict()

    def load_optimizer_state_dict(self, model: nn.Module, optimizer: torch.optim.Optimizer, sd: dict[str, Any]) -> None:
        optimizer.load_state_dict(sd)

    def barrier(self) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()


@dataclass
class Checkpoint:
    path: Path
    step: int


def list_checkpoints(output_dir: Path) -> list[Checkpoint]:
    root = output_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = CHECKPOINT_DIR.match(p.name)
        if m and (p / "train_state.pt").is_file():
            found.append(Checkpoint(p, int(m.group(1))))
    return sorted(found, key=lambda c: c.step)


def resolve_resume(resume_from: str | None, output_dir: Path) -> Path | None:
    """`auto` -> the latest complete checkpoint in output_dir (None when there is none yet)."""
    if not resume_from:
        return None
    if resume_from == "auto":
        found = list_checkpoints(output_dir)
        return found[-1].path if found else None
    p = Path(resume_from)
    if not (p / "train_state.pt").is_file():
        raise FileNotFoundError(f"training.resume_from: {p} is not a training checkpoint (no train_state.pt); "
                                f"expected a folder like {output_dir / 'checkpoints' / 'step_100'} or 'auto'")
    return p


def save_checkpoint(output_dir: Path, step: int, model: nn.Module, state: dict[str, Any], io: CheckpointIO,
                    optimizer: torch.optim.Optimizer, keep_last: int, tokenizer=None) -> Path | None:
    """Writes checkpoints/step_{step} atomically and prunes all but the newest `keep_last`."""
    from safetensors.torch import save_file

    sd = io.model_state_dict(model)
    opt_sd = io.optimizer_state_dict(model, optimizer)
    if not io.is_writer:
        io.barrier()
        # the same answer as the writer's, so every rank takes the same (collective) save decisions
        return output_dir / "checkpoints" / f"step_{step}"
    root = output_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step}"
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-step_{step}-", dir=root))
    try:
        sd = {k: v.contiguous().cpu() for k, v in sd.items()}
        cfg = model.config.to_hf()
        cfg["torch_dtype"] = str(next(v.dtype for v in sd.values() if v.is_floating_point())).removeprefix("torch.")
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save(tmp)
        torch.save({**state, "optimizer": opt_sd, "rng": rng_state()}, tmp / "train_state.pt")
        readable = {k: v for k, v in state.items() if isinstance(v, (int, float, str, dict, list, type(None)))
                    and k not in ("scheduler", "master_weights")}
        (tmp / "train_state.json").write_text(json.dumps(readable, indent=2, default=str) + "\n")
        for f in tmp.iterdir():
            _fsync(f)
        if final.exists():  # a re-save of the same step (e.g. after resuming): replace it
            old = root / f".old-step_{step}-{os.getpid()}"
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(output_dir)[:-keep_last]:
        shutil.rmtree(old.path, ignore_errors=True)
    for stale in root.glob(".tmp-step_*"):  # left by a run killed while saving
        if stale != tmp:
            shutil.rmtree(stale, ignore_errors=True)
    io.barrier()
    return final


def _fsync(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(model state dict, training state) of a checkpoint folder."""
    from safetensors.torch import load_file

    weights = path / "model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"{path}: training checkpoint has no model.safetensors")
    state = torch.load(path / "train_state.pt", map_location="cpu", weights_only=False)
    return load_file(str(weights)), state
