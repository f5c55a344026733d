"""Data parallel (DDP or FSDP2), tensor parallel (DTensor) and both, applied to an unchanged model.

The model knows nothing of parallelism: its attention reshapes with `view(B, T, -1, head_dim)`, so a
column-sharded q/k/v projection simply yields the local heads, and `setup_cache` sizes the KV cache
from the local k_proj rows (the cache is sharded by heads). Everything here wraps or re-parametrizes
modules from the outside.

Tensor-parallel plan (Megatron style, one all-reduce per attention and per MLP in the forward):
  q/k/v/gate/up_proj  column-wise: weight rows sharded, replicated input, local output heads/features
  o/down_proj         row-wise: weight columns sharded, local input, all-reduced (replicated) output
  embed_tokens        row-wise over the vocabulary (when it divides), replicated output
  lm_head             column-wise over the vocabulary, logits gathered (replicated)
  norms               plain replicated tensors; their gradients agree on every TP rank.
A vocabulary that does not divide by the TP size leaves embed_tokens and lm_head whole on every rank,
plain tensors like the norms. So a TP model mixes plain tensors and DTensors (FSDP2 over it makes all
of them DTensors, on two meshes); `clip_grad_norm` below and the optimizer's parameter groups
(llamazoo.training.optim.param_groups: one kind of tensor per group) are built for that mix.
"""
from __future__ import annotations

import contextlib
from typing import Iterable, Iterator, Literal

import torch
from torch import nn

from llamazoo.distributed.mesh import ParallelContext
from llamazoo.model.llama import LlamaConfig, LlamaForCausalLM

DataParallel = Literal["ddp", "fsdp"]


# -- checks ---------------------------------------------------------------------------------------------
def check_tensor_parallel(cfg: LlamaConfig, tp: int) -> None:
    """Fails with the sizes involved when the model cannot be split into `tp` equal head groups."""
    if tp <= 1:
        return
    problems = []
    if cfg.num_key_value_heads % tp:
        problems.append(f"num_key_value_heads={cfg.num_key_value_heads}")
    if cfg.num_attention_heads % tp:
        problems.append(f"num_attention_heads={cfg.num_attention_heads}")
    if cfg.intermediate_size % tp:
        problems.append(f"intermediate_size={cfg.intermediate_size}")
    if problems:
        divisors = [d for d in range(1, cfg.num_key_value_heads + 1)
                    if cfg.num_key_value_heads % d == 0 and cfg.num_attention_heads % d == 0
                    and cfg.intermediate_size % d == 0]
        raise ValueError(f"parallel.tensor_parallel={tp} must divide {', '.join(problems)} "
                         f"(key/value heads are split across tensor-parallel ranks); "
                         f"possible sizes: {', '.join(map(str, divisors))}")


# -- tensor parallel ------------------------------------------------------------------------------------
def tensor_parallel_plan(model: LlamaForCausalLM, tp: int) -> dict:
    """The module FQN -> ParallelStyle map for `parallelize_module`."""
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    cfg = model.config
    plan: dict = {}
    if cfg.vocab_size % tp == 0:
        plan["model.embed_tokens"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate())
        plan["lm_head"] = ColwiseParallel(output_layouts=Replicate())
    for i in range(len(model.model.layers)):
        p = f"model.layers.{i}."
        for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"):
            plan[p + name] = ColwiseParallel()
        for name in ("self_attn.o_proj", "mlp.down_proj"):
            plan[p + name] = RowwiseParallel()
    return plan


def apply_tensor_parallel(model: LlamaForCausalLM, tp_mesh) -> LlamaForCausalLM:
    """Shards the linear layers (and the vocabulary) over `tp_mesh`, in place.

    Works on a meta-device model too (then load with `llamazoo.io.hf.load_sharded_weights`). The full
    weights of a materialized model are taken from TP rank 0 (DTensor's `src_data_rank`), so all ranks
    agree even if their copies differ.
    """
    from torch.distributed.tensor.parallel import parallelize_module

    tp = tp_mesh.size()
    check_tensor_parallel(model.config, tp)
    tied = model.config.tie_word_embeddings
    parallelize_module(model, tp_mesh, tensor_parallel_plan(model, tp))
    if tied:
        # Both plans shard the (vocab, hidden) weight by rows, so the two views are the same DTensor.
        model.lm_head.weight = model.model.embed_tokens.weight
    return model


# -- data parallel --------------------------------------------------------------------------------------
def apply_fsdp(model: LlamaForCausalLM, dp_mesh, param_dtype: torch.dtype | None = None,
               reduce_dtype: torch.dtype | None = None, reshard_after_forward: bool = True) -> LlamaForCausalLM:
    """FSDP2 (`fully_shard`): each decoder layer a unit, the root holding embeddings, norm and lm_head."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # Gradients are reduced in fp32 when computing in bf16; inputs are not cast, so that the residual
    # stream stays fp32 (the fp32_skip_add knob) exactly as in a single-process bf16 model.
    if param_dtype is not None and reduce_dtype is None:
        reduce_dtype = torch.float32
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype, cast_forward_inputs=False)
    for layer in model.model.layers:
        fully_shard(layer, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    return model


def apply_ddp(model: nn.Module, ctx: ParallelContext) -> nn.Module:
    """torch's DistributedDataParallel over the data-parallel group (gradients averaged)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    if ctx.tp_size > 1:
        # torch's DDP does not reduce DTensor gradients (and its FSDP2-based `replicate` is private and,
        # in torch 2.13, drops the optimizer's updates under TP), so DP x TP goes through FSDP2.
        raise ValueError(f"parallel.data_parallel=ddp cannot be combined with parallel.tensor_parallel="
                         f"{ctx.tp_size}: torch's DistributedDataParallel does not reduce tensor-parallel "
                         f"(DTensor) gradients; use parallel.data_parallel=fsdp")
    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DDP(model, process_group=ctx.dp_mesh.get_group(), device_ids=ids)


