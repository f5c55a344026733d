"""A training run: `train(cfg)` sets up a `Trainer` and runs it, with exact resume.

Where each part lives (all under llamazoo/training/):
  trainer.py   the run's order: set-up, the loop, checkpoints, the final outputs (here)
  build.py     set-up from the config: checks, dataset, model and tokenizer, step count, model preparations
  batch.py     HDF5 rows -> a Batch (labels, loss weights, attention masks)
  step.py      one optimizer step's arithmetic: global loss over micro-batches and DP ranks, clipping, update
  evaluate.py  dev loss
  optim.py     AdamW, learning-rate schedules, fp32 master weights
  state.py     checkpoint folders: save, load, find the resume point; CheckpointIO
  report.py    stderr lines, progress bar, per_step_metrics.csv, summary.txt

Parallel training plugs in through `TrainHooks` without touching the loop: `parallelize` wraps or
shards the built model (DDP, FSDP2, TP), `CheckpointIO` decides how state dicts are gathered and who
writes them, and the data-parallel group comes from the hooks or torch.distributed.

Fine-tuning methods (LoRA, QLoRA) plug in at three `Trainer` methods: `prepare_model` (add adapters,
freeze the base: what is trained is exactly what has requires_grad afterwards, for the optimizer's
param groups, the fp32 master weights and gradient clipping alike), `build_optimizer`, and
`write_output` (the final folder: a whole HF model folder here, an adapter folder for LoRA).
"""
from __future__ import annotations

import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from llamazoo.config import TrainConfig
from llamazoo.data.dataset import BatchSampler
from llamazoo.training import optim, state
from llamazoo.training.batch import Batch, make_batch
from llamazoo.training.build import (check_config, check_output_dir, compile_layers, enable_activation_checkpointing,
                                     find_tokenizer, load_model, open_dataset, step_budget, weights_dtype)
from llamazoo.training.evaluate import dev_loss
from llamazoo.training.report import RunReport, log, summary_fields
from llamazoo.training.step import (DataParallel, TrainingError, check_finite, clip_gradients, forward_backward,
                                    loss_sums, optimizer_step)

# the CLI, the distributed hooks, tests and benchmarks import these from here
__all__ = ["train", "Trainer", "TrainHooks", "TrainingError", "Batch", "make_batch", "loss_sums", "compile_layers"]


@dataclass
class TrainHooks:
    """Where parallelism plugs in. Defaults are single-process."""

    # model -> wrapped/sharded model (called after weights are loaded, before the optimizer is built)
    parallelize: Callable[[nn.Module, TrainConfig], nn.Module] | None = None
    checkpoint_io: state.CheckpointIO = field(default_factory=state.CheckpointIO)
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


def data_parallel(hooks: TrainHooks) -> DataParallel:
    """The hooks' DP group, else torch.distributed's default group when initialized, else rank 0 of 1."""
    if hooks.dp_rank is not None and hooks.dp_world_size is not None:
        rank, size = hooks.dp_rank, hooks.dp_world_size
    elif torch.distributed.is_available() and torch.distributed.is_initialized():
        rank, size = torch.distributed.get_rank(hooks.dp_group), torch.distributed.get_world_size(hooks.dp_group)
    else:
        rank, size = 0, 1
    return DataParallel(rank=rank, size=size, group=hooks.dp_group, grads_averaged=hooks.grads_averaged)


@dataclass
class Counters:
    """How far the run is; all but `losses` (this process's steps) are saved in checkpoints."""

    step: int = 0
    micro_batches: int = 0  # read so far; the run's last step may have fewer than grad_accumulation_steps
    tokens_seen: int = 0
    train_seconds: float = 0.0
    losses: list[float] = field(default_factory=list)


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


