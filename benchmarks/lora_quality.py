"""How much of a full fine-tune's dev-loss drop LoRA and QLoRA get in the same number of steps, on a chat
dataset prepared with --apply_chat_template, fine-tuning the default model (SmolLM2-135M-Instruct).

Data: the help-desk dialogues of tests/generated_data.py (2-4 turns each), through
`llamazoo prepare --apply_chat_template` (SmolLM2's template; single::truncate_right rows of 256 tokens,
train/dev splits). Every run: `llamazoo train` for the same steps at batch 1, completions only
(prompt_loss_weight 0), constant learning rate, the dev loss before and after. Each method gets the best of
a few learning rates (LoRA wants a larger one than full fine-tuning); QLoRA (NF4 base) runs at LoRA's best
and twice that unless --qlora-lrs names some.

QLoRA starts from a higher dev loss (its base is the NF4-rounded model), so its own drop flatters it; the
comparison that counts is from the original model's dev loss (full's "before") to where each run ends:
the "drop from the original" column, and the summary line's QLoRA/LoRA ratio of it.

Run:  python benchmarks/lora_quality.py [--steps 24] [--rank 16] [--full-lrs 5e-5,1e-4,2e-4]
      [--lora-lrs 5e-4,1e-3,2e-3] [--qlora-lrs LRS] [--threads 1] [--work DIR]
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def prepare(work: Path) -> Path:
    sys.path.insert(0, str(REPO / "tests"))
    from generated_data import write_examples

    from llamazoo.cli import main as cli_main

    examples = write_examples(work / "examples")
    data = work / "dialogue_chat"
    rc = cli_main(["prepare", "--input_path", str(examples / "dialogue.jsonl"), "--output_path", str(data),
                   "--max_seq_length", "256", "--input_packing_config", "single::truncate_right",
                   "--apply_chat_template", "--num_training_splits", "2", "--num_dev_splits", "1",
                   "--num_test_splits", "0", "--num_workers", "1", "--no_progress"])
    if rc:
        raise SystemExit("prepare failed")
    return data


def run(data: Path, out: Path, steps: int, lr: float, extra: list[str]) -> dict:
    from llamazoo.config import TrainConfig, load_config
    from llamazoo.training.trainer import train

    cfg = load_config(TrainConfig, None, [
        f"training.dataset={data}", "checkpoint.model_name_or_path=default", "model.max_seq_length=256",
        "model.device=cpu", "training.batch_size=1", f"training.learning_rate={lr}", "training.prompt_loss_weight=0.0",
        "training.num_epochs=1000", f"training.end_early_at_step={steps}", f"training.output_dir={out}", *extra])
    t0 = time.perf_counter()
    result = train(cfg, progress=False)
    import csv

    with (out / "eval_metrics.csv").open() as f:
        evals = [float(r["Dev Loss"]) for r in csv.DictReader(f)]
    return {"before": evals[0], "after": evals[-1], "drop": evals[0] - evals[-1], "seconds": time.perf_counter() - t0,
            "steps": result["step"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--full-lrs", default="5e-5,1e-4,2e-4")
    ap.add_argument("--lora-lrs", default="5e-4,1e-3,2e-3")
    ap.add_argument("--qlora-lrs", default=None, help="default: LoRA's best and twice it")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work", default=None, help="folder for the data and runs (default: a temporary one)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="lora_quality-"))
    data = prepare(work)
    lora = [f"training.lora.rank={args.rank}", f"training.lora.alpha={2 * args.rank}"]
    rows = []

    def best(name: str, lrs: list[float], extra: list[str]) -> dict:
        runs = []
        for lr in lrs:
            r = {"method": name, "lr": lr, **run(data, work / f"{name}-{lr:g}", args.steps, lr, extra)}
            print(f"{name} lr {lr:g}: dev loss {r['before']:.4f} -> {r['after']:.4f} ({r['seconds']:.0f} s)",
                  flush=True)
            rows.append(r)
            runs.append(r)
        return max(runs, key=lambda r: r["drop"])

    full = best("full", [float(x) for x in args.full_lrs.split(",")], [])
    lo = best("lora", [float(x) for x in args.lora_lrs.split(",")], lora)
    q_lrs = [float(x) for x in args.qlora_lrs.split(",")] if args.qlora_lrs else [lo["lr"], 2 * lo["lr"]]
    q = best("qlora-nf4", q_lrs, lora + ["training.lora.base_quantization=nf4"])
    base = full["before"]  # the original (unquantized) model's dev loss
    assert all(r["steps"] == args.steps for r in rows), [r["steps"] for r in rows]
    print(f"\n{args.steps} steps at batch 1, rank {args.rank}, alpha {2 * args.rank}, threads {args.threads}")
    print("| method | learning rate | dev loss before | dev loss after | drop | share of full's drop | "
          "drop from the original | seconds |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['method']} | {r['lr']:g} | {r['before']:.4f} | {r['after']:.4f} | {r['drop']:.4f} | "
              f"{r['drop'] / full['drop']:.1%} | {base - r['after']:.4f} | {r['seconds']:.0f} |")
    print(f"\nLoRA (best lr) gets {lo['drop'] / full['drop']:.1%} of full fine-tuning's dev-loss drop; QLoRA-nf4's dev "
          f"loss is {(q['after'] - lo['after']) / lo['after']:+.1%} of LoRA's ({q['after']:.4f} vs {lo['after']:.4f}), "
          f"its drop {q['drop'] / lo['drop']:.1%} of LoRA's; from the original model's dev loss {base:.4f}, "
          f"QLoRA-nf4 gets {(base - q['after']) / (base - lo['after']):.1%} of LoRA's drop")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
