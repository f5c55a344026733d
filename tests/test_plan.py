"""`llamazoo plan`: closed-form weights/gradients/optimizer bytes equal what the trainer's objects hold;
the activation estimate is within 25% of a measured CPU training step."""
from __future__ import annotations

import functools
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from llamazoo.distributed.plan import (GiB, Layout, Workload, activation_bytes, parameters_per_device, plan_memory,
                                       smallest_layout)
from llamazoo.model.llama import LlamaConfig
from llamazoo.model.registry import named_config

SMALL = dict(vocab_size=2048, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=4, max_position_embeddings=512)


def tensor_bytes(ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


def optimizer_state_bytes(opt: torch.optim.Optimizer) -> int:
    """exp_avg and exp_avg_sq (AdamW's per-step counters are scalars and not counted)."""
    return sum(tensor_bytes(v for k, v in st.items() if k != "step") for st in opt.state.values())


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_weights_gradients_optimizer_match_the_trainers_objects(dtype):
    from llamazoo.io.hf import random_model
    from llamazoo.training.optim import MasterWeights, build_optimizer

    cfg = LlamaConfig(**{**SMALL, "num_hidden_layers": 2})
    model = random_model(cfg, dtype=torch.bfloat16 if dtype == "bf16" else torch.float32, seed=0)
    master = MasterWeights(model) if dtype == "bf16" else None
    opt = build_optimizer(model, 1e-3, 0.0, master)
    ids = torch.randint(0, cfg.vocab_size, (1, 9))
    F.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten()).backward()
    grads = tensor_bytes(p.grad for p in model.parameters())
    if master is not None:
        master.grads_to_master()
    opt.step()
    plan = plan_memory(cfg, Workload("train", dtype, 1, 8), Layout())
    assert plan.params_per_device == cfg.num_parameters
    assert plan.weights == tensor_bytes(model.parameters())
    assert plan.gradients == grads
    states = optimizer_state_bytes(opt) + (tensor_bytes(master.master) if master is not None else 0)
    assert plan.optimizer == states


def test_closed_form_numbers_llama2_70b():
    cfg = named_config("llama2-70b")
    P = 68_976_648_192
    assert cfg.num_parameters == P
    w = Workload("train", "bf16", 1, 4096)
    one = plan_memory(cfg, w, Layout())
    assert (one.weights, one.gradients, one.optimizer) == (2 * P, 2 * P, 12 * P)
    # TP 8: every linear and the vocabulary split 8 ways, the 161 norms (hidden 8192) replicated.
    norms = (2 * 80 + 1) * 8192
    assert parameters_per_device(cfg, Layout(tp=8)) == (P - norms) // 8 + norms
    fsdp = plan_memory(cfg, w, Layout(tp=8, dp=8, data_parallel="fsdp"))
    per = -(-((P - norms) // 8 + norms) // 8)
    assert (fsdp.weights, fsdp.gradients, fsdp.optimizer) == (4 * per, 4 * per, 8 * per)
    gen = plan_memory(cfg, Workload("generate", "bf16", 2, 4096), Layout(tp=8))
    assert gen.kv_cache == 2 * 80 * 2 * 4096 * 1 * 128 * 2 and gen.gradients == gen.optimizer == 0


def test_smallest_layout_for_llama2_70b_on_80gb():
    cfg = named_config("llama2-70b")
    w = Workload("train", "bf16", 1, 4096)
    assert not plan_memory(cfg, w, Layout(tp=8)).fits  # TP alone cannot hold 16 bytes per parameter
    best = smallest_layout(cfg, w, 80.0)
    assert best is not None and best.fits and best.total <= 0.9 * 80 * GiB
    assert best.layout.devices > 8
    smaller = [Layout(tp, dp, "fsdp") for tp in (1, 2, 4, 8) for dp in (1, 2, 4, 8, 16, 32, 64)
               if tp * dp < best.layout.devices]
    assert not any(plan_memory(cfg, w, lay).fits for lay in smaller)


def measured_activation_peak(cfg: LlamaConfig, dtype: torch.dtype, B: int, T: int, checkpointing: bool) -> int:
    """Peak bytes above parameters and gradients during forward + backward (torch's MemTracker)."""
    from torch.distributed._tools.mem_tracker import MemTracker
    from torch.utils.checkpoint import checkpoint

    from llamazoo.io.hf import random_model

    model = random_model(cfg, dtype=dtype, seed=0)
    if checkpointing:
        for layer in model.model.layers:
            layer.forward = functools.partial(checkpoint, layer.forward, use_reentrant=False)
    ids = torch.randint(0, cfg.vocab_size, (B, T + 1), generator=torch.Generator().manual_seed(0))
    tracker = MemTracker()
    tracker.track_external(model)
    with tracker:
        # As the trainer does: the logits are not kept alive outside the loss.
        F.cross_entropy(model(ids[:, :-1]).flatten(0, 1).float(), ids[:, 1:].flatten()).backward()
    peak = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]
    return sum(v for k, v in peak.items() if getattr(k, "value", k) in ("Activation", "Temp"))


@pytest.mark.parametrize("dtype,checkpointing", [("fp32", False), ("bf16", False), ("fp32", True), ("bf16", True)])
def test_activation_estimate_within_25_percent_of_a_measured_step(dtype, checkpointing):
    torch.manual_seed(0)
    cfg = LlamaConfig(**SMALL)
    B, T = 2, 256
    measured = measured_activation_peak(cfg, torch.bfloat16 if dtype == "bf16" else torch.float32, B, T,
                                        checkpointing)
    estimate = activation_bytes(cfg, Workload("train", dtype, B, T, checkpointing))
    print(f"{dtype} checkpointing={checkpointing}: estimate {estimate}, measured {measured}")
    assert abs(estimate - measured) <= 0.25 * measured, (estimate, measured)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llamazoo", "plan", *args], capture_output=True, text=True)


def test_cli_prints_the_table_and_the_smallest_layout():
    p = run_cli("llama2-70b", "--seq-len", "4096", "--tp", "8", "--dp", "8", "--data-parallel", "fsdp")
    assert p.returncode == 0, p.stderr
    for row in ("weights", "gradients", "optimizer states", "activations", "total", "Smallest layout that fits"):
        assert row in p.stdout
    p = run_cli("tiny-gqa", "--mode", "generate", "--tp", "2")
    assert p.returncode == 0 and "KV cache" in p.stdout and "gradients" not in p.stdout
    p = run_cli("tiny-gqa", "--tp", "3")
    assert p.returncode == 1 and "num_key_value_heads=2" in p.stderr and "Traceback" not in p.stderr
