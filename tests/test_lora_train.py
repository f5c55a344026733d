"""`llamazoo train` with LoRA / QLoRA (tiny models): only the adapters train and the base stays bit-identical,
checkpoints hold the adapters and resume exactly after SIGKILL, the output is a PEFT adapter folder, and
wrong combinations are one clear error."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import random_dataset

from conftest import hf_tiny_model
from llamazoo.config import TrainConfig, load_config
from llamazoo.io.hf import load_model
from llamazoo.model.lora import LoRALinear, projection_names
from llamazoo.model.quant import QuantizedLinear
from llamazoo.training.state import list_checkpoints, load_checkpoint
from llamazoo.training.trainer import train, trainer_class

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).resolve().parents[1]
STEPS = 6


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("lora_train")
    random_dataset(base / "ds", n_articles=40, vocab=256)
    hf_tiny_model(num_key_value_heads=2, max_position_embeddings=256).save_pretrained(base / "model")
    return base


def overrides(base: Path, out: Path, *extra: str) -> list[str]:
    return [f"training.dataset={base / 'ds'}", f"checkpoint.model_name_or_path={base / 'model'}",
            f"training.output_dir={out}", "model.device=cpu", "training.batch_size=2", "training.learning_rate=5e-3",
            "training.lr_schedule=cosine", "training.warmup_steps=2", "training.weight_decay=0.1",
            "training.max_grad_norm=0.5", "training.grad_accumulation_steps=2",
            "training.activation_checkpointing=true",
            "training.num_epochs=2", f"training.end_early_at_step={STEPS}", "training.save_every_steps=2",
            "training.evaluate=false",
            "training.lora.rank=4", "training.lora.alpha=8", *extra]


def step_losses(out: Path) -> list[float]:
    with (out / "per_step_metrics.csv").open() as f:
        return [float(r["Step Loss"]) for r in csv.DictReader(f)]


@pytest.mark.parametrize("quant,dtype", [("none", "bf16"), ("nf4", "fp32")])
def test_only_adapters_train_and_the_base_stays_bit_identical(setup, tmp_path, quant, dtype, capsys):
    out = tmp_path / "out"
    cfg = load_config(TrainConfig, None, overrides(setup, out, f"training.lora.base_quantization={quant}",
                                                   f"training.dtype={dtype}", 'training.lora.target_modules=["q_proj",'
                                                   '"v_proj","up_proj"]'))
    trainer = trainer_class(cfg)(cfg, progress=False)
    try:
        result = trainer.fit()
    finally:
        trainer.close()
    core = trainer.core
    trained = [n for n, p in core.named_parameters() if p.requires_grad]
    assert trained == [f"model.layers.{i}.{m}.lora_{ab}.weight" for i in range(2)
                       for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.up_proj") for ab in "AB"]
    n_adapter = 2 * (4 * (64 + 64) + 4 * (64 + 32) + 4 * (64 + 112))
    err = capsys.readouterr().err
    assert f"LoRA: training {n_adapter:,} adapter parameters (rank 4, alpha 8, 6 projections: q_proj, v_proj, " \
           f"up_proj); " in err
    fresh = load_model(setup / "model", dtype=torch.bfloat16 if dtype == "bf16" else torch.float32)
    fresh_sd, sd = fresh.state_dict(), core.state_dict()
    for name in projection_names(fresh):
        base = core.get_submodule(name)
        base = base.base_layer if isinstance(base, LoRALinear) else base
        if quant == "nf4":  # the frozen codes are those of the loaded weight
            assert isinstance(base, QuantizedLinear)
            codes = QuantizedLinear(fresh.get_submodule(name), "nf4").quantized()
            assert all(torch.equal(t, codes[k]) for k, t in base.quantized().items())
        else:
            assert torch.equal(base.weight, fresh_sd[name + ".weight"])
    assert torch.equal(sd["model.embed_tokens.weight"], fresh_sd["model.embed_tokens.weight"])
    assert torch.equal(sd["model.norm.weight"], fresh_sd["model.norm.weight"])
    # outputs: a PEFT adapter folder (fp32 masters of bf16 adapters), checkpoints of the adapters alone
    assert result["step"] == STEPS
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in out.iterdir()}
    assert not (out / "model.safetensors").exists() and not (out / "config.json").exists()
    adapter = load_file(out / "adapter_model.safetensors")
    assert len(adapter) == 12 and all(t.dtype == torch.float32 for t in adapter.values())
    lora_b = core.model.layers[1].mlp.up_proj.lora_B.weight
    assert torch.equal(adapter["base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"].to(lora_b.dtype), lora_b)
    ck_sd, state = load_checkpoint(list_checkpoints(out)[-1].path)
    assert sorted(ck_sd) == sorted(trained) and state["lora"]["base_quantization"] == quant
    assert json.loads((out / "adapter_config.json").read_text())["target_modules"] == ["q_proj", "up_proj", "v_proj"]


DRIVER = r"""
import json, os, signal, sys
from llamazoo.config import TrainConfig, load_config
from llamazoo.training.trainer import TrainHooks, train
args = json.loads(sys.argv[1])
def on_step(step, metrics):
    if step == args["at"]:
        os.kill(os.getpid(), signal.SIGKILL)
