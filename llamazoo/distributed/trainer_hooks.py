"""Plugs DDP / FSDP2 / TP into `llamazoo.training.trainer.train` through its `TrainHooks`.

The trainer stays single-process code: it asks the hooks to wrap the model, for its data-parallel
rank and group (the sampler takes rank's part of every global batch), and for state dicts. Here those
answers come from the DP x TP mesh: the DP group is one mesh dimension, rank 0 of the world writes the
logs and summary, training checkpoints are torch.distributed.checkpoint shards written by every rank,
and the final HF folder is gathered from sharded (DTensor) weights one tensor at a time.

(This module imports the trainer's hook types lazily: the trainer is the layer above.)
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import nn

from llamazoo.distributed.mesh import ParallelContext
from llamazoo.distributed.parallelize import parallelize


def make_checkpoint_io(ctx: ParallelContext, hf_dtype: torch.dtype | None = None):
    """A CheckpointIO for a parallel world: training checkpoints with torch.distributed.checkpoint (every
    rank writes its shards), the final HF folder gathered one tensor at a time, rank 0 the only writer
    of everything else. `model_state_dict` gives whole tensors on rank 0 (empty elsewhere).
    hf_dtype: the dtype of the final HF folder's weights (a bf16 run under FSDP2 trains fp32 shards and
    writes bf16, as one process, DDP and TP do)."""
    from llamazoo.training.state import CheckpointIO

    class ParallelCheckpointIO(CheckpointIO):
        is_writer = ctx.is_main
        sharded = ctx.distributed

        def model_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
            from llamazoo.io.hf import iter_full_tensors

            sd = {name: t for name, t in iter_full_tensors(model) if t is not None}
            return sd if ctx.is_main else {}

        def publish_hf_folder(self, output_dir, model: nn.Module, tokenizer=None) -> None:
            """The run's final HF files in output_dir, written from sharded state (one tensor gathered at a
            time; rank 0 never holds the whole model). For a trainer hook: call on every rank."""
            import os
            import shutil
            from pathlib import Path

            from llamazoo.io.hf import save_sharded_model

            staging = Path(output_dir) / ".hf-staging"
            if ctx.is_main:
                shutil.rmtree(staging, ignore_errors=True)
            save_sharded_model(model, staging, tokenizer=tokenizer, dtype=hf_dtype)
            if ctx.is_main:
                for f in sorted(staging.iterdir(), key=lambda p: p.name == "config.json"):  # config.json last
                    os.replace(f, Path(output_dir) / f.name)
                staging.rmdir()
            ctx.barrier()

    return ParallelCheckpointIO()


def training_hooks(ctx: ParallelContext, cfg):
    """TrainHooks for `cfg.parallel` on the mesh of `ctx` (a TrainConfig with a `parallel` section)."""
    from llamazoo.training.trainer import TrainHooks

    par = cfg.parallel
    fsdp = par.data_parallel == "fsdp" and ctx.dp_size > 1
    bf16 = cfg.training.dtype == "bf16"

    def wrap(model: nn.Module, _cfg) -> nn.Module:
        return parallelize(model, ctx, par.data_parallel, param_dtype=torch.bfloat16 if fsdp and bf16 else None)

    return TrainHooks(
        parallelize=wrap,
        checkpoint_io=make_checkpoint_io(ctx, torch.bfloat16 if fsdp and bf16 else None),
        dp_rank=ctx.dp_rank,
        dp_world_size=ctx.dp_size,
        dp_group=ctx.dp_mesh.get_group() if ctx.mesh is not None else None,
        grads_averaged=True,
        # FSDP2 keeps fp32 shards and computes in bf16 (MixedPrecisionPolicy): no master copy needed.
        handles_mixed_precision=fsdp and bf16,
        # lm_head belongs to the root FSDP unit: call it inside the model's forward.
        full_logits=fsdp,
    )


@contextlib.contextmanager
def parallel_training(cfg) -> Iterator[Any]:
    """Under torchrun: joins the world, yields TrainHooks for cfg.parallel, and leaves it on exit.

    A plain single process (no WORLD_SIZE) with default parallel settings yields None: the trainer's
    single-process defaults.
    """
    from llamazoo.distributed.mesh import env_world, init_parallel, shutdown

    _, world, _ = env_world()
    check_resume_world(cfg, max(1, world // cfg.parallel.tensor_parallel), world)
    if world == 1 and cfg.parallel.tensor_parallel == 1:
        yield None
        return
    ctx = init_parallel(cfg.parallel.tensor_parallel, cfg.model.torch_device())
    try:
        yield training_hooks(ctx, cfg)
    finally:
        shutdown()


def check_resume_world(cfg, dp_size: int, world_size: int | None = None) -> None:
    """A checkpoint resumes only with the data-parallel size and world size that wrote it.

    The sampler cuts each epoch into global batches of batch_size x DP size, so another DP size would
    silently train on other batches than the interrupted run would have; and a parallel checkpoint's
    torch.distributed.checkpoint shards are laid out for its world (DP x TP).
    """
    from pathlib import Path

    from llamazoo.io.hf import read_json
    from llamazoo.training.state import resolve_resume

    path = resolve_resume(cfg.training.resume_from, Path(cfg.training.output_dir))
    state = path / "train_state.json" if path is not None else None
    if state is None or not state.is_file():
        return
    info = read_json(state)
    if not isinstance(info, dict):
        raise ValueError(f"{state}: damaged training checkpoint (expected a JSON object)")
    saved = int(info.get("dp_world_size", 1))
    saved_world = int(info.get("world_size", saved))
    saved_tp = int(info.get("tensor_parallel", max(1, saved_world // saved)))
    world_size = dp_size if world_size is None else world_size
    tp = max(1, world_size // dp_size)
    if saved != dp_size or saved_world != world_size or saved_tp != tp:
        raise ValueError(f"training.resume_from: {path} was written by a run with {saved} data-parallel "
                         f"worker(s) x tensor_parallel {saved_tp} ({saved_world} process(es)) and this run has "
                         f"{dp_size} x {tp} ({world_size}); resume with the same world size and layout (torchrun "
                         f"--nproc_per_node / --nnodes and parallel.tensor_parallel as before)")
