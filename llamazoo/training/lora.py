"""LoRA / QLoRA fine-tuning: the `Trainer` with a frozen (optionally quantized) base and trained adapters.

Everything else of a run is the full fine-tune's (the loop, losses and masks, schedules, accumulation,
bf16 with fp32 master weights of the adapters, reports): only the three seams differ.
  prepare_model    adapters on training.lora.target_modules (or those of checkpoint.adapter, to train it
                   further), the base frozen and, with base_quantization nf4/int8, quantized layer by
                   layer onto the device; what trains is exactly what has requires_grad
  checkpoints      hold the adapters (not the frozen base: it is reloaded from checkpoint.*), their
                   optimizer state and fp32 masters, so a resume is exact (`AdapterCheckpointIO`)
  write_output     a PEFT adapter folder in output_dir (adapter_config.json, adapter_model.safetensors in
                   fp32 when trained in bf16, the tokenizer); `llamazoo merge` makes a full HF folder of it
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llamazoo.io.adapter import (ADAPTER_CONFIG, load_adapter_tensors, peft_tensors, read_adapter, save_adapter,
                                 whole_cpu)
from llamazoo.model.lora import LORA_TARGETS, LoRASpec, adapter_parameter_names, apply_lora
from llamazoo.training.report import log
from llamazoo.training.state import CheckpointIO
from llamazoo.training.trainer import Trainer


class AdapterCheckpointIO(CheckpointIO):
    """The run's CheckpointIO, with the model's state dict narrowed to the adapter weights."""

    def __init__(self, inner: CheckpointIO):
        self.inner = inner
        self.is_writer, self.sharded = inner.is_writer, inner.sharded

    def model_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        sd = model.state_dict()
        return {n: whole_cpu(sd[n]) for n in adapter_parameter_names(model)}

    def load_model_state_dict(self, model: nn.Module, sd: dict[str, torch.Tensor]) -> None:
        names = adapter_parameter_names(model)
        extra = [k for k in sd if k not in names]
        if extra:
            raise ValueError(f"training.resume_from: the checkpoint holds {extra[0]!r}, not an adapter weight of "
                             f"this LoRA run (a full fine-tune's checkpoint, or other training.lora.target_modules); "
                             f"resume with the settings that wrote it")
        try:
            load_adapter_tensors(model, sd, "training.resume_from: the checkpoint", prefix="")
        except ValueError as e:
            raise ValueError(f"{e}; resume with the training.lora settings that wrote the checkpoint") from None

    def optimizer_state_dict(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        return self.inner.optimizer_state_dict(model, optimizer)

    def load_optimizer_state_dict(self, model: nn.Module, optimizer: torch.optim.Optimizer, sd: dict[str, Any]) -> None:
        self.inner.load_optimizer_state_dict(model, optimizer, sd)

    def barrier(self) -> None:
        self.inner.barrier()


def lora_spec(cfg) -> tuple[LoRASpec, dict[str, torch.Tensor] | None]:
    """The adapters to train: training.lora's, or checkpoint.adapter's (with its tensors) to train further,
    in which case training.lora may not name another rank, alpha or target_modules."""
    lo, adapter = cfg.training.lora, cfg.checkpoint.adapter
    if not adapter:
        return LoRASpec(lo.rank, lo.alpha, lo.dropout, tuple(lo.target_modules)), None
    spec, tensors = read_adapter(adapter)
    given = {"rank": spec.rank, "alpha": spec.alpha,
             "target_modules": sorted(spec.target_modules) if not isinstance(spec.target_modules, str) else None}
    for key, value in given.items():
        mine = getattr(lo, key)
        if key in lo.model_fields_set and not (key == "rank" and mine == 0) and \
                (sorted(mine) if key == "target_modules" else mine) != value:
            raise ValueError(f"training.lora.{key}={mine} but checkpoint.adapter {adapter} has "
                             f"{value if value is not None else spec.target_modules!r}; leave training.lora.{key} "
                             f"unset to continue training the adapter as it is")
    spec.dropout = lo.dropout
    return spec, tensors


class LoRATrainer(Trainer):
    """A run with training.lora.rank > 0 or checkpoint.adapter set (see the module docstring)."""

    def load_device(self) -> torch.device:
        """A quantized base is loaded on the CPU (mmapped) and quantized onto the device layer by layer, so
        the unquantized model never has to fit the device."""
        return torch.device("cpu") if self.t.lora.base_quantization != "none" else self.device

    def prepare_model(self, model: nn.Module) -> nn.Module:
        if self.cfg.parallel.tensor_parallel > 1:
            raise ValueError("training.lora: LoRA with parallel.tensor_parallel > 1 is not supported; use "
                             "data parallel (ddp or fsdp) for LoRA runs")
        quant = self.t.lora.base_quantization
        total = sum(p.numel() for p in model.parameters())
        self.spec, tensors = lora_spec(self.cfg)
        targets = apply_lora(model, self.spec, quant, device=self.device)
        if tensors is not None:
            load_adapter_tensors(model, tensors, Path(self.cfg.checkpoint.adapter) / ADAPTER_CONFIG)
        for p in model.parameters():
            p.requires_grad_(False)
        params = dict(model.named_parameters())
        for name in adapter_parameter_names(model):
            params[name].requires_grad_(True)
        trained = sum(params[n].numel() for n in adapter_parameter_names(model))
        kinds = [k for k in LORA_TARGETS if any(n.endswith("." + k) for n in targets)]
        log(f"LoRA: training {trained:,} adapter parameters (rank {self.spec.rank}, alpha {self.spec.alpha:g}, "
            f"{len(targets)} projections: {', '.join(kinds)}); {total:,} base parameters frozen"
            + (f", stored {quant}" if quant != "none" else "")
            + (f"; from the adapter {self.cfg.checkpoint.adapter}" if tensors is not None else ""), self.is_main)
        self.io = AdapterCheckpointIO(self.io)
        return model

    def checkpoint_state(self) -> dict[str, Any]:
        lo = self.t.lora
        return {**super().checkpoint_state(),
                "lora": {"rank": self.spec.rank, "alpha": self.spec.alpha, "base_quantization": lo.base_quantization,
                         "target_modules": self.spec.target_modules if isinstance(self.spec.target_modules, str)
                         else list(self.spec.target_modules)}}

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        """PEFT-named adapter weights: the fp32 master copies when the model trains in bf16."""
        source = dict(self.master.module.named_parameters()) if self.master is not None else \
            dict(self.core.named_parameters())
        return peft_tensors((n, source[n]) for n in adapter_parameter_names(self.core))

    def base_model_name(self) -> str | None:
        ck = self.cfg.checkpoint
        if ck.model_name_or_path == "default":
            from llamazoo.io.default import resolve_checkpoint

            return str(resolve_checkpoint("default", need_weights=False))
        return ck.model_name_or_path or ck.config_name

    def write_output(self) -> None:
        """The adapter folder's files in output_dir itself (staged in a hidden folder, moved file by file,
        adapter_config.json last), beside the run's logs. Every rank calls it (sharded adapters gather)."""
        tensors = self.adapter_tensors()
        if self.is_main:
            staging = self.output_dir / ".adapter-staging"
            save_adapter(tensors, self.spec, staging, self.base_model_name(), self.tokenizer)
            for f in sorted(staging.iterdir(), key=lambda p: p.name == ADAPTER_CONFIG):
                os.replace(f, self.output_dir / f.name)
            staging.rmdir()
        self.io.barrier()