def parallelize(model: LlamaForCausalLM, ctx: ParallelContext, data_parallel: DataParallel = "ddp",
                param_dtype: torch.dtype | None = None) -> nn.Module:
    """TP over ctx.tp_mesh, then DDP or FSDP over ctx.dp_mesh. Returns the module to train.

    With DDP the result wraps the model (use `unwrap` for `config`, `setup_cache`, saving); FSDP2 and
    TP keep the model's own class. A world of one returns the model untouched.
    """
    if data_parallel not in ("ddp", "fsdp"):
        raise ValueError(f"parallel.data_parallel must be 'ddp' or 'fsdp' (got {data_parallel!r})")
    if not ctx.distributed:
        return model
    if ctx.tp_size > 1:
        apply_tensor_parallel(model, ctx.tp_mesh)
    if ctx.dp_size > 1:
        if data_parallel == "fsdp":
            return apply_fsdp(model, ctx.dp_mesh, param_dtype=param_dtype)
        return apply_ddp(model, ctx)
    return model


def unwrap(model: nn.Module) -> LlamaForCausalLM:
    """The LlamaForCausalLM inside a DDP wrapper (or the model itself)."""
    return model.module if hasattr(model, "module") and isinstance(model.module, LlamaForCausalLM) else model


@contextlib.contextmanager
def no_gradient_sync(model: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Skips the data-parallel gradient reduction inside (gradient-accumulation micro-steps).

    Leave the last micro-step of an optimizer step outside, so it reduces the accumulated gradients.
    """
    if not enabled:
        yield
        return
    if hasattr(model, "no_sync"):  # DDP
        with model.no_sync():
            yield
    elif hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


# -- helpers for the training loop -----------------------------------------------------------------------
def local_tensor(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a DTensor (a collective: call it on every rank), or the tensor itself."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def clip_grad_norm(parameters: Iterable[nn.Parameter], max_norm: float | None) -> torch.Tensor:
    """Global L2 gradient norm over all ranks and shards, clipped to max_norm (None/0/inf: only the norm).

    Works for any mix of plain (replicated, DDP) and DTensor (TP, FSDP2) gradients, which torch's own
    clip_grad_norm_ refuses to mix. Squares of DTensor gradients that share a mesh and placements are
    summed locally first, so there is one small all-reduce per kind of sharding, not one per tensor.
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    plain = torch.zeros((), dtype=torch.float32, device=local_tensor(grads[0]).device)
    partial: dict[tuple, torch.Tensor] = {}
    for g in grads:
        sq = g.detach().float().pow(2).sum()
        if hasattr(sq, "full_tensor"):
            key = (id(sq.device_mesh), tuple(map(str, sq.placements)))
            partial[key] = sq if key not in partial else partial[key] + sq
        else:
            plain += sq
    total = plain + sum((d.full_tensor().to(plain.device) for d in partial.values()), torch.zeros_like(plain))
    norm = total.sqrt()
    if max_norm and max_norm != float("inf"):
        coef = float(torch.clamp(max_norm / (norm + 1e-6), max=1.0))
        if coef < 1.0:
            for g in grads:
                g.detach().mul_(coef)
    return norm


# -- building a parallel model ---------------------------------------------------------------------------
def load_parallel_model(path_or_name: str, ctx: ParallelContext, data_parallel: DataParallel = "ddp",
                        dtype: torch.dtype | str | None = None, opts=None, seed: int | None = None,
                        param_dtype: torch.dtype | None = None) -> nn.Module:
    """`llamazoo.io.hf.load_model` for a parallel world: the model built, parallelized and loaded.

    A HF folder under TP or FSDP is built on the meta device, sharded, and each rank reads only its
    blocks of the safetensors files. DDP keeps a full replica per rank, so it loads normally. A named
    config or config.json (random init) is built whole on every rank with the same seed, then sharded.
    """
    from pathlib import Path

    from llamazoo.io.default import resolve_checkpoint
    from llamazoo.io.hf import (build_model, checkpoint_dtype, dtype_name, load_model, load_sharded_weights,
                                parse_dtype, read_config)
    from llamazoo.model.registry import NAMED_CONFIGS

    if not ctx.distributed:
        return load_model(path_or_name, dtype=dtype, device=ctx.device, opts=opts, seed=seed)
    if ctx.is_main:
        path = resolve_checkpoint(path_or_name)  # may unpack the embedded default: once, on rank 0
    ctx.barrier()
    path = resolve_checkpoint(path_or_name)
    folder = Path(path)
    random_init = (isinstance(path_or_name, str) and path_or_name in NAMED_CONFIGS) or folder.is_file()
    check_tensor_parallel(read_config(path), ctx.tp_size)
    if random_init or (data_parallel == "ddp" and ctx.tp_size == 1):
        model = load_model(path_or_name, dtype=dtype, device=ctx.device, opts=opts, seed=seed)
        return parallelize(model, ctx, data_parallel, param_dtype=param_dtype)
    cfg = read_config(folder)
    target = parse_dtype(dtype) or checkpoint_dtype(folder, cfg)
    model = build_model(cfg, opts, device="meta").to(target)
    model = parallelize(model, ctx, data_parallel, param_dtype=param_dtype)
    load_sharded_weights(unwrap(model), folder, ctx.device)
    unwrap(model).config.torch_dtype = dtype_name(target)
    return model.eval()
