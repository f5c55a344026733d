"""End-to-end training runs on tiny models: overfitting, outputs, transformers loading, exact batching."""
from __future__ import annotations

import csv
import json

import torch
from train_helpers import pack, random_dataset, tiny_config_file, write_dataset

from llamazoo.config import TrainConfig, load_config
from llamazoo.training.trainer import train


def config(tmp_path, ds, model_args, *extra):
    return load_config(TrainConfig, None, [f"training.dataset={ds}", *model_args, f"training.output_dir={tmp_path / 'out'}",
                                           "model.device=cpu", *extra])


def test_tiny_model_overfits_text_and_writes_a_loadable_hf_folder(tmp_path, tokenizers, examples):
    from llamazoo.io.tokenizer import load_tokenizer

    tok_dir = tokenizers("gpt2")
    tok = load_tokenizer(tok_dir)
    text = (examples / "pretraining.txt").read_text(encoding="utf-8").splitlines(keepends=True)[:2]
    arts = []
    for line in text:
        ids = tok.encode(line, add_special_tokens=False)[:40] + [tok.eos_token_id]
        arts.append((ids, [1] * (len(ids) - 1) + [3]))
    L = 48
    rows = [r for a in arts for r in pack([a], L)]
    rows = [(ids[:L - 1] + [tok.eos_token_id] * (L - len(ids[:L - 1])), types) for ids, types in rows]
    ds = write_dataset(tmp_path / "ds", rows, rows[:1], L, 1, vocab_size=50257, tokenizer_dir=tok_dir)
    cfg_file = tiny_config_file(tmp_path / "c.json", vocab=50257, bos_token_id=50256, eos_token_id=50256)
    cfg = config(tmp_path, ds, [f"checkpoint.config_name={cfg_file}"], "training.batch_size=2",
                 "training.learning_rate=5e-3", "training.num_epochs=60", "model.max_seq_length=48",
                 "training.weight_decay=0.01", "training.max_grad_norm=1.0")
    result = train(cfg, progress=False)
    assert result["losses"][-1] < 0.05, result["losses"][-5:]
    assert result["dev_loss"] < 0.05
    out = tmp_path / "out"
    # per_step_metrics.csv: the original's columns first, plain numbers
    with (out / "per_step_metrics.csv").open() as f:
        rows = list(csv.reader(f))
    assert rows[0][:4] == ["Tokens in Step", "Step Loss", "Learning Rate", "Time per Step"]
    assert rows[0][4] == "Gradient Norm" and len(rows) == 61
    assert all(float(x) >= 0 for r in rows[1:] for x in r)
    assert int(rows[1][0]) == 2 * L and float(rows[1][2]) == 5e-3
    summary = (out / "summary.txt").read_text()
    for key in ("Number of epochs: 60", "Per worker batch size: 2", "Per worker number of batches (steps): 60",
                "Number of DP workers: 1", f"Total tokens seen: {60 * 2 * L}", "Tokens per second:",
                "Average time per step:", "Dev loss:", "Dev perplexity:"):
        assert key in summary, key
    knobs = json.loads(summary.split("Model config: ")[1])
    assert knobs["fp32_logits"] is True and knobs["mixedp_attn"] is True
    assert (out / "eval_metrics.csv").read_text().startswith("Step,Dev Loss,Dev Perplexity")
    # transformers loads the folder (with the tokenizer) and its logits equal ours
    import transformers

    from llamazoo.io.hf import load_model

    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    ids = torch.tensor([hf_tok.encode(text[0])[:20]])
    ours = load_model(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, atol=1e-4, rtol=1e-4)


def test_grad_accumulation_and_batch_split_give_the_same_training(tmp_path):
    """batch 4 x 1 micro-batch == batch 2 x 2 micro-batches: the loss is normalized by the global weight sum."""
    ds = random_dataset(tmp_path / "ds", n_articles=30)
    cfg_file = tiny_config_file(tmp_path / "c.json")
    runs = {}
    for name, extra in (("one", ["training.batch_size=4"]),
                        ("accum", ["training.batch_size=2", "training.grad_accumulation_steps=2"])):
        cfg = load_config(TrainConfig, None, [f"training.dataset={ds}", f"checkpoint.config_name={cfg_file}",
                                              f"training.output_dir={tmp_path / name}", "model.device=cpu",
                                              "training.learning_rate=1e-3", "training.end_early_at_step=3",
                                              "training.evaluate=false", "training.lr_schedule=cosine",
                                              "training.warmup_steps=1", *extra])
        runs[name] = train(cfg, progress=False)["losses"]
    assert len(runs["one"]) == 3
    torch.testing.assert_close(torch.tensor(runs["one"]), torch.tensor(runs["accum"]), atol=1e-5, rtol=0)


def test_bf16_training_with_fp32_master_weights_learns(tmp_path):
    ds = random_dataset(tmp_path / "ds", n_articles=12, n_dev=0)
    cfg = config(tmp_path, ds, [f"checkpoint.config_name={tiny_config_file(tmp_path / 'c.json')}"],
                 "training.dtype=bf16", "training.batch_size=2", "training.learning_rate=2e-3", "training.num_epochs=8",
                 "training.activation_checkpointing=true")
    result = train(cfg, progress=False)
    assert result["losses"][-1] < result["losses"][0] - 0.5
    from safetensors.torch import load_file

    assert load_file(str(tmp_path / "out" / "model.safetensors"))["lm_head.weight"].dtype == torch.bfloat16


def test_compiled_layers_train_like_eager(tmp_path):
    """training.compile=true (each decoder layer through torch.compile, fused elementwise work) gives the
    eager run's losses to float rounding, with article attention masks and trimmed (varying) lengths."""
    ds = random_dataset(tmp_path / "ds", n_articles=24)
    cfg_file = tiny_config_file(tmp_path / "c.json")
    runs = {}
    for name in ("eager", "compile"):
        cfg = load_config(TrainConfig, None, [f"training.dataset={ds}", f"checkpoint.config_name={cfg_file}",
                                              f"training.output_dir={tmp_path / name}", "model.device=cpu",
                                              "training.batch_size=2", "training.learning_rate=1e-3",
                                              "training.end_early_at_step=3", "training.evaluate=false",
                                              f"training.compile={name == 'compile'}"])
        runs[name] = train(cfg, progress=False)["losses"]
    assert len(runs["eager"]) == 3
    torch.testing.assert_close(torch.tensor(runs["compile"]), torch.tensor(runs["eager"]), atol=1e-5, rtol=0)
