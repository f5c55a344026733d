"""`llamazoo plan --method lora|qlora`: base, adapter, gradient and optimizer bytes equal what LoRATrainer's
objects hold; Llama-2-7b QLoRA at 2048 tokens fits one 24 GB GPU and Llama-2-70b QLoRA one 80 GB GPU."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from llamazoo.distributed.plan import GiB, Layout, Workload, plan_memory, smallest_layout
from llamazoo.model.llama import LlamaConfig
from llamazoo.model.registry import named_config

SMALL = dict(vocab_size=2048, hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=8,
             num_key_value_heads=4, max_position_embeddings=512)


def tensor_bytes(ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


@pytest.mark.parametrize("method,dtype", [("lora", "bf16"), ("qlora", "fp32"), ("qlora", "bf16")])
def test_bytes_match_the_lora_trainers_objects(method, dtype):
    from llamazoo.io.hf import random_model
    from llamazoo.model.lora import LoRASpec, apply_lora
    from llamazoo.training.optim import MasterWeights, build_optimizer

    cfg = LlamaConfig(**SMALL)
    model = random_model(cfg, dtype=torch.bfloat16 if dtype == "bf16" else torch.float32, seed=0)
    apply_lora(model, LoRASpec(rank=8, alpha=16), "nf4" if method == "qlora" else "none")
    master = MasterWeights(model) if dtype == "bf16" else None
    opt = build_optimizer(model, 1e-3, 0.0, master)
    ids = torch.randint(0, cfg.vocab_size, (1, 9))
    F.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten()).backward()
    adapters = [p for p in model.parameters() if p.requires_grad]
    grads = tensor_bytes(p.grad for p in adapters)
    if master is not None:
        master.grads_to_master()
    opt.step()
    plan = plan_memory(cfg, Workload("train", dtype, 1, 8, method=method, lora_rank=8), Layout())
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert plan.weights == tensor_bytes(frozen) + tensor_bytes(model.buffers()) - tensor_bytes([model.inv_freq])
    assert plan.adapters == tensor_bytes(adapters) and plan.gradients == grads
    states = sum(tensor_bytes(v for k, v in st.items() if k != "step") for st in opt.state.values())
    assert plan.optimizer == states + (tensor_bytes(master.master) if master is not None else 0)
    assert (plan.dequant_buffer > 0) == (method == "qlora")


def test_qlora_fits_llama2_7b_on_24gb_and_llama2_70b_on_80gb():
    w7 = Workload("train", "bf16", 1, 2048, method="qlora", lora_rank=16)
    seven = plan_memory(named_config("llama2-7b"), w7, Layout(), device_gib=24)
    assert seven.fits and seven.weights < 0.3 * 2 * named_config("llama2-7b").num_parameters
    assert not plan_memory(named_config("llama2-7b"), Workload("train", "bf16", 1, 2048), Layout(), 24).fits
    assert not plan_memory(named_config("llama2-7b"), Workload("train", "bf16", 1, 2048, method="lora"), Layout(),
                           24).fits
    cfg70 = named_config("llama2-70b")
    w70 = Workload("train", "bf16", 1, 2048, activation_checkpointing=True, method="qlora", lora_rank=16)
    seventy = plan_memory(cfg70, w70, Layout(), device_gib=80)
    assert seventy.fits and seventy.total < 48 * GiB
    best = smallest_layout(cfg70, w70, 80.0)
    assert best is not None and best.layout.devices == 1
    # without activation checkpointing the activations alone exceed the card, and TP is not offered for LoRA
    assert smallest_layout(cfg70, Workload("train", "bf16", 1, 2048, method="qlora"), 80.0) is None


def test_cli_shows_lora_and_qlora_rows():
    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "llamazoo", "plan", *args], capture_output=True, text=True)

    p = run("llama2-7b", "--seq-len", "2048", "--method", "qlora", "--device-memory", "24")
    assert p.returncode == 0, p.stderr
    assert "bf16 QLoRA (NF4 base, rank 16) training, batch 1 x 2048 per device, 1 device" in p.stdout
    for row in ("base weights (frozen)", "adapters", "gradients", "optimizer states", "activations",
                "dequantization buffer", "fits", "Smallest layout that fits: 1 device"):
        assert row in p.stdout
    p = run("llama2-7b", "--seq-len", "2048")
    assert p.returncode == 0 and "(LoRA rank 16: " in p.stdout and "QLoRA: " in p.stdout
    p = run("tiny", "--mode", "generate", "--method", "lora")
    assert p.returncode == 1 and "--method lora plans training" in p.stderr
