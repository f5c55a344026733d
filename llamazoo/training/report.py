"""What a training run tells people: lines on stderr, the progress bar, per_step_metrics.csv,
eval_metrics.csv, train_config.yaml, summary.txt and, optionally, TensorBoard events.

per_step_metrics.csv keeps the original Model Zoo's four columns first and in order (as plain numbers,
not the original's `tensor(...)` cells), then the gradient norm and the step number. On resume the
file is cut back to the resumed step, so it reads as if the run had never stopped.
"""
from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path
from typing import Any

from llamazoo.io.atomic import write_text

STEP_COLUMNS = ["Tokens in Step", "Step Loss", "Learning Rate", "Time per Step", "Gradient Norm", "Step"]
EVAL_COLUMNS = ["Step", "Dev Loss", "Dev Perplexity", "Dev Tokens"]


def _truncate_csv(path: Path, columns: list[str], keep_steps: int) -> None:
    """Keeps the header and the rows whose Step <= keep_steps."""
    if not path.is_file():
        return
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    kept = [r for r in rows if r.get("Step") and int(r["Step"]) <= keep_steps]
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        w.writerows({k: r.get(k, "") for k in columns} for r in kept)
    tmp.replace(path)


class MetricsLog:
    """Appends one CSV row per step (flushed, so a killed run keeps what it did)."""

    def __init__(self, output_dir: Path, resume_step: int = 0, tensorboard: bool = False):
        self.step_file = output_dir / "per_step_metrics.csv"
        self.eval_file = output_dir / "eval_metrics.csv"
        for path, columns in ((self.step_file, STEP_COLUMNS), (self.eval_file, EVAL_COLUMNS)):
            if resume_step > 0:
                _truncate_csv(path, columns, resume_step)
            if resume_step == 0 or not path.is_file():
                with path.open("w", newline="") as f:
                    csv.writer(f).writerow(columns)
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ValueError("training.tensorboard is true but the tensorboard package is not installed; "
                                 "`pip install tensorboard` or set training.tensorboard=false") from None
            self.tb = SummaryWriter(str(output_dir / "tensorboard"), purge_step=resume_step + 1 if resume_step else None)

    def step(self, step: int, tokens: int, loss: float, lr: float, seconds: float, grad_norm: float) -> None:
        with self.step_file.open("a", newline="") as f:
            csv.writer(f).writerow([tokens, repr(float(loss)), repr(float(lr)), f"{seconds:.6f}",
                                    repr(float(grad_norm)), step])
        if self.tb is not None:
            self.tb.add_scalar("train/loss", loss, step)
            self.tb.add_scalar("train/learning_rate", lr, step)
            self.tb.add_scalar("train/grad_norm", grad_norm, step)
            self.tb.add_scalar("train/tokens_per_second", tokens / max(seconds, 1e-9), step)

    def eval(self, step: int, loss: float, tokens: int) -> float:
        ppl = perplexity(loss)
        with self.eval_file.open("a", newline="") as f:
            csv.writer(f).writerow([step, repr(float(loss)), repr(ppl), tokens])
        if self.tb is not None:
            self.tb.add_scalar("dev/loss", loss, step)
            self.tb.add_scalar("dev/perplexity", ppl, step)
        return ppl

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else float("inf")


def write_summary(output_dir: Path, fields: dict[str, Any], model_knobs: dict[str, Any]) -> Path:
    """summary.txt: the original's lines (`Name: value`) and the model knobs as JSON."""
    lines = [f"{k}: {v}" for k, v in fields.items()]
    lines.append("Model config: " + json.dumps(model_knobs, sort_keys=True))
    path = output_dir / "summary.txt"
    write_text(path, "\n".join(lines) + "\n")
    return path


def summary_fields(*, num_epochs: int, batch_size: int, steps: int, dp_workers: int, grad_accumulation_steps: int,
                   tokens_seen: int, train_seconds: float, final_loss: float | None,
                   dev_loss: float | None) -> dict[str, Any]:
    """summary.txt's lines, named as the original Model Zoo's (per-worker batch size and steps)."""
    fields: dict[str, Any] = {
        "Number of epochs": num_epochs,
        "Per worker batch size": batch_size,
        "Per worker number of batches (steps)": steps,
        "Number of DP workers": dp_workers,
        "Gradient accumulation steps": grad_accumulation_steps,
        "Total tokens seen": tokens_seen,
        "Tokens per second": f"{tokens_seen / max(train_seconds, 1e-9):.2f}",
        "Average time per step": f"{train_seconds / max(steps, 1):.6f}",
        "Final train loss": f"{final_loss:.6f}" if final_loss is not None else "n/a",
    }
    if dev_loss is not None:
        fields["Dev loss"] = f"{dev_loss:.6f}"
        fields["Dev perplexity"] = f"{perplexity(dev_loss):.6f}"
    return fields


def log(msg: str, is_main: bool = True) -> None:
    """One `llamazoo train:` line on stderr, from the main process only."""
    if is_main:
        print(f"llamazoo train: {msg}", file=sys.stderr, flush=True)


class RunReport:
    """Everything a run reports, in one place; on processes other than the main one it only keeps quiet."""

    def __init__(self, output_dir: Path, is_main: bool, resume_step: int = 0, tensorboard: bool = False):
        self.output_dir = output_dir
        self.is_main = is_main
        self.metrics = MetricsLog(output_dir, resume_step=resume_step, tensorboard=tensorboard) if is_main else None
        self.bar = None

    def log(self, msg: str) -> None:
        log(msg, self.is_main)

    def write_config(self, config: dict[str, Any]) -> None:
        """train_config.yaml: the run's whole config, defaults included."""
        import yaml

        if self.is_main:
            write_text(self.output_dir / "train_config.yaml", yaml.safe_dump(config, sort_keys=False))

    def open_bar(self, total_steps: int, done: int) -> None:
        if self.is_main:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=done, desc="train", unit="step", file=sys.stderr,
                            dynamic_ncols=True)

    def step(self, step: int, tokens: int, loss: float, lr: float, seconds: float, grad_norm: float,
             show: bool) -> None:
        """A finished optimizer step; `show`: refresh the bar's loss / lr / tokens-per-second too."""
        if self.metrics is not None:
            self.metrics.step(step, tokens, loss, lr, seconds, grad_norm)
        if self.bar is not None:
            self.bar.update(1)
            if show:
                self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens / seconds:.0f}")

    def eval(self, step: int, loss: float, tokens: int, when: str) -> None:
        """A dev evaluation; `when` prefixes the stderr line ("before training: ", "step 10: " or "")."""
        if self.metrics is not None:
            ppl = self.metrics.eval(step, loss, tokens)
            self.log(f"{when}dev loss {loss:.4f}, perplexity {ppl:.3f}")

    def summary(self, fields: dict[str, Any], model_knobs: dict[str, Any]) -> None:
        if self.is_main:
            write_summary(self.output_dir, fields, model_knobs)

    def close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def close(self) -> None:
        self.close_bar()
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None
