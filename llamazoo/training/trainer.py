"""The training loop: build -> parallelize -> optimizer -> steps, with exact resume.

The stages are separate so that parallel training plugs in without touching the loop:
`TrainHooks.parallelize` wraps or shards the built model (DDP, FSDP2, TP), `CheckpointIO` decides how
state dicts are gathered and who writes them, and data-parallel rank and size come from
torch.distributed when it is initialized (or from the hooks).

The loss of a step is global: the weighted sum of per-token losses over all micro-batches and all
data-parallel ranks, divided by the weight sum over the same. Each micro-batch backpropagates
`local weighted sum / global weight sum` (times the DP size, since DDP and FSDP average gradients),
so any batch split gives the gradient of one big batch.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import math
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager

import torch
import torch.nn.functional as F
from torch import nn

from llamazoo.config import TrainConfig
from llamazoo.data.dataset import BatchSampler, PreparedDataset, eval_batches
from llamazoo.data.masks import IGNORE_INDEX, batch_inputs
from llamazoo.training.loss import weighted_linear_cross_entropy
from llamazoo.training.optim import MasterWeights, build_optimizer, clip_grad_norm, scheduler_for
from llamazoo.training.report import MetricsLog, perplexity, write_summary
from llamazoo.training.state import (CheckpointIO, is_sharded_checkpoint, load_checkpoint, load_sharded_checkpoint,
                                     resolve_resume, save_checkpoint, set_rng_state)


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. a non-finite loss); printed as one line by the CLI."""


@dataclass
class TrainHooks:
    """Where parallelism plugs in. Defaults are single-process."""

    # model -> wrapped/sharded model (called after weights are loaded, before the optimizer is built)
    parallelize: Callable[[nn.Module, TrainConfig], nn.Module] | None = None
    checkpoint_io: CheckpointIO = field(default_factory=CheckpointIO)
    # data-parallel group; None: torch.distributed's default group when initialized, else single
    dp_rank: int | None = None
    dp_world_size: int | None = None
    dp_group: Any = None
    # True when the wrapper averages gradients over DP ranks (DDP, FSDP): the loss is scaled back up
    grads_averaged: bool = True
    # the wrapper already keeps fp32 params and computes in bf16 (FSDP2 MixedPrecisionPolicy)
    handles_mixed_precision: bool = False
    # compute full logits through model.forward (for wrappers that shard lm_head with the root)
    full_logits: bool = False
    # called after every optimizer step with (step, metrics): custom logging, tests, schedulers of jobs
    on_step_end: Callable[[int, dict[str, float]], None] | None = None


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


TRIM_MULTIPLE = 32


