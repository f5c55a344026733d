"""The one real-model training test: `llamazoo prepare` on the dialogue example (templated help-desk
conversations from tests/generated_data.py), then a short chat fine-tune of the embedded
SmolLM2-135M-Instruct through the CLI; the dev loss must go down.

Cost: ten optimizer steps at batch 1 (rows trimmed to their own length rounded up to 32; 28 train rows
of ~54 tokens), one thread; the dev loss falls from 3.00 to ~0.13 as the model learns the answers'
templates (24 steps: ~0.09, for twice the time)."""
from __future__ import annotations

import csv

import torch

from llamazoo.cli import main as cli_main


def test_prepare_then_finetune_default_smollm2_lowers_dev_loss(tmp_path, examples, default_model_dir, capsys):
    data = tmp_path / "dialogue"
    rc = cli_main(["prepare", "--input_path", str(examples / "dialogue.jsonl"),
                   "--output_path", str(data), "--max_seq_length", "256", "--input_packing_config",
                   "single::truncate_right", "--num_training_splits", "2", "--num_dev_splits", "1",
                   "--num_test_splits", "0", "--num_workers", "1", "--no_progress"])
    assert rc == 0, capsys.readouterr().err
    out = tmp_path / "out"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two spinning threads on a busy shared 2-core machine run many times slower
    try:
        rc = cli_main(["train", "--no-progress", f"training.dataset={data}", "checkpoint.model_name_or_path=default",
                       "model.max_seq_length=256", "model.device=cpu", "training.batch_size=1",
                       "training.learning_rate=1e-4", "training.prompt_loss_weight=0.0",
                       "training.end_early_at_step=10",
                       f"training.output_dir={out}"])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0, capsys.readouterr().err
    with (out / "eval_metrics.csv").open() as f:
        evals = [(int(r["Step"]), float(r["Dev Loss"])) for r in csv.DictReader(f)]
    assert evals[0][0] == 0 and evals[-1][0] == 10
    assert evals[-1][1] < evals[0][1] - 0.3, evals
    assert (out / "tokenizer.json").is_file() and (out / "model.safetensors").is_file()
