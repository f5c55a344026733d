"""Exact resume: SIGKILL mid-run, a kill during a checkpoint save, and SIGTERM all continue to the same
per-step losses as an uninterrupted run (CPU, fp32)."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from train_helpers import random_dataset, tiny_config_file

from llamazoo.config import TrainConfig, load_config
from llamazoo.training.state import list_checkpoints, load_checkpoint
from llamazoo.training.trainer import train

REPO = Path(__file__).resolve().parents[1]
STEPS = 8

DRIVER = r"""
import json, os, signal, sys
import torch
from llamazoo.config import TrainConfig, load_config
from llamazoo.training.trainer import TrainHooks, train
args = json.loads(sys.argv[1])
mode, at = args["mode"], args["at"]
def on_step(step, metrics):
    if step == at and mode in ("sigkill", "sigterm"):
        os.kill(os.getpid(), signal.SIGKILL if mode == "sigkill" else signal.SIGTERM)
if mode == "kill_in_save":  # dies after the weights are written, before the state file
    real_save = torch.save
    def save(obj, f, *a, **k):
        if isinstance(obj, dict) and obj.get("step") == at:
            os.kill(os.getpid(), signal.SIGKILL)
        return real_save(obj, f, *a, **k)
    torch.save = save
r = train(load_config(TrainConfig, None, args["overrides"]), TrainHooks(on_step_end=on_step), progress=False)
print("RESULT", json.dumps({"step": r["step"], "interrupted": r["interrupted"]}))
"""


def overrides(base: Path, out: Path, *extra: str) -> list[str]:
    return [f"training.dataset={base / 'ds'}", f"checkpoint.config_name={base / 'c.json'}", f"training.output_dir={out}",
            "model.device=cpu", "training.batch_size=2", "training.learning_rate=2e-3", "training.lr_schedule=linear",
            "training.warmup_steps=2", "training.weight_decay=0.1", "training.max_grad_norm=0.5",
            f"training.end_early_at_step={STEPS}", "training.save_every_steps=2", "training.evaluate=false", *extra]


def step_losses(out: Path) -> list[float]:
    with (out / "per_step_metrics.csv").open() as f:
        return [float(r["Step Loss"]) for r in csv.DictReader(f)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    base = tmp_path_factory.mktemp("resume")
    random_dataset(base / "ds", n_articles=40)
    tiny_config_file(base / "c.json")
    out = base / "ref"
    result = train(load_config(TrainConfig, None, overrides(base, out)), progress=False)
    assert result["step"] == STEPS
    return base, step_losses(out)


def run_driver(base: Path, out: Path, mode: str, at: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    args = json.dumps({"mode": mode, "at": at, "overrides": overrides(base, out)})
    return subprocess.run([sys.executable, "-c", DRIVER, args], capture_output=True, text=True, env=env, timeout=300)


def resume(base: Path, out: Path) -> list[float]:
    result = train(load_config(TrainConfig, None, overrides(base, out, "training.resume_from=auto")), progress=False)
    assert result["step"] == STEPS and result["interrupted"] is None
    return step_losses(out)


def test_sigkill_mid_run_then_resume_auto_matches_uninterrupted(reference):
    base, ref = reference
    out = base / "killed"
    p = run_driver(base, out, "sigkill", 5)
    assert p.returncode == -9, p.stderr[-2000:]
    assert len(step_losses(out)) == 5  # the log has steps past the last checkpoint (step 4)
    assert [c.step for c in list_checkpoints(out)] == [2, 4]
    assert resume(base, out) == ref


def test_kill_during_checkpoint_save_keeps_the_previous_one(reference):
    base, ref = reference
    out = base / "killed_in_save"
    p = run_driver(base, out, "kill_in_save", 4)
    assert p.returncode == -9, p.stderr[-2000:]
    assert [c.step for c in list_checkpoints(out)] == [2]
    assert list((out / "checkpoints").glob(".step_4.incomplete-*"))  # the half-written one is hidden
    sd, state = load_checkpoint(out / "checkpoints" / "step_2")
    assert state["step"] == 2 and "model.embed_tokens.weight" in sd
    assert resume(base, out) == ref
    assert not list((out / "checkpoints").glob(".*.incomplete-*"))


def test_sigterm_saves_a_resumable_checkpoint_and_exits_cleanly(reference):
    base, ref = reference
    out = base / "terminated"
    p = run_driver(base, out, "sigterm", 3)
    assert p.returncode == 0, p.stderr[-2000:]
    assert '"interrupted": "SIGTERM"' in p.stdout
    assert "SIGTERM" in p.stderr and "resume_from=auto" in p.stderr
    assert [c.step for c in list_checkpoints(out)] == [2, 3]
    assert resume(base, out) == ref


def test_sigterm_during_the_last_step_finishes_the_run(reference):
    """The training is complete: the run writes its model and summary as usual and says nothing of a
    checkpoint to resume from (it used to stop there: no model folder, a log naming a stale checkpoint)."""
    base, ref = reference
    out = base / "terminated_last"
    p = run_driver(base, out, "sigterm", STEPS)
    assert p.returncode == 0, p.stderr[-2000:]
    assert '"interrupted": null' in p.stdout and f'"step": {STEPS}' in p.stdout
    assert "resume_from=auto" not in p.stderr
    assert (out / "model.safetensors").is_file() and (out / "summary.txt").is_file()
    assert [c.step for c in list_checkpoints(out)][-1] == STEPS
    assert step_losses(out) == ref
