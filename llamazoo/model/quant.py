"""Frozen linear layers with quantized weights, for QLoRA: NF4 with double quantization, and int8.

NF4 (the QLoRA paper, Dettmers et al. 2023): weights in blocks of 64, each block scaled by its absolute
maximum and every weight stored as the nearest of 16 levels (the quantiles of a standard normal, scaled
to [-1, 1], with an exact 0): 4 bits. Double quantization stores the blocks' fp32 absmax values as 8 bits:
their mean is subtracted, and each block of 256 of them is scaled by its own absolute maximum to int8
(the paper uses an 8-bit float there; a linear int8 code over centred values keeps the absmax within
~0.4% of its block's spread). Bytes per weight: 1/2 + 1/64 + 4/(64*256) = 0.516, i.e. 0.258x bf16.
A weight whose size is not a multiple of 64 is padded (the padding is never read back).

int8: one fp32 scale per output row (absmax / 127), 1 byte per weight (0.5x bf16 plus the scales).

Written in plain torch ops, so they run on any device and torch.compile fuses the dequantization.
(torchao's NF4Tensor needs weights whose block count divides by 256, which SmolLM2's 576-wide
projections do not have, and ships C++ kernels tied to torch versions.) The forward dequantizes the
weight for one matmul; the backward dequantizes it again rather than keeping it, so a layer holds only
its quantized bytes between forward and backward.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

Quantization = Literal["none", "nf4", "int8"]
QUANTIZATIONS = ("none", "nf4", "int8")

NF4_BLOCK = 64
NF4_SCALE_BLOCK = 256
# The 16 NF4 levels of the QLoRA paper (normal quantiles normalized to [-1, 1], zero exact).
NF4_LEVELS = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
              -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
              0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
              0.7229568362236023, 1.0)


def _blocks(flat: torch.Tensor, size: int) -> torch.Tensor:
    """flat, zero-padded to a multiple of size, as [n_blocks, size]."""
    pad = -flat.numel() % size
    return F.pad(flat, (0, pad)).view(-1, size)


@torch.no_grad()
def nf4_quantize(w: torch.Tensor) -> dict[str, torch.Tensor]:
    """A float weight -> NF4 codes (two per byte) and its double-quantized block scales."""
    blocks = _blocks(w.detach().float().flatten(), NF4_BLOCK)
    absmax = blocks.abs().amax(1)
    levels = torch.tensor(NF4_LEVELS, device=w.device)
    normalized = blocks / torch.where(absmax > 0, absmax, 1.0)[:, None]
    codes = torch.bucketize(normalized, (levels[1:] + levels[:-1]) / 2).to(torch.uint8).flatten()
    packed = (codes[0::2] << 4) | codes[1::2]
    mean = absmax.mean()
    centred = _blocks(absmax - mean, NF4_SCALE_BLOCK)
    scale = centred.abs().amax(1) / 127
    scale = torch.where(scale > 0, scale, 1.0)
    absmax_q = torch.round(centred / scale[:, None]).clamp(-127, 127).to(torch.int8).flatten()[:absmax.numel()]
    return {"codes": packed, "absmax_q": absmax_q, "absmax_scale": scale.float(), "absmax_mean": mean.float()}


def _pair_table(device: torch.device) -> torch.Tensor:
    """[256] int64: the bits of the two fp32 levels a packed byte holds (high nibble first), so that one
    8-byte gather per byte decodes two weights."""
    levels = torch.tensor(NF4_LEVELS, device=device)
    byte = torch.arange(256, device=device)
    return torch.stack((levels[byte >> 4], levels[byte & 15]), dim=-1).view(torch.int64).flatten()


def nf4_dequantize(q: dict[str, torch.Tensor], shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """The weight in `dtype`. Transient memory per weight: 2 bytes of int32 byte indices, 4 of fp32 values
    (scaled in place), then the result."""
    packed = q["codes"]
    n_blocks = q["absmax_q"].numel()
    scale = q["absmax_scale"].repeat_interleave(NF4_SCALE_BLOCK)[:n_blocks]
    absmax = q["absmax_q"].float() * scale + q["absmax_mean"]
    w = _pair_table(packed.device).index_select(0, packed.to(torch.int32)).view(torch.float32)
    w = w.view(n_blocks, NF4_BLOCK).mul_(absmax[:, None])
    return w.flatten()[:shape.numel()].view(shape).to(dtype)


@torch.no_grad()
def int8_quantize(w: torch.Tensor) -> dict[str, torch.Tensor]:
    """Symmetric int8 per output row."""
    w = w.detach().float()
    scale = w.abs().amax(1) / 127
    scale = torch.where(scale > 0, scale, 1.0)
    return {"codes": torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8), "scale": scale}


def int8_dequantize(q: dict[str, torch.Tensor], shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    return (q["codes"].float() * q["scale"][:, None]).view(shape).to(dtype)


QUANTIZERS = {"nf4": (nf4_quantize, nf4_dequantize), "int8": (int8_quantize, int8_dequantize)}


class _DequantizedLinear(torch.autograd.Function):
    """y = x W^T + b with W dequantized in forward and again in backward (nothing of W is saved)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: "QuantizedLinear") -> torch.Tensor:
        ctx.layer = layer
        return F.linear(x, layer.dequantize(x.dtype), None if layer.bias is None else layer.bias.to(x.dtype))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if not ctx.needs_input_grad[0]:
            return None, None
        return grad @ ctx.layer.dequantize(grad.dtype), None


class QuantizedLinear(nn.Module):
    """A frozen nn.Linear whose weight is stored quantized (buffers: they follow .to(device) and are
    never trained); the bias, if any, stays a frozen float parameter."""

    def __init__(self, linear: nn.Linear, kind: str):
        super().__init__()
        if kind not in QUANTIZERS:
            raise ValueError(f"unknown quantization {kind!r}; expected one of {', '.join(QUANTIZERS)}")
        self.kind = kind
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight_shape = linear.weight.shape
        self.compute_dtype = linear.weight.dtype
        for name, t in QUANTIZERS[kind][0](linear.weight).items():
            self.register_buffer(name, t)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def quantized(self) -> dict[str, torch.Tensor]:
        return dict(self.named_buffers(recurse=False))

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return QUANTIZERS[self.kind][1](self.quantized(), self.weight_shape, dtype or self.compute_dtype)

    @property
    def weight(self) -> torch.Tensor:
        """The weight it computes with (dequantized: a new tensor, for shapes and tests)."""
        return self.dequantize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _DequantizedLinear.apply(x, self)

    def quantized_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.quantized().values())

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.kind}"
