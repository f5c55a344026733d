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
    if cfg.generation.compile:
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
