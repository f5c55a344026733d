"""`torchrun -m llamazoo train` with DDP, FSDP2, TP and DP x TP equals one process with the same global
batch (per-step losses and final weights, fp32 on CPU with gloo); two torchrun invocations with
--nnodes=2 on 127.0.0.1 train together; the HF folder a sharded run writes loads in transformers."""
from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch
from test_distributed_parallel import free_port, torchrun, torchrun_env
from train_helpers import random_dataset, tiny_config_file

from llamazoo.config import TrainConfig, load_config
from llamazoo.training.trainer import train

STEPS = 4
GLOBAL_BATCH = 4


def overrides(base: Path, out: Path, per_worker_batch: int, *extra: str) -> list[str]:
    return [f"training.dataset={base / 'ds'}", f"checkpoint.config_name={base / 'c.json'}",
            f"training.output_dir={out}", "model.device=cpu", f"training.batch_size={per_worker_batch}",
            "training.learning_rate=1e-3", "training.max_grad_norm=0.5", "training.weight_decay=0.1",
            f"training.end_early_at_step={STEPS}", "training.evaluate=false", "training.save_every_steps=2", *extra]


def step_losses(out: Path) -> list[float]:
    with (out / "per_step_metrics.csv").open() as f:
        return [float(r["Step Loss"]) for r in csv.DictReader(f)]


def weights(out: Path) -> dict[str, torch.Tensor]:
    from llamazoo.io.hf import load_model

    return load_model(out).state_dict()


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """One process, global batch 4."""
    base = tmp_path_factory.mktemp("dist_train")
    random_dataset(base / "ds", L=32, n_articles=60)
    tiny_config_file(base / "c.json", tie_word_embeddings=True)
    train(load_config(TrainConfig, None, overrides(base, base / "ref", GLOBAL_BATCH)), progress=False)
    return base


def run_parallel(base: Path, name: str, nproc: int, tp: int, dp_kind: str) -> Path:
    out = base / name
    dp = nproc // tp
    torchrun(nproc, ["-m", "llamazoo", "train", "--no-progress",
                     *overrides(base, out, GLOBAL_BATCH // dp, f"parallel.data_parallel={dp_kind}",
                                f"parallel.tensor_parallel={tp}")], timeout=240)
    return out


def assert_same_training(base: Path, out: Path, steps: slice = slice(None)) -> None:
    ref, got = step_losses(base / "ref")[steps], step_losses(out)
    assert len(got) == len(ref)
    assert max(abs(a - b) for a, b in zip(ref, got)) <= 1e-5, (ref, got)
    w_ref, w_got = weights(base / "ref"), weights(out)
    assert w_ref.keys() == w_got.keys()
    for k in w_ref:
        assert (w_ref[k] - w_got[k]).abs().max().item() <= 1e-5, k


@pytest.mark.parametrize("name,nproc,tp,dp_kind", [("ddp2", 2, 1, "ddp"), ("fsdp2", 2, 1, "fsdp"),
                                                   ("tp2", 2, 2, "ddp"), ("fsdp2_tp2", 4, 2, "fsdp")])
def test_parallel_training_equals_one_process(reference, name, nproc, tp, dp_kind):
    out = run_parallel(reference, name, nproc, tp, dp_kind)
    assert_same_training(reference, out)
    summary = (out / "summary.txt").read_text()
    assert f"Number of DP workers" in summary and str(nproc // tp) in summary.split("Number of DP workers")[1][:10]
    if name == "fsdp2":  # the folder written from sharded state loads in transformers with equal logits
        import transformers

        from llamazoo.io.hf import load_model

        ours = load_model(out)
        theirs = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        ids = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            assert (ours(ids) - theirs(ids).logits).abs().max().item() <= 1e-4


def test_two_nodes_on_localhost_train_together(reference):
    """Two torchrun invocations (one process each) meet through a c10d rendezvous and train as DDP 2."""
    out = reference / "nnodes2"
    port = free_port()
    run_id = uuid.uuid4().hex[:8]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
           "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}", f"--rdzv_id={run_id}",
           "-m", "llamazoo", "train", "--no-progress", *overrides(reference, out, GLOBAL_BATCH // 2)]
    nodes = [subprocess.Popen(cmd, env=torchrun_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [p.communicate(timeout=240) for p in nodes]
    for p, (so, se) in zip(nodes, results):
        assert p.returncode == 0, f"{so[-2000:]}\n{se[-4000:]}"
    assert_same_training(reference, out)


def test_sharded_run_resumes_at_the_same_world_size_only(reference):
    """FSDP 2 resumed (resume_from=auto) from its step-2 checkpoint logs the uninterrupted run's losses for steps 3-4; one
    process refuses that checkpoint with a clear error."""
    ckpt = reference / "fsdp2" / "checkpoints" / "step_2"
    if not ckpt.is_dir():
        run_parallel(reference, "fsdp2", 2, 1, "fsdp")
    out = reference / "fsdp2_resumed"  # resume_from=auto finds the step-2 checkpoint there
    shutil.copytree(ckpt, out / "checkpoints" / "step_2")
    p = torchrun(2, ["-m", "llamazoo", "train", "--no-progress",
                     *overrides(reference, out, GLOBAL_BATCH // 2, "parallel.data_parallel=fsdp",
                                "training.resume_from=auto")], timeout=240)
    assert "resuming from" in p.stderr and "starting fresh" not in p.stderr, p.stderr[-3000:]
    ref = step_losses(reference / "ref")
    resumed = step_losses(out)
    assert len(resumed) == 2 and max(abs(a - b) for a, b in zip(resumed, ref[2:])) <= 1e-5
    # torch.distributed.checkpoint shards, written atomically: no HF weights gathered, no temp folder left
    assert (ckpt / "dcp" / ".metadata").is_file() and not (ckpt / "model.safetensors").exists()
    assert not list(ckpt.parent.glob(".*.incomplete-*"))
    assert_same_training(reference, out, steps=slice(2, None))
    p = subprocess.run([sys.executable, "-m", "llamazoo", "train", "--no-progress",
                        *overrides(reference, reference / "one_resumed", GLOBAL_BATCH, f"training.resume_from={ckpt}")],
                       env=torchrun_env(), capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and "2 data-parallel worker(s)" in p.stderr and "Traceback" not in p.stderr


def test_tensor_parallel_bf16_resumes_exactly(reference):
    """TP 2 in bf16: the fp32 master weights are DTensor shards, saved with the model and optimizer by
    torch.distributed.checkpoint; resumed from step 2, steps 3-4 and the final weights are bit-identical
    to the uninterrupted run's."""
    full, resumed = reference / "tp2_bf16", reference / "tp2_bf16_resumed"
    args = ("parallel.tensor_parallel=2", "training.dtype=bf16")
    torchrun(2, ["-m", "llamazoo", "train", "--no-progress", *overrides(reference, full, GLOBAL_BATCH, *args)],
             timeout=240)
    ckpt = full / "checkpoints" / "step_2"
    assert json.loads((ckpt / "train_state.json").read_text())["master_weights_saved"] is True
    torchrun(2, ["-m", "llamazoo", "train", "--no-progress",
                 *overrides(reference, resumed, GLOBAL_BATCH, *args, f"training.resume_from={ckpt}")], timeout=240)
    assert step_losses(resumed) == step_losses(full)[2:]
    w_full, w_resumed = weights(full), weights(resumed)
    assert all(torch.equal(w_full[k], w_resumed[k]) for k in w_full)
    assert w_full["model.embed_tokens.weight"].dtype == torch.bfloat16
