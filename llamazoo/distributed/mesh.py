"""Process groups and the 2-D device mesh (data parallel x tensor parallel), from torchrun's environment.

torchrun (or any launcher setting RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) starts the
processes; this module only joins them: nccl on CUDA, gloo on CPU. A plain `python -m llamazoo ...`
(no WORLD_SIZE) is a world of one and needs no process group at all, so single-process runs never pay
for torch.distributed.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import NoReturn

import torch
import torch.distributed as dist


@dataclass
class ParallelContext:
    """Where this process sits: global rank, its data-parallel and tensor-parallel coordinates, device.

    `mesh` is a DeviceMesh with dims ("dp", "tp") when the world has more than one process, else None.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    dp_size: int = 1
    dp_rank: int = 0
    tp_size: int = 1
    tp_rank: int = 0
    device: torch.device = torch.device("cpu")
    mesh: "dist.device_mesh.DeviceMesh | None" = None

    @property
    def is_main(self) -> bool:
        """Rank 0 logs, evaluates and writes files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def dp_mesh(self):
        return None if self.mesh is None else self.mesh["dp"]

    @property
    def tp_mesh(self):
        return None if self.mesh is None else self.mesh["tp"]

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def broadcast_object(self, obj):
        """Rank 0's Python object on every rank (e.g. a resolved path or a random seed)."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_reduce_sum(self, value: float | torch.Tensor) -> float:
        """Sum of a scalar over the data-parallel ranks (tensor-parallel ranks hold the same value)."""
        if self.dp_size == 1:
            return float(value)
        t = torch.tensor(float(value), dtype=torch.float64,
                         device=self.device if self.device.type != "cpu" else "cpu")
        dist.all_reduce(t, group=self.dp_mesh.get_group())
        return float(t)


_joined_world = False  # init_parallel joined a torchrun world of several processes (see exit_process)


def env_world() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) as torchrun sets them; (0, 1, 0) without a launcher."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)))


def default_backend(device_type: str) -> str:
    return "nccl" if device_type == "cuda" else "gloo"


def init_parallel(tensor_parallel: int = 1, device: str | torch.device | None = None,
                  timeout_s: float = 1800.0) -> ParallelContext:
    """Joins the torchrun world (if any) and builds the DP x TP mesh; DP size = world / TP size.

    device: "cpu", "cuda" or None (cuda when available). On CUDA each process takes `cuda:LOCAL_RANK`.
    Tensor-parallel groups are consecutive ranks, so with one node per TP group its all-reduces stay
    on the node's fast links.
    """
    rank, world, local_rank = env_world()
    if device is None or str(device) == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank if dev.index is None else dev.index)
        torch.cuda.set_device(dev)
    tp = int(tensor_parallel)
    if tp < 1:
        raise ValueError(f"parallel.tensor_parallel must be >= 1 (got {tp})")
    if world % tp:
        raise ValueError(f"parallel.tensor_parallel={tp} does not divide the number of processes ({world}); "
                         f"launch a multiple of {tp} processes, e.g. torchrun --nproc_per_node {tp} -m llamazoo ...")
    ctx = ParallelContext(rank=rank, world_size=world, local_rank=local_rank, dp_size=world // tp,
                          tp_size=tp, device=dev)
    if world == 1:
        return ctx
    global _joined_world
    _joined_world = True
    if not dist.is_initialized():  # a second call (another layout in the same world) reuses the group
        dist.init_process_group(backend=default_backend(dev.type), timeout=timedelta(seconds=timeout_s),
                                **({"device_id": dev} if dev.type == "cuda" else {}))
    from torch.distributed.device_mesh import init_device_mesh

    ctx.mesh = init_device_mesh(dev.type, (world // tp, tp), mesh_dim_names=("dp", "tp"))
    ctx.dp_rank = ctx.mesh.get_local_rank("dp")
    ctx.tp_rank = ctx.mesh.get_local_rank("tp")
    return ctx


def shutdown() -> None:
    """Leaves the torchrun world, if this process joined one: all ranks wait for each other (no collective
    is left unmatched), then the process groups are destroyed. Call it on every rank."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def exit_process(code: int | None = 0) -> NoReturn:
    """Ends the process with exit status `code`; for the entry points torchrun runs (`python -m llamazoo`).

    Without a torchrun world this is `sys.exit(code)`. Otherwise: leave the world (`shutdown`), do what an
    exit does (gc, atexit handlers, flush stdout/stderr), then `os._exit(code)`, skipping interpreter
    finalization. Why: a gloo worker thread drops its reference to a finished collective (and its tensors,
    whose Python objects need the GIL) only after the caller saw it complete; if that falls into
    finalization, Python kills the thread taking the GIL and C++ aborts the process ("terminate called
    without an active exception", SIGABRT) with all work done. Destroying the groups does not join those
    threads, since torch keeps the groups alive until then (DTensor sharding caches -> meshes ->
    `_pg_registry`; `torch.distributed.nn.functional` default arguments); a barrier or gc only narrows it.
    """
    shutdown()
    if not _joined_world:
        sys.exit(code)
    import atexit
    import gc

    status = 0 if code is None else int(code)
    try:
        gc.collect()  # finalizers of garbage in cycles (e.g. files closed, so written out)
        atexit._run_exitfuncs()  # logging.shutdown, weakref.finalize(atexit=True), ...
    finally:
        for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
            try:
                if stream is not None:
                    stream.flush()
            except (OSError, ValueError):  # closed or broken pipe: nothing left to save
                pass
        os._exit(status)
