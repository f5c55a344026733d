"""LoRA (Hu et al. 2021): trainable low-rank adapters beside frozen linear layers, laid out as PEFT lays them out.

A targeted projection `...q_proj` becomes a `LoRALinear` holding the frozen `base_layer` (an nn.Linear, or
a `QuantizedLinear` for QLoRA) and the adapter `lora_A` (rank x in) and `lora_B` (out x rank):

    y = base_layer(x) + lora_B(lora_A(dropout(x))) * alpha / rank        (alpha / sqrt(rank) with rsLoRA)

so the adapter's parameter names (`model.layers.0.self_attn.q_proj.lora_A.weight`) are PEFT's, less its
`base_model.model.` prefix (llamazoo.io.adapter reads and writes PEFT's adapter folders). Initialization as
PEFT's default: lora_A like nn.Linear (Kaiming-uniform), lora_B zero, so training starts at the base model.

`LoRALinear` is not an nn.Linear, so nothing that fuses or packs nn.Linear weights (the CPU inference
packing, the compiled decode's multiply-reduce) can take its base weight without the adapter:
`llamazoo.model.llama.linear` calls it as a module, and packing declines a model that has any. For fast
inference merge the adapters into the weights (`merge_lora`), which gives plain nn.Linear layers back.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch
from torch import nn

from llamazoo.model.quant import QUANTIZATIONS, QuantizedLinear

# The linear projections of a decoder layer: what LoRA can target (PEFT's names for Llama).
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_PROJECTION = re.compile(r"^model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)$")


@dataclass
class LoRASpec:
    """What adapters a model gets. target_modules: module names matched as PEFT matches a list (a name
    equal to an entry or ending in '.' + entry), or one regular expression matched against whole names."""

    rank: int
    alpha: float
    dropout: float = 0.0
    target_modules: tuple[str, ...] | str = field(default=LORA_TARGETS)
    use_rslora: bool = False

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update (see the module docstring)."""

    def __init__(self, base_layer: nn.Module, rank: int, alpha: float, dropout: float = 0.0,
                 use_rslora: bool = False, dtype: torch.dtype | None = None):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1 (got {rank})")
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.rank, self.alpha = rank, alpha
        self.scaling = alpha / (math.sqrt(rank) if use_rslora else rank)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        quantized = isinstance(base_layer, QuantizedLinear)
        ref = next(iter(base_layer.buffers())) if quantized else base_layer.weight
        dtype = dtype or (base_layer.compute_dtype if quantized else base_layer.weight.dtype)
        # drawn in fp32 and cast, so that a seed gives the same adapters (rounded) at every dtype
        self.lora_A = nn.Linear(self.in_features, rank, bias=False, device=ref.device).to(dtype)
        self.lora_B = nn.Linear(rank, self.out_features, bias=False, device="meta")
        self.lora_B.weight = nn.Parameter(torch.zeros(self.out_features, rank, device=ref.device, dtype=dtype))
        self.merged = False

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight, without the adapter (for shapes; use `merge` for the effective weight)."""
        return self.base_layer.weight

    def delta_weight(self) -> torch.Tensor:
        """scaling * B @ A, in fp32."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if self.merged:
            return y
        return y + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        """Adds the adapter into the base weight (forward then skips the adapter)."""
        self._require_float_base("merge")
        if not self.merged:
            w = self.base_layer.weight
            w.copy_((w.float() + self.delta_weight()).to(w.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtracts the adapter again (exact in fp32; rounded in bf16)."""
        self._require_float_base("unmerge")
        if self.merged:
            w = self.base_layer.weight
            w.copy_((w.float() - self.delta_weight()).to(w.dtype))
            self.merged = False

    def _require_float_base(self, what: str) -> None:
        if isinstance(self.base_layer, QuantizedLinear):
            raise ValueError(f"cannot {what} a LoRA adapter into a {self.base_layer.kind}-quantized weight; "
                             "merge it into the unquantized base model (llamazoo merge)")

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scaling={self.scaling:g}" + (", merged" if self.merged else "")


def projection_names(model: nn.Module) -> list[str]:
    """Names of the decoder layers' linear projections, in module order."""
    return [n for n, _ in model.named_modules() if _PROJECTION.match(n)]


def match_targets(model: nn.Module, targets: tuple[str, ...] | list[str] | str,
                  source: str = "target_modules") -> list[str]:
    """The projections `targets` selects (PEFT's matching rules); one clear error when a target matches
    something LoRA cannot adapt here, or nothing at all."""
    names = [n for n, _ in model.named_modules() if n]
    if isinstance(targets, str):
        chosen = [n for n in names if re.fullmatch(targets, n)]
    else:
        chosen = [n for n in names if any(n == t or n.endswith("." + t) for t in targets)]
    bad = [n for n in chosen if not _PROJECTION.match(n)]
    if bad:
        raise ValueError(f"{source}: {bad[0]!r} is not a linear projection of a decoder layer; llamazoo's LoRA "
                         f"adapts {', '.join(LORA_TARGETS)}")
    if not chosen:
        raise ValueError(f"{source}: {targets!r} matches no module of the model; expected names among "
                         f"{', '.join(LORA_TARGETS)}")
    return chosen


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent), leaf, module)


def apply_lora(model: nn.Module, spec: LoRASpec, quantization: str = "none",
               device: torch.device | str | None = None) -> list[str]:
    """Freezes the model and adds adapters to the projections spec.target_modules selects; returns their
    names. quantization nf4/int8 stores every decoder projection's weight quantized (adapted or not, as
    QLoRA does; embeddings, norms and the LM head stay as they are). `device`: where the layers go,
    one at a time as they are quantized (a model loaded on the CPU then never sits whole on the GPU)."""
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"unknown base quantization {quantization!r}; expected one of {', '.join(QUANTIZATIONS)}")
    targets = match_targets(model, spec.target_modules)
    for p in model.parameters():
        p.requires_grad_(False)
    for name in projection_names(model) if quantization != "none" else []:
        lin = model.get_submodule(name)
        if device is not None:
            lin.to(device)
        _set_module(model, name, QuantizedLinear(lin, quantization))
        del lin
    if device is not None:
        model.to(device)
    for name in targets:
        _set_module(model, name, LoRALinear(model.get_submodule(name), spec.rank, spec.alpha, spec.dropout,
                                            spec.use_rslora))
    return targets


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def adapter_parameter_names(model: nn.Module) -> list[str]:
    """The adapters' parameter names (module name + .lora_A.weight / .lora_B.weight), in model order."""
    return [f"{n}.{ab}.weight" for n in lora_layers(model) for ab in ("lora_A", "lora_B")]


def has_lora_or_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, (LoRALinear, QuantizedLinear)) for m in model.modules())


@torch.no_grad()
def merge_lora(model: nn.Module) -> int:
    """Replaces every LoRALinear by a plain nn.Linear holding base + adapter; returns how many."""
    layers = lora_layers(model)
    for name, m in layers.items():
        m.merge()
        _set_module(model, name, m.base_layer)
    return len(layers)
