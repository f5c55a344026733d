"""Tensor parallel, DDP, FSDP2 and DP x TP on CPU with gloo, against one process.

Each world is launched once with torchrun (tests/distributed_workers.py) and runs several layouts; the
tests below assert on what its ranks report. Tiny models and OMP_NUM_THREADS=1 keep it cheap.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llamazoo.model.llama import LlamaConfig

HERE = Path(__file__).resolve().parent
# GQA (4 query heads, 2 KV heads) and tied embeddings: the cases a TP plan gets wrong first.
CFG = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True, rms_norm_eps=1e-5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", TORCH_CPP_LOG_LEVEL="ERROR")
    env["PYTHONPATH"] = str(HERE.parent) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def torchrun(nproc: int, args: list[str], timeout: float = 180, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), *args]
    p = subprocess.run(cmd, env=torchrun_env(), capture_output=True, text=True, timeout=timeout)
    if check:
        assert p.returncode == 0, f"torchrun failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}"
    return p


def make_checkpoint(folder: Path, **overrides) -> Path:
    from llamazoo.io.hf import random_model, save_model

    model = random_model(LlamaConfig(**{**CFG, **overrides}), seed=0)
    with torch.no_grad():  # norms away from 1 so that a wrongly sharded norm would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    save_model(model, folder, max_shard_size=60_000)  # several files: slices cross file boundaries
    return folder


def run_world(tmp: Path, scenario: str, nproc: int) -> list[dict]:
    ckpt = make_checkpoint(tmp / "ckpt")
    torchrun(nproc, [str(HERE / "distributed_workers.py"), scenario, str(tmp), str(ckpt)])
    return [json.loads((tmp / f"{scenario}-rank{r}.json").read_text()) for r in range(nproc)]


@pytest.fixture(scope="module")
def world2(tmp_path_factory) -> tuple[list[dict], Path]:
    tmp = tmp_path_factory.mktemp("world2")
    return run_world(tmp, "world2", 2), tmp


@pytest.fixture(scope="module")
def world4(tmp_path_factory) -> tuple[list[dict], Path]:
    tmp = tmp_path_factory.mktemp("world4")
    return run_world(tmp, "world4", 4), tmp


def assert_training_equal(r: dict, loss_tol: float, weight_tol: float) -> None:
    assert len(r["losses"]) == len(r["ref_losses"]) >= 1
    for a, b in zip(r["losses"], r["ref_losses"]):
        assert abs(a - b) <= loss_tol, (r["losses"], r["ref_losses"])
    assert r["weight_diff"] <= weight_tol, r["weight_diff"]


def test_tp_logits_equal_one_process(world2):
    ranks, _ = world2
    for r in ranks:
        assert r["tp_logits_diff"] <= 1e-4
        assert r["tp_local_kv_heads"] == 1  # 2 KV heads over 2 ranks: the cache is sharded by heads


def test_tp_greedy_generation_identical(world2):
    ranks, _ = world2
    for r in ranks:
        assert r["tp_greedy"] == r["ref_greedy"]


def test_tp_training_steps_equal_one_process(world2):
    for r in world2[0]:
        assert_training_equal(r["tp_train"], 1e-5, 1e-5)


def test_ddp_losses_and_weights_equal_one_process(world2):
    for r in world2[0]:
        assert_training_equal(r["ddp_train"], 1e-5, 1e-5)


def test_fsdp_losses_and_weights_equal_one_process(world2):
    for r in world2[0]:
        assert_training_equal(r["fsdp_train"], 1e-5, 1e-5)


def test_kv_heads_not_divisible_is_a_clear_error(world2):
    msg = world2[0][0]["tp_error"]
    assert msg and "parallel.tensor_parallel=2" in msg and "num_key_value_heads=3" in msg


def test_dp_x_tp_training_step_equals_one_process(world4):
    ranks, _ = world4
    assert sorted((r["dp_rank"], r["tp_rank"]) for r in ranks) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for r in ranks:
        assert_training_equal(r["dp2tp2_train"], 1e-5, 1e-5)
    assert "parallel.data_parallel=fsdp" in ranks[0]["ddp_tp_error"]


@pytest.mark.parametrize("world,folder", [("world2", "tp_saved"), ("world2", "fsdp_saved"),
                                          ("world4", "dp2tp2_saved")])
def test_sharded_save_loads_in_transformers(world, folder, request):
    """The folder a sharded run wrote loads in transformers; its logits equal our model's."""
    import transformers

    from llamazoo.io.hf import load_model

    _, tmp = request.getfixturevalue(world)
    out = tmp / folder
    ours = load_model(out)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.randint(0, CFG["vocab_size"], (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (ours(ids) - theirs(ids).logits).abs().max().item() <= 1e-4
    if folder == "tp_saved":  # untrained: exactly the checkpoint it was loaded from
        src = load_model(tmp / "ckpt")
        for k, v in src.state_dict().items():
            assert torch.equal(v, ours.state_dict()[k]), k