train(load_config(TrainConfig, None, args["overrides"]), TrainHooks(on_step_end=on_step), progress=False)
"""


def test_qlora_bf16_resumes_exactly_after_sigkill(setup):
    extra = ("training.lora.base_quantization=nf4", "training.dtype=bf16", "training.lora.dropout=0.1")
    ref = setup / "ref"
    train(load_config(TrainConfig, None, overrides(setup, ref, *extra)), progress=False)
    killed = setup / "killed"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    args = json.dumps({"at": 3, "overrides": overrides(setup, killed, *extra)})
    p = subprocess.run([sys.executable, "-c", DRIVER, args],
                       capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == -9, p.stderr[-2000:]
    assert [c.step for c in list_checkpoints(killed)] == [2]
    train(load_config(TrainConfig, None, overrides(setup, killed, *extra, "training.resume_from=auto")), progress=False)
    assert step_losses(killed) == step_losses(ref)
    a, b = load_file(ref / "adapter_model.safetensors"), load_file(killed / "adapter_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_wrong_combinations_are_one_clear_error(setup, tmp_path):
    full = tmp_path / "full"
    train(load_config(TrainConfig, None, [o for o in overrides(setup, full) if not o.startswith("training.lora")]
                      + ["training.end_early_at_step=2"]), progress=False)
    with pytest.raises(ValueError, match=r"training.resume_from: the checkpoint holds 'lm_head.weight', "
                                         r"not an adapter weight of this LoRA run"):
        train(load_config(TrainConfig, None, overrides(setup, full, "training.resume_from=auto")), progress=False)
    lora = tmp_path / "lora"
    train(load_config(TrainConfig, None, overrides(setup, lora, "training.end_early_at_step=2")), progress=False)
    with pytest.raises(ValueError, match=r"training.lora.rank=8 but checkpoint.adapter .* has 4; leave "
                                         r"training.lora.rank unset to continue training the adapter as it is"):
        train(load_config(TrainConfig, None, overrides(setup, tmp_path / "again", f"checkpoint.adapter={lora}",
                                                       "training.lora.rank=8")), progress=False)
    with pytest.raises(ValueError, match=r"training.resume_from: the checkpoint: tensor "
                                         r"'model.layers.0.self_attn.q_proj.lora_A.weight' has "
                                         r"shape \(4, 64\), expected \(8, 64\) .*; resume with the training.lora "
                                         r"settings that wrote the checkpoint"):
        train(load_config(TrainConfig, None, overrides(setup, lora, "training.lora.rank=8",
                                                       "training.resume_from=auto")), progress=False)
