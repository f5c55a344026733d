"""Setting up a run from its config: the checks, the dataset, the model and its tokenizer, the step
count, and the model preparations (activation checkpointing, compiled layers).

Each function raises the one clear error of its part; `Trainer` calls them in the order a user meets
the problems (config, output folder, dataset, model, resume point).
"""
from __future__ import annotations

import functools
import importlib
import tempfile
from pathlib import Path

import torch
from torch import nn

from llamazoo.config import TrainConfig
from llamazoo.data.dataset import PreparedDataset
from llamazoo.training.report import log
from llamazoo.training.step import unwrap


def check_config(cfg: TrainConfig) -> None:
    """What the schema cannot say: combinations of keys, and optional packages."""
    t, ck = cfg.training, cfg.checkpoint
    if bool(ck.model_name_or_path) == bool(ck.config_name):
        both = "both are" if ck.model_name_or_path else "neither is"
        raise ValueError(f"set exactly one of checkpoint.model_name_or_path (weights to fine-tune) and "
                         f"checkpoint.config_name (a config.json or named config for random init); {both} set")
    if not t.dataset:
        raise ValueError("training.dataset is required: a folder written by `llamazoo prepare` or generative_data_prep")
    if cfg.model.dtype not in ("auto", {"fp32": "float32", "bf16": "bfloat16"}[t.dtype]):
        raise ValueError(f"model.dtype is {cfg.model.dtype} but training.dtype is {t.dtype}; set training.dtype "
                         "(fp32 or bf16) and leave model.dtype as auto")
    if t.tensorboard:
        try:
            importlib.import_module("torch.utils.tensorboard")
        except ImportError:
            raise ValueError("training.tensorboard is true but the tensorboard package is not installed; "
                             "`pip install tensorboard` or set training.tensorboard=false") from None


def check_output_dir(path: Path) -> None:
    """Fails before any work when the outputs could not be written."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as e:
        raise PermissionError(f"training.output_dir: cannot write to {path} ({e.strerror or e}); "
                              "expected a writable folder") from None


def open_dataset(cfg: TrainConfig, dp_size: int) -> PreparedDataset:
    """The prepared folder, with enough train rows for one global batch."""
    t = cfg.training
    ds = PreparedDataset(t.dataset, cfg.model.max_seq_length)
    if t.batch_size * dp_size > len(ds.train):
        raise ValueError(f"training.batch_size {t.batch_size}" + (f" x {dp_size} data-parallel ranks" if dp_size > 1 else "")
                         + f" is larger than the {len(ds.train)} training rows in {ds.folder}"
                         + (f" (metadata.yaml max_batch_size_train: {ds.metadata['max_batch_size_train']})"
                            if ds.metadata.get("max_batch_size_train") is not None else ""))
    return ds


def weights_dtype(cfg: TrainConfig, handles_mixed_precision: bool) -> torch.dtype:
    """bf16 weights for training.dtype=bf16 (the optimizer then updates fp32 masters), unless the
    parallel wrapper keeps fp32 parameters and computes in bf16 itself (FSDP2)."""
    bf16 = cfg.training.dtype == "bf16"
    return torch.bfloat16 if bf16 and not handles_mixed_precision else torch.float32


def load_model(cfg: TrainConfig, ds: PreparedDataset, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """The weights to fine-tune (checkpoint.model_name_or_path) or a seeded random init
    (checkpoint.config_name), checked against the dataset's vocabulary."""
    from llamazoo.io.hf import load_model as load_hf_model

    ck = cfg.checkpoint
    source = ck.model_name_or_path or ck.config_name
    if cfg.model.quantize != "none":
        raise ValueError("model.quantize is for generate/chat/serve/eval; to train adapters on a quantized base "
                         "use training.lora.base_quantization")
    model = load_hf_model(source, dtype=dtype, device=device, opts=cfg.model.precision_options(), seed=cfg.training.seed)
    if model.config.quantization_config:
        raise ValueError(f"{source}: a quantized folder (int8/int4 weights for inference) cannot be trained; train "
                         f"from the float checkpoint it was made from")
    vocab = ds.metadata.get("vocab_size")
    if vocab is not None and int(vocab) > model.config.vocab_size:
        raise ValueError(f"the dataset {ds.folder} was tokenized with a vocabulary of {vocab} tokens but the model "
                         f"({source}) has vocab_size {model.config.vocab_size}")
    return model


def find_tokenizer(cfg: TrainConfig, ds: PreparedDataset, is_main: bool):
    """The tokenizer saved with the outputs: the fine-tuned checkpoint's, else the dataset's, else none."""
    from llamazoo.io.tokenizer import has_tokenizer, load_tokenizer

    ck = cfg.checkpoint
    if ck.model_name_or_path:
        from llamazoo.io.default import resolve_checkpoint

        folder = resolve_checkpoint(ck.model_name_or_path, need_weights=False)
        if Path(folder).is_dir() and has_tokenizer(folder):
            return load_tokenizer(folder)
    if ds.tokenizer_dir is not None and has_tokenizer(ds.tokenizer_dir):
        return load_tokenizer(ds.tokenizer_dir)
    log("no tokenizer in the checkpoint or the dataset folder; the output folder will have none", is_main)
    return None


def step_budget(cfg: TrainConfig, batches_per_epoch: int) -> tuple[int, int]:
    """(micro-batches of the whole run, optimizer steps): num_epochs of micro-batches, grouped by
    grad_accumulation_steps (the last step may have fewer), cut at end_early_at_step."""
    t = cfg.training
    micro_total = t.num_epochs * batches_per_epoch
    total_steps = -(-micro_total // t.grad_accumulation_steps)
    if t.end_early_at_step:
        total_steps = min(total_steps, t.end_early_at_step)
    return micro_total, total_steps


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each decoder layer in backward (parameter names unchanged)."""
    from torch.utils.checkpoint import checkpoint

    for layer in unwrap(model).model.layers:
        layer.forward = functools.partial(checkpoint, layer.forward, use_reentrant=False)


def compile_layers(model: nn.Module) -> None:
    """torch.compile each decoder layer (training.compile).

    The layers share one code object, so the 30 layers of SmolLM2 cost one compilation (about half a
    minute on 2 CPU cores) and the graph is reused with each layer's parameters as inputs. What it buys
    is fusion of the memory-bound elementwise work around the matmuls (RMSNorm, RoPE, SiLU*up,
    residual adds) in forward and backward; the matmuls and attention stay the same kernels, and the
    losses equal eager's to float rounding. The LM head and loss stay eager (a custom fused kernel)."""
    for layer in unwrap(model).model.layers:
        layer.compile()
