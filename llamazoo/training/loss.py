"""Weighted cross entropy fused with the LM head, computed in chunks of positions.

The plain path materializes fp32 logits [N, V] and then as many again for log_softmax, its backward
and the one-hot gradient. Here each chunk's logits are turned into their gradient in place
(softmax - one-hot, times the loss weight) right away, and the gradients of the hidden states and
the head weight are computed in the same pass; backward only scales them. Same three matmuls,
a fraction of the memory traffic, and peak memory bounded by the chunk.
"""
from __future__ import annotations

import torch

CHUNK_ELEMENTS = 1 << 24  # logits per chunk (64 MiB in fp32)


class _WeightedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, w: torch.Tensor,
                chunk: int) -> torch.Tensor:
        # a frozen head (LoRA) or frozen hidden states need no gradient: skip its matmul (and zeroed buffer)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for s in range(0, h.shape[0], chunk):
            hc, yc, wc = h[s:s + chunk], labels[s:s + chunk], w[s:s + chunk]
            logp = torch.log_softmax((hc @ weight.t()).float(), dim=-1)  # one fused pass
            total -= (logp.gather(1, yc[:, None]).squeeze(1) * wc).sum()
            # d loss / d logits = w * (softmax - onehot); the weights scale the [chunk, H] factors of
            # the two gradient matmuls instead of the [chunk, V] probabilities (one pass fewer)
            probs = logp.exp_()
            probs.scatter_add_(1, yc[:, None], torch.full_like(wc[:, None], -1.0))
            g = probs.to(weight.dtype)
            if need_h:
                grad_h[s:s + chunk] = (g @ weight) * wc[:, None].to(h.dtype)
            if need_w:
                grad_w.addmm_(g.t().float(), (hc * wc[:, None].to(hc.dtype)).float())  # .float() is free on fp32
        ctx.save_for_backward(grad_h, None if grad_w is None else grad_w.to(weight.dtype))
        return total

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors
        return (None if grad_h is None else grad_h * grad_out.to(grad_h.dtype),
                None if grad_w is None else grad_w * grad_out.to(grad_w.dtype), None, None, None)


def weighted_linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                                  w: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """sum_i w_i * CE(h_i @ weight^T, labels_i), logits in fp32; h [N,H], labels [N] (all valid), w [N]."""
    chunk = chunk or max(1, CHUNK_ELEMENTS // weight.shape[0])
    if not torch.is_grad_enabled() or not (h.requires_grad or weight.requires_grad):
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for s in range(0, h.shape[0], chunk):
            logits = (h[s:s + chunk] @ weight.t()).float()
            ce = torch.nn.functional.cross_entropy(logits, labels[s:s + chunk], reduction="none")
            total += (ce * w[s:s + chunk]).sum()
        return total
    return _WeightedLinearCrossEntropy.apply(h, weight, labels, w.float(), chunk)
