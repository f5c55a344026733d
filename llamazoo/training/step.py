"""The arithmetic of one optimizer step: loss, gradients, clipping, update.

The loss of a step is global: the weighted sum of per-token losses over all micro-batches and all
data-parallel ranks, divided by the weight sum over the same. Each micro-batch backpropagates
`local weighted sum / global weight sum` (times the DP size, since DDP and FSDP average gradients),
so any batch split gives the gradient of one big batch.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ContextManager

import torch
import torch.nn.functional as F
from torch import nn

from llamazoo.data.masks import IGNORE_INDEX
from llamazoo.training.batch import Batch
from llamazoo.training.loss import weighted_linear_cross_entropy
from llamazoo.training.optim import MasterWeights, clip_grad_norm


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. a non-finite loss); printed as one line by the CLI."""


@dataclass(frozen=True)
class DataParallel:
    """This process's data-parallel group (rank 0 of 1 in a single process)."""

    rank: int = 0
    size: int = 1
    group: Any = None
    # the model wrapper averages gradients over the group (DDP, FSDP): the loss is scaled back up
    grads_averaged: bool = True

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM, group=self.group)
        return t


def unwrap(model: nn.Module) -> nn.Module:
    """The LlamaForCausalLM inside DDP / torch.compile wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            return model
        model = inner


def loss_sums(model: nn.Module, batch: Batch, full_logits: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(weighted sum of per-token losses, weight sum), both fp32 scalars.

    The LM head runs only on positions with a non-zero weight, so padding and prompt tokens with
    prompt_loss_weight 0 cost no vocabulary-sized work; the logits are fp32 per the fp32_logits knob
    (and always fp32 inside the loss, as transformers does)."""
    weights = batch.weights
    if full_logits:
        logits = model(batch.input_ids, position_ids=batch.position_ids, attention_mask=batch.attention_mask)
        per_token = F.cross_entropy(logits.flatten(0, 1).float(), batch.labels.flatten(), reduction="none",
                                    ignore_index=IGNORE_INDEX)
        return (per_token * weights.flatten()).sum(), weights.sum()
    hidden = model(batch.input_ids, position_ids=batch.position_ids, attention_mask=batch.attention_mask,
                   return_hidden=True)
    core = unwrap(model)
    flat_w = weights.flatten()
    keep = flat_w.nonzero().squeeze(1)
    head = core.lm_head
    h = hidden.flatten(0, 1).index_select(0, keep).to(head.weight.dtype)
    labels, w = batch.labels.flatten().index_select(0, keep), flat_w.index_select(0, keep)
    if type(head.weight).__name__ != "DTensor" and head.bias is None:
        return weighted_linear_cross_entropy(h, head.weight, labels, w), flat_w.sum()
    per_token = F.cross_entropy(head(h).float(), labels, reduction="none")  # a sharded head: through the module
    return (per_token * w).sum(), flat_w.sum()


def _micro_context(model: nn.Module, last: bool) -> ContextManager:
    """DDP all-reduces gradients on the last micro-batch only."""
    if not last and hasattr(model, "no_sync"):
        return model.no_sync()
    return contextlib.nullcontext()


def forward_backward(model: nn.Module, batches: list[Batch], dp: DataParallel, full_logits: bool) -> float:
    """Backpropagates the step's micro-batches (gradients accumulate); returns the step's global loss."""
    weight_total = torch.stack([b.weight_sum for b in batches]).sum().double().reshape(1)
    dp.all_reduce_sum(weight_total)
    denom = weight_total.clamp_min(1e-12).float()
    scale = dp.size if (dp.size > 1 and dp.grads_averaged) else 1
    step_sum = torch.zeros((), dtype=torch.float64, device=weight_total.device)
    for i, b in enumerate(batches):
        with _micro_context(model, i == len(batches) - 1):
            s, _ = loss_sums(model, b, full_logits)
            (s / denom * scale).backward()
        step_sum += s.detach().double()
    return (dp.all_reduce_sum(step_sum.reshape(1)) / weight_total.clamp_min(1e-12)).item()


def clip_gradients(params: list[torch.Tensor], master: MasterWeights | None, max_norm: float | None) -> float:
    """Moves bf16 gradients onto the fp32 master weights (if any), clips; returns the total norm."""
    if master is not None:
        master.grads_to_master()
        params = master.master
    return clip_grad_norm(params, max_norm).item()


def check_finite(step: int, loss: float, grad_norm: float, last_checkpoint: Path | None) -> None:
    """Stops the run before a non-finite update reaches the weights (`step`: the one being taken)."""
    if math.isfinite(loss) and math.isfinite(grad_norm):
        return
    what, value = ("loss", loss) if not math.isfinite(loss) else ("gradient norm", grad_norm)
    where = f"; the last good checkpoint is {last_checkpoint}" if last_checkpoint else \
        " (no checkpoint was saved; set training.save_every_steps to keep some)"
    raise TrainingError(f"step {step}: non-finite {what} ({value}); stopped without applying it{where}. Try a "
                        "lower training.learning_rate, training.max_grad_norm, or training.dtype=fp32")


def optimizer_step(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
                   master: MasterWeights | None) -> float:
    """Applies the update and advances the schedule; returns the learning rate the update used."""
    lr = optimizer.param_groups[0]["lr"]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    if master is not None:
        master.master_to_model()
    return lr
