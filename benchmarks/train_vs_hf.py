"""Training-step throughput: llamazoo's training step vs a plain loop over transformers.LlamaForCausalLM.

Same weights (the embedded SmolLM2-135M-Instruct by default), same batch of rows, same length; a step is
forward + backward + AdamW. Steps of the two alternate so that a busy machine slows both alike; the
median step time is reported. Run:  python benchmarks/train_vs_hf.py [--model default] [--batch 4]
[--seq 256] [--steps 3] [--dtypes fp32,bf16] [--rows dense|chat]

--rows dense: every row one full-length article (no padding: nothing for llamazoo to skip);
--rows chat: rows of single::-packed dialogue-like lengths (mostly padding), as in chat fine-tuning.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch


def make_rows(batch: int, seq: int, vocab: int, kind: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, seq), generator=g)
    types = torch.ones(batch, seq, dtype=torch.long)
    if kind == "dense":
        types[:, -1] = 3
        return ids, types
    for r in range(batch):
        n = int(torch.randint(seq // 8, seq // 3, (1,), generator=g))
        types[r, : n // 3] = 0
        types[r, n - 1] = 3
        types[r, n:] = 2
        ids[r, n:] = 2
    return ids, types


def hf_labels(ids: torch.Tensor, types: torch.Tensor) -> torch.Tensor:
    """transformers shifts labels itself; -100 where the target is padding (same targets as ours)."""
    labels = ids.clone()
    labels[types == 2] = -100
    return labels


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per implementation (after 1 warm-up)")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--rows", default="dense", choices=("dense", "chat"))
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import transformers

    from llamazoo.io.default import resolve_checkpoint
    from llamazoo.io.hf import load_model
    from llamazoo.training.optim import MasterWeights, build_optimizer, clip_grad_norm
    from llamazoo.training.trainer import loss_sums, make_batch

    folder = resolve_checkpoint(args.model)

    class T:
        prompt_loss_weight, article_attention, reset_position_ids = 1.0, True, False

    results = []
    for name in args.dtypes.split(","):
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[name]
        ours = load_model(folder, dtype=dtype).train()
        master = MasterWeights(ours) if dtype != torch.float32 else None
        opt_ours = build_optimizer(ours, 1e-5, 0.0, master)
        hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa")
        hf.train()
        # the plain loop: bf16 by autocast over fp32 weights (the usual way to train in bf16 with transformers)
        opt_hf = torch.optim.AdamW(hf.parameters(), lr=1e-5)
        ids, types = make_rows(args.batch, args.seq, ours.config.vocab_size, args.rows)
        labels = hf_labels(ids, types)
        params = [p for p in ours.parameters() if p.requires_grad]

        def step_ours() -> float:
            batch = make_batch(ids, types, T, torch.device("cpu"))
            s, w = loss_sums(ours, batch)
            (s / w).backward()
            if master is not None:
                master.grads_to_master()
            clip_grad_norm(master.master if master is not None else params, None)
            opt_ours.step()
            opt_ours.zero_grad(set_to_none=True)
            if master is not None:
                master.master_to_model()
            return float(s.detach() / w)

        def step_hf() -> float:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                loss = hf(input_ids=ids, labels=labels).loss
            loss.backward()
            opt_hf.step()
            opt_hf.zero_grad(set_to_none=True)
            return float(loss.detach())

        times: dict[str, list[float]] = {"llamazoo": [], "transformers": []}
        first = {}
        for i in range(args.steps + 1):
            for label, fn in (("llamazoo", step_ours), ("transformers", step_hf)):
                t0 = time.perf_counter()
                loss = fn()
                dt = time.perf_counter() - t0
                if i == 0:
                    first[label] = loss
                else:
                    times[label].append(dt)
        tokens = args.batch * args.seq
        row = {"dtype": name}
        for label in times:
            med = statistics.median(times[label])
            row[label] = tokens / med
        row["ratio"] = row["llamazoo"] / row["transformers"]
        row["loss_diff"] = abs(first["llamazoo"] - first["transformers"])
        results.append(row)
        print(f"{name}: llamazoo {row['llamazoo']:.1f} tok/s, transformers {row['transformers']:.1f} tok/s, "
              f"{row['ratio']:.2f}x", flush=True)
        del ours, hf, opt_ours, opt_hf

    print(f"\nmodel {args.model}, batch {args.batch} x {args.seq}, rows {args.rows}, threads {torch.get_num_threads()}, "
          f"median of {args.steps} steps (tokens/s incl. padding)")
    print(f"{'dtype':<6} {'llamazoo tok/s':>15} {'transformers tok/s':>19} {'ratio':>7} {'|first-step loss diff|':>23}")
    for r in results:
        print(f"{r['dtype']:<6} {r['llamazoo']:>15.1f} {r['transformers']:>19.1f} {r['ratio']:>6.2f}x {r['loss_diff']:>23.2e}")


if __name__ == "__main__":
    main()
