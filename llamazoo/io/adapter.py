"""LoRA adapter folders in PEFT's format, so that adapters move both ways between llamazoo and PEFT.

A folder holds `adapter_config.json` (PEFT's LoraConfig: peft_type LORA, r, lora_alpha, target_modules,
...) and `adapter_model.safetensors`, whose tensors are named as PEFT names them for a Llama model:
`base_model.model.` + the module's name + `.lora_A.weight` / `.lora_B.weight` (lora_A: rank x in,
lora_B: out x rank), plus optionally a tokenizer. `PeftModel.from_pretrained(base, folder)` loads what
`save_adapter` writes, and `load_adapter` reads what PEFT's `save_pretrained` writes for LoRA on the
decoder projections; the LoRA variants llamazoo does not implement (DoRA, per-module ranks, trained
biases, modules_to_save, ...) are one clear error naming the key.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from llamazoo.io.atomic import replace_path, temp_path_beside
from llamazoo.io.hf import iter_tensors, read_json
from llamazoo.model.lora import LORA_TARGETS, LoRASpec, adapter_parameter_names, apply_lora, merge_lora

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")
PEFT_PREFIX = "base_model.model."
# LoraConfig keys whose non-default values ask for something llamazoo's LoRA does not do
UNSUPPORTED = ("use_dora", "bias", "modules_to_save", "layers_to_transform", "rank_pattern", "alpha_pattern",
               "fan_in_fan_out", "lora_bias", "exclude_modules", "target_parameters", "trainable_token_indices",
               "layer_replication", "use_qalora", "use_bdlora", "alora_invocation_tokens", "megatron_config")


def is_adapter_folder(path: str | os.PathLike) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def peft_config(spec: LoRASpec, base_model: str | None) -> dict[str, Any]:
    """The adapter_config.json of `spec` (PEFT's LoraConfig keys; the rest take PEFT's defaults)."""
    alpha = int(spec.alpha) if float(spec.alpha).is_integer() else spec.alpha
    targets = spec.target_modules if isinstance(spec.target_modules, str) else sorted(spec.target_modules)
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
            "r": spec.rank, "lora_alpha": alpha, "lora_dropout": spec.dropout, "target_modules": targets,
            "use_rslora": spec.use_rslora, "bias": "none", "fan_in_fan_out": False, "use_dora": False,
            "modules_to_save": None, "init_lora_weights": True, "inference_mode": True,
            "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {},
            "revision": None}


def peft_tensors(named: Iterable[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """(llamazoo adapter name, tensor) -> PEFT's names, whole tensors on the CPU (sharded ones gathered:
    call it on every rank of a parallel run)."""
    return {PEFT_PREFIX + name: whole_cpu(t) for name, t in named}


def whole_cpu(t: torch.Tensor) -> torch.Tensor:
    """A tensor whole (a DTensor gathered: a collective) on the CPU, detached."""
    t = t.full_tensor() if hasattr(t, "full_tensor") else t
    return t.detach().contiguous().cpu()


def save_adapter(tensors: dict[str, torch.Tensor], spec: LoRASpec, out_dir: str | os.PathLike,
                 base_model: str | None = None, tokenizer=None) -> Path:
    """A PEFT adapter folder (written under a temporary name and renamed when complete). `tensors`:
    PEFT-named, see `peft_tensors`."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    tmp = temp_path_beside(out)
    tmp.mkdir()
    try:
        save_file(tensors, str(tmp / ADAPTER_FILES[0]), metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(peft_config(spec, base_model), indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save(tmp)
        replace_path(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def read_adapter(folder: str | os.PathLike) -> tuple[LoRASpec, dict[str, torch.Tensor]]:
    """(spec, tensors under llamazoo's names) of a PEFT LoRA adapter folder, checked."""
    folder = Path(folder)
    cfg_file = folder / ADAPTER_CONFIG
    if not cfg_file.is_file():
        what = "no such folder" if not folder.exists() else f"no {ADAPTER_CONFIG} in it"
        raise FileNotFoundError(f"{folder}: {what}; expected a PEFT LoRA adapter folder ({ADAPTER_CONFIG} + "
                                f"{ADAPTER_FILES[0]})")
    cfg = read_json(cfg_file)
    if not isinstance(cfg, dict) or cfg.get("peft_type") != "LORA":
        got = cfg.get("peft_type") if isinstance(cfg, dict) else type(cfg).__name__
        raise ValueError(f"{cfg_file}: peft_type is {got!r}; llamazoo reads LoRA adapters (peft_type \"LORA\")")
    for key in UNSUPPORTED:
        value = cfg.get(key)
        if value and not (key == "bias" and value == "none"):
            raise ValueError(f"{cfg_file}: {key}={value!r} is not supported by llamazoo's LoRA (plain LoRA on the "
                             f"decoder projections: {', '.join(LORA_TARGETS)})")
    targets = cfg.get("target_modules")
    if targets == "all-linear":
        targets = LORA_TARGETS
    if isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets):
        targets = tuple(targets)
    elif not isinstance(targets, str) or not targets:
        raise ValueError(f"{cfg_file}: target_modules must be a list of module names or a regular expression "
                         f"(got {targets!r})")
    r, alpha = cfg.get("r"), cfg.get("lora_alpha")
    if not isinstance(r, int) or isinstance(r, bool) or r < 1 or not isinstance(alpha, (int, float)):
        raise ValueError(f"{cfg_file}: expected an integer r >= 1 and a number lora_alpha (got r={r!r}, "
                         f"lora_alpha={alpha!r})")
    spec = LoRASpec(rank=r, alpha=float(alpha), dropout=float(cfg.get("lora_dropout") or 0.0),
                    target_modules=targets, use_rslora=bool(cfg.get("use_rslora")))
    files = [folder / n for n in ADAPTER_FILES if (folder / n).is_file()]
    if not files:
        raise FileNotFoundError(f"{folder}: no {ADAPTER_FILES[0]} (or {ADAPTER_FILES[1]}) beside {ADAPTER_CONFIG}")
    tensors = {}
    for name, t, file in iter_tensors(files[:1]):
        short = name.removeprefix(PEFT_PREFIX).replace(".default.weight", ".weight")
        if not name.startswith(PEFT_PREFIX) or not short.endswith((".lora_A.weight", ".lora_B.weight")):
            raise ValueError(f"{file}: tensor {name!r} is not a LoRA weight named as PEFT names them "
                             f"({PEFT_PREFIX}<module>.lora_A.weight / .lora_B.weight)")
        tensors[short] = t
    return spec, tensors


def load_adapter(model: nn.Module, folder: str | os.PathLike, merge: bool = False, quantization: str = "none",
                 dropout: float | None = None) -> LoRASpec:
    """Adds the adapter of a PEFT folder to a llamazoo model: unmerged LoRA layers (trainable further, the
    base frozen and quantized as asked), or merged into the weights (`merge`: plain nn.Linear layers
    again, nothing to run beside them). `dropout` replaces the adapter's for further training."""
    spec, tensors = read_adapter(folder)
    if dropout is not None:
        spec.dropout = dropout
    source = Path(folder) / ADAPTER_CONFIG
    try:
        apply_lora(model, spec, quantization)
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None
    load_adapter_tensors(model, tensors, folder)
    if merge:
        merge_lora(model)
    return spec


@torch.no_grad()
def load_adapter_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], source: str | os.PathLike,
                         prefix: str = PEFT_PREFIX) -> None:
    """Copies adapter tensors (llamazoo names) into a model with LoRA layers: every adapter gets both of
    its tensors, with its shapes; nothing else. Errors name `source` and the tensors as `prefix` + name
    (PEFT's names for adapter folders)."""
    params = dict(model.named_parameters())
    expected = adapter_parameter_names(model)
    missing = [n for n in expected if n not in tensors]
    extra = [n for n in tensors if n not in expected]
    if extra:
        raise ValueError(f"{source}: adapter tensor {prefix + extra[0]!r} belongs to no module that "
                         f"target_modules selects in this model")
    if missing:
        raise ValueError(f"{source}: no tensor for {len(missing)} adapted module weight(s), e.g. "
                         f"{prefix + missing[0]!r}")
    for name in expected:
        p, t = params[name], tensors[name]
        if tuple(t.shape) != tuple(p.shape):
            raise ValueError(f"{source}: tensor {prefix + name!r} has shape {tuple(t.shape)}, expected "
                             f"{tuple(p.shape)} (r and the base model's sizes)")
        p.copy_(t.to(p.dtype))
