"""LoRA against PEFT on the default model's real weights (SmolLM2-135M-Instruct, its first 4 of 30 layers to
keep the test short): PEFT saves an adapter, `llamazoo train` trains it further for five fp32 steps, a plain
transformers + PEFT loop trains the same adapter on the same batches, and the losses and adapters agree;
the adapter llamazoo writes loads with `PeftModel.from_pretrained` and gives llamazoo's logits, merged or
not; `llamazoo merge` writes a HF folder that transformers loads with the same logits."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from train_helpers import article, pad_row, write_dataset

from llamazoo.cli import main as cli_main
from llamazoo.config import TrainConfig, load_config
from llamazoo.data.dataset import BatchSampler, PreparedDataset
from llamazoo.data.masks import IGNORE_INDEX
from llamazoo.io.hf import load_model, save_model
from llamazoo.training.batch import make_batch
from llamazoo.training.trainer import train

# AdamW moves an element whose gradient is near its eps (1e-8) by a fraction of the learning rate that the
# gradient's last digits decide (the two gradients agree to ~3e-8); at lr 1e-4 that stays well under 1e-5.
LAYERS, L, ROWS, BATCH, LR, SEED = 4, 64, 10, 2, 1e-4, 7
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, default_model_dir):
    """Runs both trainings once: (base folder, PEFT's initial adapter, llamazoo's output, PEFT's losses
    and trained adapter)."""
    import transformers
    from peft import LoraConfig, get_peft_model

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("lora_peft")
    try:
        base = root / "smollm2-4layers"
        m = load_model(default_model_dir, dtype=torch.float32)
        m.model.layers = m.model.layers[:LAYERS]
        m.config.num_hidden_layers = LAYERS
        save_model(m, base, tokenizer=default_model_dir)
        del m
        rng = np.random.default_rng(3)
        rows = [pad_row(*article(rng, int(rng.integers(4, 20)), int(rng.integers(10, 40)), 49152), L)
                for _ in range(ROWS)]
        data = write_dataset(root / "ds", rows, [], L, vocab_size=49152)

        torch.manual_seed(0)
        hf = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        peft_model = get_peft_model(hf, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS,
                                                   init_lora_weights=False))
        with torch.no_grad():  # lora_B small but not zero (PEFT's default): the adapter matters from step 1
            for n, p in peft_model.named_parameters():
                if "lora_B" in n:
                    p.mul_(0.05)
        init = root / "peft_init"
        peft_model.save_pretrained(init)

        out = root / "llamazoo"
        result = train(load_config(TrainConfig, None, [
            f"training.dataset={data}", f"checkpoint.model_name_or_path={base}", f"checkpoint.adapter={init}",
            f"training.output_dir={out}", "model.device=cpu", f"training.batch_size={BATCH}",
            f"training.learning_rate={LR}", "training.prompt_loss_weight=0.5", "training.evaluate=false",
            f"training.seed={SEED}"]), progress=False)

        # the reference: transformers + PEFT, torch AdamW, the same rows, labels and loss weights
        peft_model.train()
        opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=LR, weight_decay=0.0,
                                fused=True)
        ds = PreparedDataset(data, None)
        sampler = BatchSampler(len(ds.train), BATCH, SEED)
        cfg_t = load_config(TrainConfig, None, ["training.prompt_loss_weight=0.5"]).training
        losses = []
        for _ in range(ROWS // BATCH):
            _, _, idx = sampler.next()
            b = make_batch(*ds.train.read(idx), cfg_t, torch.device("cpu"))
            assert b.attention_mask is None  # one article a row: causal attention is article attention
            logits = peft_model(input_ids=b.input_ids).logits.float()
            per_token = F.cross_entropy(logits.flatten(0, 1), b.labels.flatten(), reduction="none",
                                        ignore_index=IGNORE_INDEX)
            loss = (per_token * b.weights.flatten()).sum() / b.weights.sum()
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        ds.close()
        peft_out = root / "peft_trained"
        peft_model.save_pretrained(peft_out)
        yield base, init, out, result, losses, peft_out
    finally:
        torch.set_num_threads(threads)


def test_five_steps_give_peft_losses_and_adapters(trained):
    from safetensors.torch import load_file

    base, init, out, result, peft_losses, peft_out = trained
    assert len(result["losses"]) == 5
    with (out / "per_step_metrics.csv").open() as f:
        assert [float(r["Step Loss"]) for r in csv.DictReader(f)] == pytest.approx(result["losses"], abs=1e-6)
    assert max(abs(a - b) for a, b in zip(result["losses"], peft_losses)) <= 1e-5, (result["losses"], peft_losses)
    ours, theirs = load_file(out / "adapter_model.safetensors"), load_file(peft_out / "adapter_model.safetensors")
    assert sorted(ours) == sorted(theirs) and len(ours) == 2 * 7 * LAYERS
    start = load_file(init / "adapter_model.safetensors")
    for k in theirs:
        assert ours[k].dtype == torch.float32
        assert (ours[k] - theirs[k]).abs().max() <= 1e-5, k
        assert (ours[k] - start[k]).abs().max() > 2e-4, k  # it did train
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert (cfg["peft_type"], cfg["r"], cfg["lora_alpha"], sorted(cfg["target_modules"])) == \
        ("LORA", 8, 16, sorted(TARGETS))
    assert (out / "tokenizer.json").is_file() and not (out / "model.safetensors").exists()


def test_peft_loads_our_adapter_with_our_logits_merged_or_not(trained, tmp_path):
    import transformers
    from peft import PeftModel

    from llamazoo.io.adapter import load_adapter

    base, _, out, _, _, _ = trained
    ids = torch.randint(0, 49152, (2, 24), generator=torch.Generator().manual_seed(1))
    unmerged = load_model(base, dtype=torch.float32)
    load_adapter(unmerged, out)
    merged = load_model(base, dtype=torch.float32)
    load_adapter(merged, out, merge=True)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        ours, ours_merged = unmerged(ids), merged(ids)
        peft_model = PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(
            base, dtype=torch.float32), out).eval()
        theirs = peft_model(input_ids=ids).logits
        theirs_merged = peft_model.merge_and_unload()(input_ids=ids).logits
    plain = load_model(base, dtype=torch.float32)(ids)
    assert (ours - plain).abs().max() > 1e-2  # the adapter changes the logits
    for a in (ours, ours_merged):
        for b in (theirs, theirs_merged):
            assert (a - b).abs().max() <= 1e-4

    # llamazoo merge: a HF folder that transformers loads (no PEFT) with the same logits
    rc = cli_main(["merge", "--base", str(base), "--adapter", str(out), "--output", str(tmp_path / "merged")])
    assert rc == 0
    hf_merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    with torch.no_grad():
        assert (hf_merged(input_ids=ids).logits - ours).abs().max() <= 1e-4
    assert (tmp_path / "merged" / "tokenizer.json").is_file()
