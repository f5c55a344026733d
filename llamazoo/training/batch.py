"""HDF5 rows -> the tensors of one forward pass: labels, loss weights, article masks and position ids
(the rules are in llamazoo.data.masks), with the all-padding tail cut off."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from llamazoo.data.masks import batch_inputs

TRIM_MULTIPLE = 32


@dataclass
class Batch:
    input_ids: torch.Tensor
    labels: torch.Tensor
    weights: torch.Tensor
    attention_mask: torch.Tensor | None
    position_ids: torch.Tensor | None
    rows: int

    @property
    def weight_sum(self) -> torch.Tensor:
        return self.weights.sum()


def trim_padding(ids: torch.Tensor, types: torch.Tensor, multiple: int = TRIM_MULTIPLE) -> tuple[torch.Tensor, torch.Tensor]:
    """Drops trailing columns that are padding in every row (rounded up to `multiple` to keep few
    distinct shapes). Exact: with right padding and causal attention no kept position sees them,
    and their loss weight is 0. Fine-tuning rows are often mostly padding, so this is a large saving."""
    real = (types != 2).any(0).nonzero()
    n = int(real[-1]) + 1 if len(real) else 1
    n = min(ids.shape[1], -(-n // multiple) * multiple)
    return ids[:, :n], types[:, :n]


def make_batch(ids: torch.Tensor, types: torch.Tensor, t, device: torch.device) -> Batch:
    """`t`: the config's training section (prompt_loss_weight, article_attention, reset_position_ids)."""
    ids, types = trim_padding(ids, types)
    b = batch_inputs(ids, types, prompt_loss_weight=t.prompt_loss_weight, article_attention=t.article_attention,
                     reset_position_ids=t.reset_position_ids)
    return Batch(input_ids=b["input_ids"].to(device), labels=b["labels"].to(device), weights=b["weights"].to(device),
                 attention_mask=b["attention_mask"].to(device) if "attention_mask" in b else None,
                 position_ids=b["position_ids"].to(device) if "position_ids" in b else None, rows=ids.shape[0])