def trim_padding(ids: torch.Tensor, types: torch.Tensor, multiple: int = TRIM_MULTIPLE) -> tuple[torch.Tensor, torch.Tensor]:
    """Drops trailing columns that are padding in every row (rounded up to `multiple` to keep few
    distinct shapes). Exact: with right padding and causal attention no kept position sees them,
    and their loss weight is 0. Fine-tuning rows are often mostly padding, so this is a large saving."""
    real = (types != 2).any(0).nonzero()
    n = int(real[-1]) + 1 if len(real) else 1
    n = min(ids.shape[1], -(-n // multiple) * multiple)
    return ids[:, :n], types[:, :n]


def make_batch(ids: torch.Tensor, types: torch.Tensor, t, device: torch.device) -> Batch:
    ids, types = trim_padding(ids, types)
    b = batch_inputs(ids, types, prompt_loss_weight=t.prompt_loss_weight, article_attention=t.article_attention,
                     reset_position_ids=t.reset_position_ids)
    return Batch(input_ids=b["input_ids"].to(device), labels=b["labels"].to(device), weights=b["weights"].to(device),
                 attention_mask=b["attention_mask"].to(device) if "attention_mask" in b else None,
                 position_ids=b["position_ids"].to(device) if "position_ids" in b else None, rows=ids.shape[0])


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


def _all_reduce_sum(t: torch.Tensor, group: Any) -> torch.Tensor:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM, group=group)
    return t


def _dp_rank_world(hooks: TrainHooks) -> tuple[int, int]:
    if hooks.dp_rank is not None and hooks.dp_world_size is not None:
        return hooks.dp_rank, hooks.dp_world_size
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(hooks.dp_group), torch.distributed.get_world_size(hooks.dp_group)
    return 0, 1


def check_output_dir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as e:
        raise PermissionError(f"training.output_dir: cannot write to {path} ({e.strerror or e}); "
                              "expected a writable folder") from None


class _StopSignal:
    """SIGINT/SIGTERM set a flag the loop checks after each step; a second one interrupts at once."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> "_StopSignal":
        import threading

        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        print(f"\nllamazoo train: got {signal.Signals(signum).name}; stopping after this step and saving a "
              "checkpoint (send it again to stop now)", file=sys.stderr, flush=True)

    def __exit__(self, *exc: Any) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


def _micro_context(model: nn.Module, last: bool) -> ContextManager:
    if not last and hasattr(model, "no_sync"):
        return model.no_sync()
    return contextlib.nullcontext()


@torch.no_grad()
def evaluate(model: nn.Module, ds: PreparedDataset, t, device: torch.device, rank: int, world: int,
             hooks: TrainHooks) -> tuple[float, int]:
    """(dev loss, dev tokens with weight): the weighted mean over every dev row, global over DP."""
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for rows, n_real in eval_batches(ds.dev, t.batch_size, rank, world):
        ids, types = ds.dev.read(rows)
        batch = make_batch(ids, types, t, device)
        if n_real < len(rows):
            batch.weights[n_real:] = 0
        s, w = loss_sums(model, batch, hooks.full_logits)
        total += torch.stack([s.double(), w.double()])
    _all_reduce_sum(total, hooks.dp_group)
    model.train(was_training)
    loss = (total[0] / total[1].clamp_min(1e-12)).item()
    return loss, int(total[1].item())


def _log(msg: str, is_main: bool) -> None:
    if is_main:
        print(f"llamazoo train: {msg}", file=sys.stderr, flush=True)


def train(cfg: TrainConfig, hooks: TrainHooks | None = None, progress: bool = True) -> dict[str, Any]:
    """Runs (or resumes) a training run as configured; returns a summary dict."""
    from llamazoo.io.hf import load_model
    from llamazoo.io.tokenizer import has_tokenizer, load_tokenizer

    hooks = hooks or TrainHooks()
    t = cfg.training
    ck = cfg.checkpoint
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
    rank, world = _dp_rank_world(hooks)
    dist_on = torch.distributed.is_available() and torch.distributed.is_initialized()
    world_size = torch.distributed.get_world_size() if dist_on else 1  # all processes: DP x TP
    is_main = hooks.checkpoint_io.is_writer and rank == 0
    output_dir = Path(t.output_dir)
    check_output_dir(output_dir)

    ds = PreparedDataset(t.dataset, cfg.model.max_seq_length)
    if t.batch_size * world > len(ds.train):
        raise ValueError(f"training.batch_size {t.batch_size}" + (f" x {world} data-parallel ranks" if world > 1 else "")
                         + f" is larger than the {len(ds.train)} training rows in {ds.folder}"
                         + (f" (metadata.yaml max_batch_size_train: {ds.metadata['max_batch_size_train']})"
                            if ds.metadata.get("max_batch_size_train") is not None else ""))
    device = torch.device(cfg.model.torch_device())
    bf16 = t.dtype == "bf16"
    weights_dtype = torch.bfloat16 if bf16 and not hooks.handles_mixed_precision else torch.float32

    torch.manual_seed(t.seed)
    source = ck.model_name_or_path or ck.config_name
    model = load_model(source, dtype=weights_dtype, device=device, opts=cfg.model.precision_options(), seed=t.seed)
    vocab = ds.metadata.get("vocab_size")
    if vocab is not None and int(vocab) > model.config.vocab_size:
        raise ValueError(f"the dataset {ds.folder} was tokenized with a vocabulary of {vocab} tokens but the model "
                         f"({source}) has vocab_size {model.config.vocab_size}")
    tokenizer = None
    if ck.model_name_or_path:
        from llamazoo.io.default import resolve_checkpoint

        folder = resolve_checkpoint(ck.model_name_or_path, need_weights=False)
        if Path(folder).is_dir() and has_tokenizer(folder):
            tokenizer = load_tokenizer(folder)
    if tokenizer is None and ds.tokenizer_dir is not None and has_tokenizer(ds.tokenizer_dir):
        tokenizer = load_tokenizer(ds.tokenizer_dir)
    if tokenizer is None:
        _log("no tokenizer in the checkpoint or the dataset folder; the output folder will have none", is_main)

    sampler = BatchSampler(len(ds.train), t.batch_size, t.seed, rank, world)
    micro_total = t.num_epochs * sampler.batches_per_epoch
    total_steps = -(-micro_total // t.grad_accumulation_steps)
    if t.end_early_at_step:
        total_steps = min(total_steps, t.end_early_at_step)

    resume_path = resolve_resume(t.resume_from, output_dir)
    train_state: dict[str, Any] = {}
    io = hooks.checkpoint_io
    sharded_resume = resume_path is not None and io.sharded
    if sharded_resume and not is_sharded_checkpoint(resume_path):
        raise ValueError(f"training.resume_from: {resume_path} was written by a single-process run; a parallel run "
                         f"resumes only from its own (torch.distributed.checkpoint) checkpoints at the same world size")
    if resume_path is not None and not sharded_resume:
        sd, train_state = load_checkpoint(resume_path)
        io.load_model_state_dict(model, sd)
        del sd
        _log(f"resuming from {resume_path} (step {train_state['step']})", is_main)
    elif t.resume_from == "auto":
        _log(f"resume_from=auto: no checkpoint in {output_dir / 'checkpoints'} yet; starting fresh", is_main)

    model.train()
    if t.activation_checkpointing:
        enable_activation_checkpointing(model)
    core = model
    if hooks.parallelize is not None:
        model = hooks.parallelize(model, cfg)
    if t.compile:
        compile_layers(model)

    master = MasterWeights(core) if weights_dtype != torch.float32 else None
    optimizer = build_optimizer(core if hooks.parallelize is None else model, t.learning_rate, t.weight_decay, master)
    scheduler = scheduler_for(optimizer, t.lr_schedule, t.learning_rate, t.min_lr, t.warmup_steps, total_steps)
    step, tokens_seen, train_seconds = 0, 0, 0.0
    if sharded_resume:  # after parallelizing: every rank reads its own shards
        train_state = load_sharded_checkpoint(resume_path, core, optimizer, master)
        _log(f"resuming from {resume_path} (step {train_state['step']})", is_main)
    elif train_state:
        io.load_optimizer_state_dict(model, optimizer, train_state["optimizer"])
        if master is not None:
            master.load_state_dict(train_state["master_weights"])
    if train_state:
        scheduler.load_state_dict(train_state["scheduler"])
        sampler.load_state_dict(train_state["sampler"])
        set_rng_state(train_state["rng"])
        step, tokens_seen, train_seconds = train_state["step"], train_state["tokens_seen"], train_state["train_seconds"]

    metrics = MetricsLog(output_dir, resume_step=step, tensorboard=t.tensorboard) if is_main else None
    if is_main:
        (output_dir / "train_config.yaml").write_text(_config_yaml(cfg))
    evaluate_on = t.evaluate and ds.dev is not None and len(ds.dev) > 0
    if t.evaluate and not evaluate_on:
        _log(f"training.evaluate: {ds.folder} has no dev rows; skipping evaluation", is_main)

    def state_now() -> dict[str, Any]:
        return {"step": step, "total_steps": total_steps, "tokens_seen": tokens_seen, "train_seconds": train_seconds,
                "sampler": sampler.state_dict(), "scheduler": scheduler.state_dict(),
                "dp_world_size": world, "world_size": world_size, "tensor_parallel": world_size // world}

    def checkpoint_now() -> Path | None:
        return save_checkpoint(output_dir, step, core, state_now(), io, optimizer, t.keep_last_checkpoints,
                               tokenizer, master)

    last_ckpt: Path | None = resume_path
    dev_loss: float | None = None
    losses: list[float] = []
    micro_done = step * t.grad_accumulation_steps
    L = ds.max_seq_length
    bar = None
    if progress and is_main:
        from tqdm import tqdm

        bar = tqdm(total=total_steps, initial=step, desc="train", unit="step", file=sys.stderr, dynamic_ncols=True)
    interrupted = None
    params = [p for p in model.parameters() if p.requires_grad]
    if evaluate_on and step == 0:  # the baseline, so that the first dev loss has something to compare with
        dev_loss, n_tok = evaluate(model, ds, t, device, rank, world, hooks)
        if metrics is not None:
            ppl = metrics.eval(0, dev_loss, n_tok)
            _log(f"before training: dev loss {dev_loss:.4f}, perplexity {ppl:.3f}", is_main)
    try:
        with _StopSignal() as stop:
            while step < total_steps:
                t0 = time.perf_counter()
                n_micro = min(t.grad_accumulation_steps, micro_total - micro_done)
                batches = []
                for _ in range(n_micro):
                    _, _, rows = sampler.next()
                    ids, types = ds.train.read(rows)
                    batches.append(make_batch(ids, types, t, device))
                weight_total = torch.stack([b.weight_sum for b in batches]).sum().double().reshape(1)
                _all_reduce_sum(weight_total, hooks.dp_group)
                denom = weight_total.clamp_min(1e-12).float()
                scale = world if (world > 1 and hooks.grads_averaged) else 1
                step_sum = torch.zeros((), dtype=torch.float64, device=device)
                for i, b in enumerate(batches):
                    with _micro_context(model, i == len(batches) - 1):
                        s, _ = loss_sums(model, b, hooks.full_logits)
                        (s / denom * scale).backward()
                    step_sum += s.detach().double()
                step_loss_t = _all_reduce_sum(step_sum.reshape(1), hooks.dp_group) / weight_total.clamp_min(1e-12)
                step_loss = step_loss_t.item()
                if master is not None:
                    master.grads_to_master()
                gnorm = clip_grad_norm(master.master if master is not None else params, t.max_grad_norm).item()
                if not math.isfinite(step_loss) or not math.isfinite(gnorm):
                    what = "loss" if not math.isfinite(step_loss) else "gradient norm"
                    value = step_loss if what == "loss" else gnorm
                    where = f"; the last good checkpoint is {last_ckpt}" if last_ckpt else \
                        " (no checkpoint was saved; set training.save_every_steps to keep some)"
                    raise TrainingError(f"step {step + 1}: non-finite {what} ({value}); stopped without applying it"
                                        f"{where}. Try a lower training.learning_rate, training.max_grad_norm, or "
                                        "training.dtype=fp32")
                lr = optimizer.param_groups[0]["lr"]
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                if master is not None:
                    master.master_to_model()
                step += 1
                micro_done += n_micro
                rows_global = sum(b.rows for b in batches) * world
                step_tokens = rows_global * L
                tokens_seen += step_tokens
                dt = time.perf_counter() - t0
                train_seconds += dt
                losses.append(step_loss)
                if metrics is not None:
                    metrics.step(step, step_tokens, step_loss, lr, dt, gnorm)
                if hooks.on_step_end is not None:
                    hooks.on_step_end(step, {"loss": step_loss, "lr": lr, "grad_norm": gnorm, "tokens": step_tokens,
                                             "seconds": dt})
                if bar is not None:
                    bar.update(1)
                    if step % t.log_every_steps == 0 or step == total_steps:
                        bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{step_tokens / dt:.0f}")
                if evaluate_on and t.eval_every_steps and step % t.eval_every_steps == 0 and step < total_steps:
                    dev_loss, n_tok = evaluate(model, ds, t, device, rank, world, hooks)
                    if metrics is not None:
                        ppl = metrics.eval(step, dev_loss, n_tok)
                        _log(f"step {step}: dev loss {dev_loss:.4f}, perplexity {ppl:.3f}", is_main)
                if (t.save_every_steps and step % t.save_every_steps == 0) or (stop.signum and step < total_steps):
                    last_ckpt = checkpoint_now() or last_ckpt
                if stop.signum:
                    interrupted = signal.Signals(stop.signum).name
                    break
    finally:
        if bar is not None:
            bar.close()
    if interrupted:
        _log(f"{interrupted}: saved a resumable checkpoint at step {step} in {last_ckpt}; continue with "
             f"training.resume_from=auto", is_main)
        if metrics is not None:
            metrics.close()
        ds.close()
        return {"step": step, "interrupted": interrupted, "checkpoint": str(last_ckpt), "losses": losses}

    if evaluate_on:
        dev_loss, n_tok = evaluate(model, ds, t, device, rank, world, hooks)
        if metrics is not None:
            ppl = metrics.eval(step, dev_loss, n_tok)
            _log(f"dev loss {dev_loss:.4f}, perplexity {ppl:.3f}", is_main)
    if t.save_every_steps and (last_ckpt is None or not str(last_ckpt).endswith(f"step_{step}")):
        last_ckpt = checkpoint_now() or last_ckpt
    io.publish_hf_folder(output_dir, core, tokenizer)  # every rank: a parallel IO gathers one tensor at a time
    if is_main:
        fields = {
            "Number of epochs": t.num_epochs,
            "Per worker batch size": t.batch_size,
            "Per worker number of batches (steps)": step,
            "Number of DP workers": world,
            "Gradient accumulation steps": t.grad_accumulation_steps,
            "Total tokens seen": tokens_seen,
            "Tokens per second": f"{tokens_seen / max(train_seconds, 1e-9):.2f}",
            "Average time per step": f"{train_seconds / max(step, 1):.6f}",
            "Final train loss": f"{losses[-1]:.6f}" if losses else "n/a",
        }
        if dev_loss is not None:
            fields["Dev loss"] = f"{dev_loss:.6f}"
            fields["Dev perplexity"] = f"{perplexity(dev_loss):.6f}"
        write_summary(output_dir, fields, cfg.model.model_dump())
        _log(f"done: {step} steps; model, summary.txt and per_step_metrics.csv in {output_dir}", is_main)
    if metrics is not None:
        metrics.close()
    ds.close()
    return {"step": step, "interrupted": None, "dev_loss": dev_loss, "losses": losses, "output_dir": str(output_dir),
            "checkpoint": str(last_ckpt) if last_ckpt else None}


def _config_yaml(cfg: TrainConfig) -> str:
    import yaml

    return yaml.safe_dump(cfg.model_dump(), sort_keys=False)
