"""Dev loss: the training loss path without gradients, over every dev row once."""
from __future__ import annotations

import torch
from torch import nn

from llamazoo.data.dataset import HDF5Rows, eval_batches
from llamazoo.training.batch import make_batch
from llamazoo.training.step import DataParallel, loss_sums


@torch.no_grad()
def dev_loss(model: nn.Module, dev: HDF5Rows, t, device: torch.device, dp: DataParallel,
             full_logits: bool = False) -> tuple[float, int]:
    """(dev loss, dev tokens with weight): the weighted mean over every dev row, global over DP.
    `t`: the config's training section (batch size and the loss-weight rules)."""
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for rows, n_real in eval_batches(dev, t.batch_size, dp.rank, dp.size):
        ids, types = dev.read(rows)
        batch = make_batch(ids, types, t, device)
        if n_real < len(rows):
            batch.weights[n_real:] = 0  # fill-ins that keep ranks in step
        s, w = loss_sums(model, batch, full_logits)
        total += torch.stack([s.double(), w.double()])
    dp.all_reduce_sum(total)
    model.train(was_training)
    loss = (total[0] / total[1].clamp_min(1e-12)).item()
    return loss, int(total[1].item())
