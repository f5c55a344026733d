"""Tensor-parallel `torchrun --nproc_per_node N -m llamazoo generate ... parallel.tensor_parallel=N`.

Every rank runs the same generation loop on its shard of the model (attention heads, MLP columns,
vocabulary; the KV cache sharded by heads). The logits are all-gathered, so all ranks see identical
values and, with the same seed, pick identical tokens; only rank 0 prints and writes the report.
"""
from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator


@contextlib.contextmanager
def parallel_generation(cfg) -> Iterator[dict[str, Any]]:
    """Keyword arguments for `run_generation` (a model loader; silent output on ranks other than 0).

    Yields {} for a plain single process. Generation parallelizes one model: the world must be one
    tensor-parallel group (data parallel would only repeat the same prompts).
    """
    from llamazoo.distributed.mesh import env_world, init_parallel, shutdown
    from llamazoo.distributed.parallelize import load_parallel_model

    _, world, _ = env_world()
    tp = cfg.parallel.tensor_parallel
    if world == 1 and tp == 1:
        yield {}
        return
    if world != tp:
        raise ValueError(f"generate runs one tensor-parallel model: set parallel.tensor_parallel={world} "
                         f"(the number of processes) instead of {tp}")
    if cfg.generation.compile is True:
        raise ValueError("generation.compile=true is not supported with parallel.tensor_parallel > 1")
    ctx = init_parallel(tp, cfg.model.torch_device())

    def loader(path: str, dtype=None, device=None, opts=None, **_: Any):
        return load_parallel_model(path, ctx, "ddp", dtype=dtype, opts=opts).eval()

    kwargs: dict[str, Any] = {"model_loader": loader}
    sink = None
    if not ctx.is_main:
        sink = open(os.devnull, "w")
        kwargs.update(out=sink, err=sink)
        cfg.generation.output_dir = None
    try:
        yield kwargs
    finally:
        if sink is not None:
            sink.close()
        shutdown()


# -- llamazoo serve -------------------------------------------------------------------------------------
def _mirrored_slot_cache():
    """SlotCache whose cache-changing calls on rank 0 are first broadcast to the other ranks, which make
    the same calls on their shards (`follow`): the model's collectives then line up on every rank."""
    import torch.distributed as dist

    from llamazoo.generation.engine import SlotCache

    class MirroredSlotCache(SlotCache):
        _mirror = False  # set after __init__: the start-up probe runs on every rank by itself

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._mirror = True

        def _tell(self, op: str, *args) -> None:
            if self._mirror:
                dist.broadcast_object_list([(op, args)], src=0)

        def prefill_rows(self, first, chunks):  # `prefill` comes here too
            self._tell("prefill_rows", first, [(list(ids), start) for ids, start in chunks])
            return super().prefill_rows(first, chunks)

        def decode(self, tokens, lengths):
            self._tell("decode", list(tokens), list(lengths))
            return super().decode(tokens, lengths)

        def swap(self, a, b, n):
            self._tell("swap", a, b, n)
            super().swap(a, b, n)

        def copy_prefix(self, src, dst, n):
            self._tell("copy_prefix", src, dst, n)
            super().copy_prefix(src, dst, n)

        def close(self) -> None:
            self._tell("stop")
            self._mirror = False

    return MirroredSlotCache


def follow(cfg, model_loader) -> int:
    """A rank other than 0 under `llamazoo serve`: loads its shard, builds the same SlotCache as rank 0's
    scheduler, then repeats rank 0's calls until it says stop. SIGTERM/SIGINT are left to rank 0 (torchrun
    sends them to every rank), which ends the world when its streams are done."""
    import signal

    import torch.distributed as dist

    from llamazoo.generation.app import load
    from llamazoo.generation.engine import Engine, SlotCache
    from llamazoo.generation.packed import BATCHED_HINT

    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, signal.SIG_IGN)
    loaded = load(cfg, model_loader)
    max_seq_length = cfg.model.max_seq_length or loaded.model.config.max_position_embeddings
    engine = Engine(loaded.model, loaded.tokenizer, max_seq_length=max_seq_length, pack_batch_hint=BATCHED_HINT)
    slots = SlotCache(engine, max(cfg.serve.max_concurrent, 2), max_seq_length,
                      batch_invariant=cfg.serve.batch_invariant)
    while True:
        box = [None]
        dist.broadcast_object_list(box, src=0)
        op, args = box[0]
        if op == "stop":
            return 0
        getattr(slots, op)(*args)


@contextlib.contextmanager
def parallel_serving(cfg) -> Iterator[dict[str, Any]]:
    """`torchrun --nproc_per_node N -m llamazoo serve ... parallel.tensor_parallel=N`: rank 0 serves HTTP
    and schedules, every rank runs the model's forward passes on its shard.

    Yields {} for a plain single process; on rank 0 {"model_loader", "slot_cache"} for `run_server`; on
    the other ranks {"follow": a function running `follow`}. The process group gets a timeout of a year:
    the other ranks wait for rank 0's next call for as long as the server idles.
    """
    from llamazoo.distributed.mesh import env_world, init_parallel, shutdown
    from llamazoo.distributed.parallelize import load_parallel_model

    _, world, _ = env_world()
    tp = cfg.parallel.tensor_parallel
    if world == 1 and tp == 1:
        yield {}
        return
    if world != tp:
        raise ValueError(f"serve runs one tensor-parallel model: set parallel.tensor_parallel={world} "
                         f"(the number of processes) instead of {tp}")
    ctx = init_parallel(tp, cfg.model.torch_device(), timeout_s=365 * 86400.0)

    def loader(path: str, dtype=None, device=None, opts=None, **_: Any):
        return load_parallel_model(path, ctx, "ddp", dtype=dtype, opts=opts).eval()

    try:
        if ctx.is_main:
            yield {"model_loader": loader, "slot_cache": _mirrored_slot_cache()}
        else:
            yield {"follow": lambda: follow(cfg, loader)}
    finally:
        shutdown()
