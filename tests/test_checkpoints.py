"""HF checkpoint folders in and out: round trips with transformers, shards, .bin, dtypes, memory."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

import llamazoo
from llamazoo.io.hf import load_model, save_model


def logits(model, ids):
    with torch.no_grad():
        out = model(ids)
    return out.logits if hasattr(out, "logits") else out


IDS = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))


def test_llamazoo_save_transformers_load(hf_folder, tmp_path):
    import transformers

    _, folder = hf_folder(num_key_value_heads=2, tie_word_embeddings=True)
    ours = load_model(folder)
    out = save_model(ours, tmp_path / "saved")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["torch_dtype"] == "float32"
    assert (out / "generation_config.json").is_file()
    assert not list(tmp_path.glob(".saved.incomplete-*")), "temporary folder left behind"
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert (logits(hf, IDS) - logits(ours, IDS)).abs().max().item() <= 1e-5


def test_save_shards_above_size_limit(hf_folder, tmp_path):
    import transformers

    _, folder = hf_folder()
    ours = load_model(folder)
    out = save_model(ours, tmp_path / "sharded", max_shard_size=100_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 1 and set(index["weight_map"].values()) == set(shards)
    assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert (logits(hf, IDS) - logits(ours, IDS)).abs().max().item() <= 1e-5
    again = load_model(out)
    assert torch.equal(logits(again, IDS), logits(ours, IDS))


def write_bin(hf, folder, shards: int):
    """transformers 5 no longer writes .bin: write what 4.x wrote (pytorch_model*.bin + index)."""
    for f in folder.glob("model*.safetensors*"):
        f.unlink()
    sd = hf.state_dict()
    names = list(sd)
    if shards == 1:
        torch.save(sd, folder / "pytorch_model.bin")
        return
    weight_map = {}
    for i in range(shards):
        file = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = {k: sd[k] for k in names[i::shards]}
        torch.save(part, folder / file)
        weight_map.update({k: file for k in part})
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def test_transformers_sharded_safetensors_load(hf_folder):
    hf, folder = hf_folder(save_kwargs=dict(max_shard_size="100KB"), num_key_value_heads=2)
    assert (folder / "model.safetensors.index.json").is_file()
    ours = load_model(folder)
    assert (logits(hf, IDS) - logits(ours, IDS)).abs().max().item() <= 1e-4


@pytest.mark.parametrize("shards", [1, 3])
def test_pytorch_bin_load(hf_folder, shards):
    hf, folder = hf_folder(num_key_value_heads=2)
    write_bin(hf, folder, shards)
    ours = load_model(folder)
    assert (logits(hf, IDS) - logits(ours, IDS)).abs().max().item() <= 1e-4


def test_bf16_checkpoint_loads_as_bf16_and_dtype_can_be_requested(hf_folder):
    hf, folder = hf_folder(dtype=torch.bfloat16)
    ours = load_model(folder)
    assert all(p.dtype == torch.bfloat16 for p in ours.parameters())
    as_fp32 = load_model(folder, dtype="float32")
    assert all(p.dtype == torch.float32 for p in as_fp32.parameters())
    assert torch.equal(as_fp32.lm_head.weight, hf.lm_head.weight.float())


def test_random_init_from_named_config_and_config_json(tmp_path):
    model = llamazoo.load_model("tiny-gqa", seed=0)
    std = model.model.layers[0].mlp.up_proj.weight.std().item()
    assert abs(std - 0.02) < 0.002  # HF's normal(0, initializer_range)
    assert torch.equal(model.model.norm.weight, torch.ones(64))
    out = save_model(model, tmp_path / "m")
    again = load_model(out / "config.json", seed=0)  # random init from a config.json
    assert torch.equal(again.lm_head.weight, model.lm_head.weight)


def test_save_model_writes_tokenizer(tmp_path, tokenizers):
    from llamazoo.io.tokenizer import load_tokenizer

    model = llamazoo.load_model("tiny")
    out = llamazoo.save_model(model, tmp_path / "with_tok", tokenizer=load_tokenizer(tokenizers("gpt2")))
    assert (out / "tokenizer.json").is_file()
    assert load_tokenizer(out).encode("hello world") == load_tokenizer(tokenizers("gpt2")).encode("hello world")


def test_save_replaces_existing_folder_atomically(tmp_path):
    model = llamazoo.load_model("tiny", seed=1)
    out = tmp_path / "m"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    save_model(model, out)
    assert not (out / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_load_peak_memory_is_below_1_3x_checkpoint(tmp_path):
    """A ~500 MB checkpoint loads without a second copy of the weights (RSS over the baseline)."""
    cfg = dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=12,
               num_attention_heads=16, num_key_value_heads=16)
    script = textwrap.dedent(f"""
        import os, threading, time, psutil, torch, json, sys
        from llamazoo.model.llama import LlamaConfig
        from llamazoo.io.hf import random_model, save_model, load_model
        out = sys.argv[1]
        m = random_model(LlamaConfig(**{cfg!r}), seed=0)
        save_model(m, out)
        del m
        import gc; gc.collect()
        size = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out) if f.endswith('.safetensors'))
        proc = psutil.Process(); base = proc.memory_info().rss; peak = [base]; stop = [False]
        def watch():
            while not stop[0]:
                peak[0] = max(peak[0], proc.memory_info().rss); time.sleep(0.002)
        t = threading.Thread(target=watch); t.start()
        model = load_model(out)
        s = sum(p.float().sum().item() for p in model.parameters())  # touch every weight
        stop[0] = True; t.join(); peak[0] = max(peak[0], proc.memory_info().rss)
        print(json.dumps(dict(size=size, extra=peak[0] - base)))
    """)
    res = subprocess.run([sys.executable, "-c", script, str(tmp_path / "big")], capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout.strip().splitlines()[-1])
    assert info["size"] > 450e6
    assert info["extra"] < 1.3 * info["size"], info
