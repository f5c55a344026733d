"""LoRA under `torchrun -m llamazoo train` equals one process with the same global batch: per-step losses and
the adapter it writes (fp32 on CPU with gloo). QLoRA with FSDP2 (the frozen base sharded, the NF4 buffers
replicated, the adapters sharded and trained) on a tied model; LoRA with DDP (only the adapters' gradients
all-reduced) on an untied one."""
from __future__ import annotations

import csv
from pathlib import Path

import pytest
from safetensors.torch import load_file
from test_distributed_parallel import torchrun
from train_helpers import random_dataset, tiny_config_file

from llamazoo.config import TrainConfig, load_config
from llamazoo.training.trainer import train


def overrides(base: Path, out: Path, per_worker_batch: int, *extra: str) -> list[str]:
    return [f"training.dataset={base / 'ds'}", f"checkpoint.config_name={base / 'c.json'}",
            f"training.output_dir={out}", "model.device=cpu", f"training.batch_size={per_worker_batch}",
            "training.learning_rate=2e-3", "training.max_grad_norm=0.5", "training.end_early_at_step=4",
            "training.evaluate=false", "training.lora.rank=4", *extra]


def step_losses(out: Path) -> list[float]:
    with (out / "per_step_metrics.csv").open() as f:
        return [float(r["Step Loss"]) for r in csv.DictReader(f)]


@pytest.mark.parametrize("layout,quant,tied", [("fsdp", "nf4", True), ("ddp", "none", False)])
def test_lora_under_torchrun_equals_one_process(tmp_path, layout, quant, tied):
    random_dataset(tmp_path / "ds", L=32, n_articles=60)
    tiny_config_file(tmp_path / "c.json", tie_word_embeddings=tied)
    q = f"training.lora.base_quantization={quant}"
    train(load_config(TrainConfig, None, overrides(tmp_path, tmp_path / "one", 4, q)), progress=False)
    torchrun(2, ["-m", "llamazoo", "train", "--no-progress",
                 *overrides(tmp_path, tmp_path / layout, 2, q, f"parallel.data_parallel={layout}")], timeout=240)
    ref, got = step_losses(tmp_path / "one"), step_losses(tmp_path / layout)
    assert len(got) == 4 and max(abs(a - b) for a, b in zip(ref, got)) <= 1e-5, (ref, got)
    a = load_file(tmp_path / "one" / "adapter_model.safetensors")
    b = load_file(tmp_path / layout / "adapter_model.safetensors")
    assert a.keys() == b.keys() and len(a) == 2 * 7 * 2
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5