class Trainer:
    """One run: `__init__` sets it up (resuming if asked), `fit` trains and writes the outputs, `close`
    releases the dataset files and logs.

    The set-up order matters: config errors come out in the order users meet them; a single-process
    checkpoint's weights are loaded into the prepared model before it is parallelized, optimizer state
    once the optimizer exists, and a sharded checkpoint into the parallelized model."""

    def __init__(self, cfg: TrainConfig, hooks: TrainHooks | None = None, progress: bool = True):
        self.cfg, self.t = cfg, cfg.training
        self.hooks = hooks or TrainHooks()
        self.show_progress = progress
        t = self.t
        check_config(cfg)
        self.dp = data_parallel(self.hooks)
        dist_on = torch.distributed.is_available() and torch.distributed.is_initialized()
        self.world_size = torch.distributed.get_world_size() if dist_on else 1  # all processes: DP x TP
        self.io = self.hooks.checkpoint_io
        self.is_main = self.io.is_writer and self.dp.rank == 0
        self.output_dir = Path(t.output_dir)
        check_output_dir(self.output_dir)

        self.ds = open_dataset(cfg, self.dp.size)
        self.device = torch.device(cfg.model.torch_device())
        self.weights_dtype = weights_dtype(cfg, self.hooks.handles_mixed_precision)
        torch.manual_seed(t.seed)
        self.core = load_model(cfg, self.ds, self.weights_dtype, self.load_device())  # never wrapped: config, saving
        self.tokenizer = find_tokenizer(cfg, self.ds, self.is_main)
        self.sampler = BatchSampler(len(self.ds.train), t.batch_size, t.seed, self.dp.rank, self.dp.size)
        self.micro_total, self.total_steps = step_budget(cfg, self.sampler.batches_per_epoch)
        self.counters = Counters()

        self.core = self.prepare_model(self.core)
        resumed = self._resume_weights()
        self.model = self.wrap_model(self.core)  # what forward runs through (maybe wrapped)
        self.optimizer, self.master = self.build_optimizer()
        self.trained = self.trainable_parameters()  # clipped directly when there are no fp32 master copies
        self.scheduler = optim.scheduler_for(self.optimizer, t.lr_schedule, t.learning_rate, t.min_lr, t.warmup_steps,
                                             self.total_steps)
        self._resume_training_state(resumed)

        self.report = RunReport(self.output_dir, self.is_main, resume_step=self.counters.step, tensorboard=t.tensorboard)
        self.report.write_config(cfg.model_dump())
        self.evaluate_on = t.evaluate and self.ds.dev is not None and len(self.ds.dev) > 0
        if t.evaluate and not self.evaluate_on:
            self.report.log(f"training.evaluate: {self.ds.folder} has no dev rows; skipping evaluation")
        self.dev_loss: float | None = None

    # -- what a fine-tuning method changes -------------------------------------------------------------------
    def load_device(self) -> torch.device:
        """Where the loaded weights land; prepare_model puts the model on self.device (QLoRA loads on the
        CPU and quantizes onto the device layer by layer)."""
        return self.device

    def prepare_model(self, model: nn.Module) -> nn.Module:
        """The loaded model -> the model to train. Full fine-tuning trains every weight as loaded; a
        method such as LoRA adds its adapters and freezes the base here (requires_grad decides what
        the optimizer, the fp32 master weights and clipping see). Runs before a resumed checkpoint's
        weights are loaded, so that they match what this returns, and before the parallel wrapper."""
        return model

    def wrap_model(self, model: nn.Module) -> nn.Module:
        """The model to train -> the module the loop runs: train mode, activation checkpointing, the
        parallel wrapper (DDP / FSDP2 / TP through the hooks), compiled layers."""
        model.train()
        if self.t.activation_checkpointing:
            enable_activation_checkpointing(model)
        if self.hooks.parallelize is not None:
            model = self.hooks.parallelize(model, self.cfg)
        if self.t.compile:
            compile_layers(model)
        return model

    def trainable_parameters(self) -> list[torch.Tensor]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def build_optimizer(self) -> tuple[torch.optim.Optimizer, optim.MasterWeights | None]:
        """AdamW over the parameters that require grad; with bf16 weights it updates fp32 master copies
        of them, which are copied down after each step."""
        t = self.t
        master = optim.MasterWeights(self.core) if self.weights_dtype != torch.float32 else None
        owner = self.core if self.hooks.parallelize is None else self.model
        return optim.build_optimizer(owner, t.learning_rate, t.weight_decay, master), master

    def write_output(self) -> None:
        """The run's final model in output_dir (config.json, model.safetensors, tokenizer), loadable by
        transformers. Every rank calls it: a parallel CheckpointIO gathers one tensor at a time."""
        self.io.publish_hf_folder(self.output_dir, self.core, self.tokenizer)

    # -- the loop ----------------------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        """Trains to total_steps (or until SIGINT/SIGTERM: then a checkpoint to resume from) and writes
        the outputs; returns the run's summary dict."""
        t, c = self.t, self.counters
        if self.show_progress:
            self.report.open_bar(self.total_steps, c.step)
        if self.evaluate_on and c.step == 0:  # the baseline, so that the first dev loss has something to compare with
            self.evaluate("before training: ")
        interrupted = None
        try:
            with _StopSignal() as stop:
                while c.step < self.total_steps:
                    self.train_step()
                    if self.evaluate_on and t.eval_every_steps and c.step % t.eval_every_steps == 0 \
                            and c.step < self.total_steps:
                        self.evaluate(f"step {c.step}: ")
                    if (t.save_every_steps and c.step % t.save_every_steps == 0) or \
                            (stop.signum and c.step < self.total_steps):
                        self.save_checkpoint()
                    if stop.signum and c.step < self.total_steps:  # after the last step: finish as usual
                        interrupted = signal.Signals(stop.signum).name
                        break
        finally:
            self.report.close_bar()
        if interrupted:
            self.report.log(f"{interrupted}: saved a resumable checkpoint at step {c.step} in {self.last_checkpoint}; "
                            f"continue with training.resume_from=auto")
            return {"step": c.step, "interrupted": interrupted, "checkpoint": str(self.last_checkpoint),
                    "losses": c.losses}
        return self.finish()

    def next_batches(self) -> list[Batch]:
        """The next step's micro-batches (this rank's rows of each global batch)."""
        n_micro = min(self.t.grad_accumulation_steps, self.micro_total - self.counters.micro_batches)
        batches = []
        for _ in range(n_micro):
            _, _, rows = self.sampler.next()
            ids, types = self.ds.train.read(rows)
            batches.append(make_batch(ids, types, self.t, self.device))
        return batches

    def train_step(self) -> None:
        """One optimizer step over grad_accumulation_steps micro-batches."""
        c = self.counters
        t0 = time.perf_counter()
        batches = self.next_batches()
        loss = forward_backward(self.model, batches, self.dp, self.hooks.full_logits)
        grad_norm = clip_gradients(self.trained, self.master, self.t.max_grad_norm)
        check_finite(c.step + 1, loss, grad_norm, self.last_checkpoint)
        lr = optimizer_step(self.optimizer, self.scheduler, self.master)
        c.step += 1
        c.micro_batches += len(batches)
        tokens = sum(b.rows for b in batches) * self.dp.size * self.ds.max_seq_length
        c.tokens_seen += tokens
        seconds = time.perf_counter() - t0
        c.train_seconds += seconds
        c.losses.append(loss)
        self.report.step(c.step, tokens, loss, lr, seconds, grad_norm,
                         show=c.step % self.t.log_every_steps == 0 or c.step == self.total_steps)
        if self.hooks.on_step_end is not None:
            self.hooks.on_step_end(c.step, {"loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": tokens,
                                            "seconds": seconds})

    def evaluate(self, when: str) -> None:
        """Dev loss now, logged (`when` prefixes the stderr line)."""
        self.dev_loss, tokens = dev_loss(self.model, self.ds.dev, self.t, self.device, self.dp, self.hooks.full_logits)
        self.report.eval(self.counters.step, self.dev_loss, tokens, when)

    def finish(self) -> dict[str, Any]:
        """After the last step: final dev loss, a last checkpoint (when the run keeps them), the model
        folder, summary.txt."""
        t, c = self.t, self.counters
        if self.evaluate_on:
            self.evaluate("")
        if t.save_every_steps and (self.last_checkpoint is None or not str(self.last_checkpoint).endswith(f"step_{c.step}")):
            self.save_checkpoint()
        self.write_output()
        self.report.summary(summary_fields(
            num_epochs=t.num_epochs, batch_size=t.batch_size, steps=c.step, dp_workers=self.dp.size,
            grad_accumulation_steps=t.grad_accumulation_steps, tokens_seen=c.tokens_seen,
            train_seconds=c.train_seconds, final_loss=c.losses[-1] if c.losses else None, dev_loss=self.dev_loss),
            self.cfg.model.model_dump())
        self.report.log(f"done: {c.step} steps; model, summary.txt and per_step_metrics.csv in {self.output_dir}")
        return {"step": c.step, "interrupted": None, "dev_loss": self.dev_loss, "losses": c.losses,
                "output_dir": str(self.output_dir),
                "checkpoint": str(self.last_checkpoint) if self.last_checkpoint else None}

    def close(self) -> None:
        self.report.close()
        self.ds.close()

    # -- checkpoints (files: state.py) -------------------------------------------------------------------------
    def checkpoint_state(self) -> dict[str, Any]:
        """What a checkpoint holds besides model, optimizer, master weights and RNG states."""
        c = self.counters
        return {"step": c.step, "total_steps": self.total_steps, "tokens_seen": c.tokens_seen,
                "train_seconds": c.train_seconds, "sampler": self.sampler.state_dict(),
                "scheduler": self.scheduler.state_dict(), "dp_world_size": self.dp.size,
                "world_size": self.world_size, "tensor_parallel": self.world_size // self.dp.size}

    def save_checkpoint(self) -> None:
        path = state.save_checkpoint(self.output_dir, self.counters.step, self.core, self.checkpoint_state(), self.io,
                                     self.optimizer, self.t.keep_last_checkpoints, self.tokenizer, self.master)
        self.last_checkpoint = path or self.last_checkpoint

    def _resume_weights(self) -> dict[str, Any]:
        """Finds the checkpoint to resume from (training.resume_from) and loads a single-process one's
        weights into the unwrapped model; returns its training state ({} if none) for after the
        optimizer is built."""
        t = self.t
        self.resume_path = state.resolve_resume(t.resume_from, self.output_dir)
        self.last_checkpoint: Path | None = self.resume_path
        self.sharded_resume = self.resume_path is not None and self.io.sharded
        if self.sharded_resume and not state.is_sharded_checkpoint(self.resume_path):
            raise ValueError(f"training.resume_from: {self.resume_path} was written by a single-process run; a parallel "
                             f"run resumes only from its own (torch.distributed.checkpoint) checkpoints at the same "
                             f"world size")
        train_state: dict[str, Any] = {}
        if self.resume_path is not None and not self.sharded_resume:
            sd, train_state = state.load_checkpoint(self.resume_path)
            self.io.load_model_state_dict(self.core, sd)
            del sd
            log(f"resuming from {self.resume_path} (step {train_state['step']})", self.is_main)
        elif self.resume_path is None and t.resume_from == "auto":
            log(f"resume_from=auto: no checkpoint in {self.output_dir / 'checkpoints'} yet; starting fresh", self.is_main)
        return train_state

    def _resume_training_state(self, train_state: dict[str, Any]) -> None:
        """Optimizer, master weights, schedule, data position, RNG and counters of the resume point (a
        sharded checkpoint: model weights too, each rank reading its own shards)."""
        c = self.counters
        if self.sharded_resume:
            train_state = state.load_sharded_checkpoint(self.resume_path, self.core, self.optimizer, self.master)
            log(f"resuming from {self.resume_path} (step {train_state['step']})", self.is_main)
        elif train_state:
            self.io.load_optimizer_state_dict(self.model, self.optimizer, train_state["optimizer"])
            if self.master is not None:
                self.master.load_state_dict(train_state["master_weights"])
        if train_state:
            self.scheduler.load_state_dict(train_state["scheduler"])
            self.sampler.load_state_dict(train_state["sampler"])
            state.set_rng_state(train_state["rng"])
            c.step, c.tokens_seen, c.train_seconds = train_state["step"], train_state["tokens_seen"], \
                train_state["train_seconds"]
        c.micro_batches = c.step * self.t.grad_accumulation_steps


def trainer_class(cfg: TrainConfig) -> type[Trainer]:
    """Full fine-tuning, or LoRA / QLoRA (training.lora.rank > 0, or an adapter to train further)."""
    if cfg.training.lora.rank > 0 or cfg.checkpoint.adapter:
        from llamazoo.training.lora import LoRATrainer

        return LoRATrainer
    return Trainer


def train(cfg: TrainConfig, hooks: TrainHooks | None = None, progress: bool = True) -> dict[str, Any]:
    """Runs (or resumes) a training run as configured; returns a summary dict."""
    trainer = trainer_class(cfg)(cfg, hooks, progress)
    try:
        return trainer.fit()
    finally:
        trainer.close()
