"""CPU inference weights: q/k/v and gate/up fused into one matrix each, and every linear weight reordered
once into oneDNN's blocked layout, so that a decode step is a few large matrix-vector products.

Why: at batch 1 a decode step is bound by reading the weights. Stock bf16 `F.linear` on CPU re-lays out
the weight on every call (slow), and separate q/k/v and gate/up calls multiply per-call overhead.
bf16 results are bit-identical to `F.linear`; fp32 results differ in summation order (~1e-6 relative).

The model keeps its parameters (names, state_dict and training are untouched); packing sets the
`packed` attribute of linear layers and the `fused_qkv` / `fused_gate_up` hooks that
`llamazoo.model.llama` uses in eager mode, and `unpack` removes them. The packed copies cost one more
copy of the linear weights in memory, so `pack_for_inference` declines when that does not fit
comfortably.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

PACKABLE = (torch.float32, torch.bfloat16)


def _available() -> bool:
    return hasattr(torch.ops.mkldnn, "_reorder_linear_weight") and torch.backends.mkldnn.is_available()


class PackedLinear:
    """y = x W^T + b with W prepacked for oneDNN; optionally split into several outputs."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, split: Sequence[int] | None = None,
                 batch_hint: int = 1):
        self.weight = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), batch_hint)
        self.bias = bias.detach() if bias is not None else None
        self.split = list(split) if split else None

    def __call__(self, x: torch.Tensor):
        y = torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        return y.split(self.split, dim=-1) if self.split else y


def _cat_bias(mods: Sequence[nn.Linear]) -> torch.Tensor | None:
    if all(m.bias is None for m in mods):
        return None
    return torch.cat([m.bias if m.bias is not None else torch.zeros(m.out_features, dtype=m.weight.dtype)
                      for m in mods])


def linear_bytes(model: nn.Module) -> int:
    return sum(m.weight.numel() * m.weight.element_size() for m in model.modules() if isinstance(m, nn.Linear))


def can_pack(model: nn.Module) -> str | None:
    """None when packing applies, else why not."""
    from llamazoo.model.lora import has_lora_or_quantized

    w = model.lm_head.weight
    if has_lora_or_quantized(model):  # packing would take the base weights alone
        return "the model has unmerged LoRA adapters or quantized layers (llamazoo.model.lora.merge_lora merges them)"
    if not _available():
        return "this torch build has no oneDNN linear ops"
    if w.device.type != "cpu":
        return "weights are not on the CPU"
    if w.dtype not in PACKABLE:
        return f"dtype {w.dtype} is not packed (float32 and bfloat16 are)"
    if w.dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return "this CPU has no oneDNN bfloat16 kernels (they need AVX512BW/VL/DQ or AVX-NE-CONVERT)"
    if any(type(p) is not torch.nn.Parameter and type(p) is not torch.Tensor for p in model.parameters()):
        return "weights are sharded tensors"
    try:
        import psutil

        if psutil.virtual_memory().available < 2 * linear_bytes(model) + (1 << 30):
            return "not enough free memory for a second copy of the weights"
    except ImportError:
        pass
    return None


@torch.no_grad()
def pack_for_inference(model: nn.Module) -> bool:
    """Installs packed, fused projections on a LlamaForCausalLM; returns False (and changes nothing)
    when `can_pack` says no."""
    if can_pack(model) is not None:
        return False
    for layer in model.model.layers:
        a, m = layer.self_attn, layer.mlp
        qkv = (a.q_proj, a.k_proj, a.v_proj)
        a.fused_qkv = PackedLinear(torch.cat([p.weight for p in qkv]), _cat_bias(qkv),
                                   [p.out_features for p in qkv])
        gu = (m.gate_proj, m.up_proj)
        m.fused_gate_up = PackedLinear(torch.cat([p.weight for p in gu]), _cat_bias(gu),
                                       [p.out_features for p in gu])
        for lin in (a.o_proj, m.down_proj):
            lin.packed = PackedLinear(lin.weight, lin.bias)
    model.lm_head.packed = PackedLinear(model.lm_head.weight, model.lm_head.bias)
    model.packed_for_inference = True
    return True


def unpack(model: nn.Module) -> None:
    """Back to the plain modules (e.g. before training or saving the weights again)."""
    for mod in model.modules():
        if "packed" in mod.__dict__:
            del mod.packed
        if hasattr(mod, "fused_qkv"):
            mod.fused_qkv = None
        if hasattr(mod, "fused_gate_up"):
            mod.fused_gate_up = None
    model.packed_for_inference = False
