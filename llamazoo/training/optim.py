"""AdamW, learning-rate schedules, gradient clipping and fp32 master weights for bf16 training.

bf16 training keeps the model's weights in bf16 (so the Model Zoo precision knobs mean what they
mean at inference) and an fp32 master copy that the optimizer updates: a bf16 weight cannot absorb
an update of 1e-5 relative size, so updating it in place would silently stop learning.
"""
from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float, params: list[torch.Tensor] | None = None) -> list[dict]:
    """Decay matrices only; norms and biases (1-D) are not decayed. `params` (same order as
    model.parameters()) substitutes master copies for the model's own parameters.

    Each group holds one kind of tensor (see `tensor_kind`): torch's foreach and fused AdamW kernels
    take a whole group's list in one call and cannot mix plain tensors with DTensors, which a
    tensor-parallel model has (replicated norms, and embeddings whose vocabulary does not divide by
    the TP size, beside sharded matrices). A model of one kind gets the usual one or two groups."""
    own = [p for p in model.parameters() if p.requires_grad]
    params = own if params is None else params
    groups: dict[tuple, list[torch.Tensor]] = {}
    for decayed in (True, False):
        for p, q in zip(own, params):
            if (p.ndim >= 2) == decayed:
                groups.setdefault((decayed, tensor_kind(q)), []).append(q)
    return [{"params": ps, "weight_decay": weight_decay if decayed else 0.0} for (decayed, _), ps in groups.items()]


def tensor_kind(t: torch.Tensor) -> tuple:
    """What a foreach kernel needs alike in one call: plain tensor, or DTensor on one device mesh."""
    mesh = getattr(t, "device_mesh", None)
    if mesh is None:
        return ("tensor",)
    return ("dtensor", mesh.device_type, tuple(mesh.mesh.flatten().tolist()), mesh.mesh_dim_names)


def lr_lambda(schedule: str, base_lr: float, min_lr: float, warmup_steps: int, total_steps: int):
    """Multiplier of base_lr for optimizer step s (0-based): linear warmup to base_lr over
    warmup_steps, then constant, linear decay to min_lr, or cosine decay to min_lr at total_steps."""
    floor = min_lr / base_lr if base_lr > 0 else 0.0

    def f(s: int) -> float:
        if warmup_steps > 0 and s < warmup_steps:
            return (s + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        span = max(1, total_steps - warmup_steps)
        progress = min(1.0, (s - warmup_steps) / span)
        if schedule == "linear":
            return floor + (1.0 - floor) * (1.0 - progress)
        if schedule == "cosine":
            return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
        raise ValueError(f"training.lr_schedule: unknown schedule {schedule!r}; expected constant, linear or cosine")

    return f


class MasterWeights:
    """fp32 copies of low-precision parameters: grads are copied up before the optimizer step and
    the updated weights copied back down after it."""

    def __init__(self, model: nn.Module):
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.model_params = [p for _, p in named]
        # Parameters (DTensors under tensor parallel, shaped like the model's own shards)
        self.master = [nn.Parameter(p.detach().float().clone()) for p in self.model_params]
        self.module = _mirror([n for n, _ in named], self.master)

    def grads_to_master(self) -> None:
        for p, m in zip(self.model_params, self.master):
            m.grad = None if p.grad is None else p.grad.float()
            p.grad = None

    @torch.no_grad()
    def master_to_model(self) -> None:
        for p, m in zip(self.model_params, self.master):
            p.copy_(m)

    def state_dict(self) -> list[torch.Tensor]:
        return [m.detach() for m in self.master]

    @torch.no_grad()
    def load_state_dict(self, tensors: list[torch.Tensor]) -> None:
        if len(tensors) != len(self.master):
            raise ValueError(f"checkpoint has {len(tensors)} master weights, the model {len(self.master)}")
        for m, t in zip(self.master, tensors):
            m.copy_(t)
        self.master_to_model()


def _mirror(names: list[str], params: list[nn.Parameter]) -> nn.Module:
    """A module holding `params` under the model's parameter names, so that name-keyed state dicts
    (torch.distributed.checkpoint's get_state_dict) address the master weights and their optimizer
    state exactly as they would the model's."""
    root = nn.Module()
    for name, p in zip(names, params):
        *path, leaf = name.split(".")
        m = root
        for part in path:
            if not hasattr(m, part):
                m.add_module(part, nn.Module())
            m = getattr(m, part)
        m.register_parameter(leaf, p)
    return root


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, master: MasterWeights | None = None,
                    betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> torch.optim.Optimizer:
    """torch AdamW: the fused kernel where the device has one and no parameter is a DTensor, foreach
    otherwise; either way `param_groups` gives each kernel call one kind of tensor."""
    params = master.master if master is not None else None
    groups = param_groups(model, weight_decay, params)
    device = next((p.device for g in groups for p in g["params"]), torch.device("cpu"))
    fused = device.type in ("cuda", "cpu") and not _has_dtensor(groups)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused or None, foreach=None if fused else True)


def _has_dtensor(groups: list[dict]) -> bool:
    return any(tensor_kind(p)[0] == "dtensor" for g in groups for p in g["params"])


def clip_grad_norm(params: Iterable[torch.Tensor], max_norm: float | None) -> torch.Tensor:
    """Total gradient norm (fp32); gradients are scaled down to max_norm when it is set."""
    params = [p for p in params if p.grad is not None]
    if not params:
        return torch.zeros(())
    if _has_dtensor([{"params": params}]):  # TP / FSDP2 shards: torch's version cannot mix them with tensors
        from llamazoo.distributed.parallelize import clip_grad_norm as sharded_clip_grad_norm

        return sharded_clip_grad_norm(params, max_norm)
    return torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm else float("inf"), foreach=True)


def scheduler_for(optimizer: torch.optim.Optimizer, schedule: str, base_lr: float, min_lr: float,
                  warmup_steps: int, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(schedule, base_lr, min_lr, warmup_steps, total_steps))


__all__ = ["build_optimizer", "scheduler_for", "clip_grad_norm", "MasterWeights", "lr_lambda", "param_groups"]
