"""Training-step throughput: llamazoo's training step (eager and compiled) vs a plain loop over
transformers.LlamaForCausalLM.

Same weights (the embedded SmolLM2-135M-Instruct by default), same batch of rows, same length, same
threads, same AdamW hyper-parameters (torch.optim.AdamW's defaults: lr 1e-3 scaled down to 1e-5,
betas (0.9, 0.999), eps 1e-8, weight decay 0.01); a step is forward + backward + AdamW. llamazoo's
step is the trainer's (`loss_sums`, fused AdamW, gradient-norm computation); transformers' is the
usual `model(input_ids, labels=...).loss.backward(); opt.step()` with SDPA attention.

The implementations take turns, one step each, in a rotating order, so that a busy machine slows all
alike; the median step time is reported (and the best, which load inflates least). The first step of
each is a warm-up; for "llamazoo (compile)" (training.compile=true: each decoder layer through
torch.compile) its excess over the median is the compile time.

Run:  python benchmarks/train_vs_hf.py [--model default] [--batch 4] [--seq 256] [--steps 5]
      [--dtypes fp32,bf16] [--rows dense|chat] [--threads N] [--no-compile] [--cpu-time] [--floor]

--rows dense: every row one full-length article (no padding: nothing for llamazoo to skip);
--rows chat: rows of single::-packed dialogue-like lengths (mostly padding), as in chat fine-tuning.
bf16: llamazoo trains bf16 weights with fp32 master weights; transformers autocasts fp32 weights.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Callable

import torch

LR, WEIGHT_DECAY = 1e-5, 0.01  # torch.optim.AdamW's default weight decay, for both


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


def load_avg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def ours_step(folder: str, dtype: torch.dtype, ids: torch.Tensor, types: torch.Tensor,
              compile: bool) -> Callable[[], float]:
    """One llamazoo training step as the trainer runs it (fp32 master weights for bf16)."""
    from llamazoo.io.hf import load_model
    from llamazoo.training.optim import MasterWeights, build_optimizer, clip_grad_norm
    from llamazoo.training.trainer import compile_layers, loss_sums, make_batch

    class T:
        prompt_loss_weight, article_attention, reset_position_ids = 1.0, True, False

    model = load_model(folder, dtype=dtype).train()
    if compile:
        compile_layers(model)
    master = MasterWeights(model) if dtype != torch.float32 else None
    opt = build_optimizer(model, LR, WEIGHT_DECAY, master)
    params = [p for p in model.parameters() if p.requires_grad]

    def step() -> float:
        batch = make_batch(ids, types, T, torch.device("cpu"))
        s, w = loss_sums(model, batch)
        (s / w).backward()
        if master is not None:
            master.grads_to_master()
        clip_grad_norm(master.master if master is not None else params, None)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if master is not None:
            master.master_to_model()
        return float(s.detach() / w)

    return step


def hf_step(folder: str, dtype: torch.dtype, ids: torch.Tensor, types: torch.Tensor) -> Callable[[], float]:
    """The plain transformers loop; bf16 by autocast over fp32 weights (the usual way to train in bf16)."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa")
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    labels = hf_labels(ids, types)

    def step() -> float:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def kernel_floor(cfg, batch: int, seq: int, clock, repeats: int = 3) -> float:
    """Seconds per step of only the step's big kernels, each timed alone at the step's shapes: the three
    GEMMs (forward, grad input, grad weight) of every projection and of the LM head, and SDPA's causal
    forward + backward. No implementation can be faster than this without changing the arithmetic."""
    import torch.nn.functional as F

    n = batch * seq
    h, i, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    q, kv = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
    projections = [(q, h), (kv, h), (kv, h), (h, q), (i, h), (i, h), (h, i)]

    def best(fn) -> float:
        fn()
        times = []
        for _ in range(repeats):
            t = clock()
            fn()
            times.append(clock() - t)
        return min(times)

    def gemms(out_f: int, in_f: int) -> float:
        x, w, gy = torch.randn(n, in_f), torch.randn(out_f, in_f), torch.randn(n, out_f)
        return best(lambda: x @ w.t()) + best(lambda: gy @ w) + best(lambda: gy.t() @ x)

    layer = sum(gemms(o, k) for o, k in projections)
    qt = torch.randn(batch, cfg.num_attention_heads, seq, d, requires_grad=True)
    kt = torch.randn(batch, cfg.num_key_value_heads, seq, d, requires_grad=True)
    vt = torch.randn(batch, cfg.num_key_value_heads, seq, d, requires_grad=True)
    go = torch.randn(batch, cfg.num_attention_heads, seq, d)
    attn = best(lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=True,
                                                       enable_gqa=kv != q).backward(go))
    return cfg.num_hidden_layers * (layer + attn) + gemms(cfg.vocab_size, h)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per implementation (after 1 warm-up)")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--rows", default="dense", choices=("dense", "chat"))
    ap.add_argument("--threads", type=int, default=None, help="torch threads for all (default: torch's)")
    ap.add_argument("--no-compile", action="store_true", help="skip the llamazoo (compile) row")
    ap.add_argument("--cpu-time", action="store_true", help="process CPU time instead of wall time")
    ap.add_argument("--verbose", action="store_true", help="print every step's time")
    ap.add_argument("--floor", action="store_true",
                    help="also time the step's GEMMs and attention kernels alone (the fp32 lower bound)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.process_time if args.cpu_time else time.perf_counter

    from llamazoo.io.default import resolve_checkpoint
    from llamazoo.model.llama import LlamaConfig

    folder = str(resolve_checkpoint(args.model))
    import json
    from pathlib import Path

    cfg = LlamaConfig.from_hf(json.loads((Path(folder) / "config.json").read_text()))
    vocab = cfg.vocab_size
    ids, types = make_rows(args.batch, args.seq, vocab, args.rows)
    tokens = args.batch * args.seq
    start_load = load_avg()
    print(f"load average at start: {start_load} ({os.cpu_count()} cores)", flush=True)

    results = []
    for name in args.dtypes.split(","):
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[name]
        impls: dict[str, Callable[[], float]] = {"transformers": hf_step(folder, dtype, ids, types),
                                                 "llamazoo": ours_step(folder, dtype, ids, types, compile=False)}
        if not args.no_compile:
            impls["llamazoo (compile)"] = ours_step(folder, dtype, ids, types, compile=True)
        labels = list(impls)
        times: dict[str, list[float]] = {k: [] for k in labels}
        first_time, first_loss = {}, {}
        for i in range(args.steps + 1):
            order = labels[i % len(labels):] + labels[:i % len(labels)]  # rotate: no fixed position
            for label in order:
                t0 = clock()
                loss = impls[label]()
                dt = clock() - t0
                if args.verbose:
                    print(f"  {name} step {i} {label}: {dt:.2f} s, loss {loss:.4f}", flush=True)
                if i == 0:
                    first_time[label], first_loss[label] = dt, loss
                else:
                    times[label].append(dt)
        base = statistics.median(times["transformers"])
        for label in labels:
            med = statistics.median(times[label])
            row = {"dtype": name, "impl": label, "tok_s": tokens / med, "best_tok_s": tokens / min(times[label]),
                   "ratio": base / med, "loss_diff": abs(first_loss[label] - first_loss["transformers"]),
                   "warmup_s": first_time[label] - med}
            results.append(row)
            print(f"{name} {label}: {row['tok_s']:.1f} tok/s (median), {row['ratio']:.2f}x transformers", flush=True)
        del impls

    if args.floor:
        floor = kernel_floor(cfg, args.batch, args.seq, clock)
        hf = [r["tok_s"] for r in results if r["impl"] == "transformers" and r["dtype"] == "fp32"]
        vs = f" = {tokens / floor / hf[0]:.2f}x transformers' fp32 median" if hf else ""
        print(f"\nfp32 kernel floor (GEMMs and SDPA alone, nothing else): {floor:.2f} s per step = "
              f"{tokens / floor:.1f} tok/s{vs}")
    clock_name = "CPU" if args.cpu_time else "wall"
    print(f"\nmodel {args.model}, batch {args.batch} x {args.seq}, rows {args.rows}, threads {torch.get_num_threads()}, "
          f"{args.steps} timed steps each ({clock_name} clock), load average {start_load} -> {load_avg()}")
    print(f"| dtype | implementation     | tokens/s (median) | tokens/s (best) | vs transformers | first-step loss diff | warm-up extra s |")
    print(f"|-------|--------------------|------------------:|----------------:|----------------:|---------------------:|----------------:|")
    for r in results:
        print(f"| {r['dtype']:<5} | {r['impl']:<18} | {r['tok_s']:>17.1f} | {r['best_tok_s']:>15.1f} | "
              f"{r['ratio']:>14.2f}x | {r['loss_diff']:>20.2e} | {r['warmup_s']:>15.1f} |")


if __name__ == "__main__":
    main()
