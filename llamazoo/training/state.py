"""Training checkpoints: everything a run needs to continue exactly where it stopped.

A checkpoint is a folder `checkpoints/step_{N}` inside output_dir, holding the model weights as a
HF folder (config.json + model.safetensors, so any checkpoint can be loaded by transformers), and
`train_state.pt` (optimizer, scheduler, fp32 master weights, sampler, RNG states) plus a readable
`train_state.json`. It is written into a hidden temporary folder and renamed into place, so a run
killed while saving leaves the previous checkpoint untouched and no half-written one that looks valid.

A parallel run (`CheckpointIO.sharded`) writes the same folder layout, but the model, optimizer and
fp32 master weights go into `dcp/` with torch.distributed.checkpoint: every rank writes its own shards
in parallel (no rank gathers the model) into a temporary folder that rank 0 renames into place once
all ranks have finished. Such a checkpoint resumes only at the same world size and layout.

How state dicts are gathered and who writes is in `CheckpointIO`, so that data/tensor parallel code
can substitute sharded or gathered versions without touching the loop.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from llamazoo.io.atomic import remove_stale_temps, replace_path, temp_path_beside
from llamazoo.io.damaged import DamagedFileError, reading, reason_of
from llamazoo.io.hf import iter_tensors, load_torch_file, read_json

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
    """Single-process defaults; a parallel setup overrides these and sets `is_writer` on one rank
    only and `sharded` (training checkpoints through torch.distributed.checkpoint) on all."""

    is_writer: bool = True
    sharded: bool = False

    def publish_hf_folder(self, output_dir: Path, model: nn.Module, tokenizer=None) -> None:
        """Writes the run's HF checkpoint files into output_dir itself (so `from_pretrained(output_dir)`
        works), staged in a hidden folder and moved file by file, leaving the run's other outputs in
        place. Parallel versions write from sharded state; call it on every rank."""
        from llamazoo.io.hf import save_state_dict_folder

        output_dir = Path(output_dir)
        staging = output_dir / ".hf-staging"
        shutil.rmtree(staging, ignore_errors=True)
        save_state_dict_folder(self.model_state_dict(model), model.config, staging, tokenizer=tokenizer)
        for f in sorted(staging.iterdir(), key=lambda p: p.name == "config.json"):  # config.json last
            os.replace(f, output_dir / f.name)
        staging.rmdir()

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
                    optimizer: torch.optim.Optimizer, keep_last: int, tokenizer=None, master=None) -> Path | None:
    """Writes checkpoints/step_{step} atomically and prunes all but the newest `keep_last`.

    `master`: the run's `MasterWeights` (bf16) or None."""
    from safetensors.torch import save_file

    if io.sharded:
        return save_sharded_checkpoint(output_dir, step, model, state, io, optimizer, keep_last, tokenizer, master)
    if master is not None:
        state = {**state, "master_weights": master.state_dict()}
    sd = io.model_state_dict(model)
    opt_sd = io.optimizer_state_dict(model, optimizer)
    if not io.is_writer:
        io.barrier()
        # the same answer as the writer's, so every rank takes the same (collective) save decisions
        return output_dir / "checkpoints" / f"step_{step}"
    root = output_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step}"
    tmp = temp_path_beside(final)
    tmp.mkdir()
    try:
        sd = {k: v.contiguous().cpu() for k, v in sd.items()}
        cfg = model.config.to_hf()
        cfg["torch_dtype"] = str(next(v.dtype for v in sd.values() if v.is_floating_point())).removeprefix("torch.")
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save(tmp)
        _write_train_state(tmp, {**state, "optimizer": opt_sd})
        for f in tmp.iterdir():
            _fsync(f)
        replace_path(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _prune(output_dir, keep_last)
    io.barrier()
    return final


def _prune(output_dir: Path, keep_last: int) -> None:
    for old in list_checkpoints(output_dir)[:-keep_last]:
        shutil.rmtree(old.path, ignore_errors=True)
    remove_stale_temps(output_dir / "checkpoints")  # left by a run killed while saving


def _write_train_state(folder: Path, state: dict[str, Any]) -> None:
    torch.save({**state, "rng": rng_state()}, folder / "train_state.pt")
    readable = {k: v for k, v in state.items() if isinstance(v, (int, float, str, dict, list, type(None)))
                and k not in ("scheduler", "master_weights", "optimizer")}
    (folder / "train_state.json").write_text(json.dumps(readable, indent=2, default=str) + "\n")


# -- parallel runs: torch.distributed.checkpoint ------------------------------------------------------------
DCP_DIR = "dcp"


def is_sharded_checkpoint(path: Path) -> bool:
    return (Path(path) / DCP_DIR / ".metadata").is_file()


def _dcp_state(model: nn.Module, optimizer: torch.optim.Optimizer, master) -> dict[str, Any]:
    """{"model": ..., "optim": ...[, "master": ...]} as DCP saves and loads them (DTensor shards stay
    sharded). With fp32 master weights the optimizer's parameters are the masters, so its state is keyed
    through `master.module`, which mirrors the model's parameter names with the master tensors."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    if master is None:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        return {"model": model_sd, "optim": optim_sd}
    master_sd, optim_sd = get_state_dict(master.module, optimizer)
    return {"model": get_model_state_dict(model), "optim": optim_sd, "master": master_sd}


def save_sharded_checkpoint(output_dir: Path, step: int, model: nn.Module, state: dict[str, Any], io: CheckpointIO,
                            optimizer: torch.optim.Optimizer, keep_last: int, tokenizer=None, master=None) -> Path:
    """A parallel run's checkpoint; every rank calls it. Each rank writes its shards into rank 0's
    temporary folder; rank 0 adds the small state files and renames the folder once all are done."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    root = output_dir / "checkpoints"
    final = root / f"step_{step}"
    box: list[Any] = [None]
    if io.is_writer:
        root.mkdir(parents=True, exist_ok=True)
        box[0] = str(temp_path_beside(final))
        Path(box[0]).mkdir()
    dist.broadcast_object_list(box, src=0)
    tmp = Path(box[0])
    error: BaseException | None = None
    try:
        # collective; returns on every rank after rank 0 wrote .metadata, i.e. after all shards exist
        dcp.save(_dcp_state(model, optimizer, master), checkpoint_id=str(tmp / DCP_DIR))
        if io.is_writer:
            if hasattr(model, "config"):
                (tmp / "config.json").write_text(json.dumps(model.config.to_hf(), indent=2) + "\n")
            if tokenizer is not None:
                tokenizer.save(tmp)
            _write_train_state(tmp, {**state, "format": "dcp", "master_weights_saved": master is not None})
            for f in tmp.rglob("*"):
                if f.is_file():
                    _fsync(f)
            replace_path(tmp, final)
            _prune(output_dir, keep_last)
    except BaseException as e:
        error = e
    ok = [error is None]
    dist.broadcast_object_list(ok, src=0)  # every rank learns whether the checkpoint now exists
    if error is not None:
        if io.is_writer:
            shutil.rmtree(tmp, ignore_errors=True)
        raise error
    if not ok[0]:
        raise RuntimeError(f"rank 0 failed to write the checkpoint {final}")
    return final


def load_sharded_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                            master=None) -> dict[str, Any]:
    """Loads a parallel checkpoint into the parallelized model, its optimizer and master weights (each
    rank reads its own shards); returns the training state (step, sampler, scheduler, RNG)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import CheckpointException
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

    path = Path(path)
    train_state = load_torch_file(path / "train_state.pt", weights_only=False, mmap=False)
    if bool(train_state.get("master_weights_saved")) != (master is not None):
        saved, now = ("bf16", "fp32") if train_state.get("master_weights_saved") else ("fp32", "bf16")
        raise ValueError(f"training.resume_from: {path} was written by a training.dtype={saved} run and this run "
                         f"is {now}; resume with the interrupted run's training.dtype")
    state = _dcp_state(model, optimizer, master)
    _check_dcp_files(path / DCP_DIR)
    try:
        dcp.load(state, checkpoint_id=str(path / DCP_DIR))
    except CheckpointException as e:  # a BaseException, whose text is every rank's traceback
        rank, (error, _) = next(iter(e.failures.items()), (0, (e, None)))
        raise ValueError(f"{path / DCP_DIR}: cannot load these torch.distributed.checkpoint shards into this run "
                         f"(rank {rank}: {type(error).__name__}: {reason_of(error)})") from None
    if master is None:
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    else:
        set_state_dict(master.module, optimizer, model_state_dict=state["master"], optim_state_dict=state["optim"])
        set_model_state_dict(model, state["model"])
    return train_state


def _check_dcp_files(folder: Path) -> None:
    """Reads the checkpoint's metadata and checks that every shard file holds the bytes it lists, so that a
    damaged or truncated file is one error naming it (torch.distributed.checkpoint would log tracebacks and
    raise one that names no file)."""
    from torch.distributed.checkpoint import FileSystemReader

    meta = folder / ".metadata"
    if not meta.is_file():
        raise FileNotFoundError(f"{meta}: missing; the checkpoint in {folder.parent} is incomplete")
    with reading(meta, "torch.distributed.checkpoint metadata"):
        storage = FileSystemReader(str(folder)).read_metadata().storage_data
        ends: dict[str, int] = {}
        for info in storage.values():
            ends[info.relative_path] = max(ends.get(info.relative_path, 0), info.offset + info.length)
    for name, end in sorted(ends.items()):
        shard = folder / name
        if not shard.is_file():
            raise FileNotFoundError(f"{shard}: missing; {meta} lists it")
        size = shard.stat().st_size
        if size < end:
            raise DamagedFileError(shard, "torch.distributed.checkpoint shard",
                                   f"{size} bytes; {meta.name} lists data up to byte {end}")


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
    weights = path / "model.safetensors"
    if is_sharded_checkpoint(path):
        saved = read_json(path / "train_state.json")
        world = saved.get("world_size", "?") if isinstance(saved, dict) else "?"
        raise ValueError(f"training.resume_from: {path} was written by a parallel run of "
                         f"{world} processes (torch.distributed.checkpoint shards in "
                         f"{DCP_DIR}/); resume it with torchrun at the same world size and layout")
    if not weights.is_file():
        raise FileNotFoundError(f"{path}: training checkpoint has no model.safetensors")
    state = load_torch_file(path / "train_state.pt", weights_only=False, mmap=False)
    return {name: t for name, t, _ in iter_tensors([weights])}, state
