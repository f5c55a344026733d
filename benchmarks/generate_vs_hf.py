"""llamazoo's generation engine next to transformers' `generate`, in one process, on the same model.

For each dtype (float32, bfloat16), batch size (1, 8) and prompt length (32, 512 tokens): greedy
decoding of exactly 128 new tokens (EOS ignored), timed as prefill tokens/s (prompt tokens / time to the
first new token) and decode tokens/s (the other new tokens of all rows / the time after the first one).
At batch 1 it also prints the weight-read bandwidth the decode achieves (parameter bytes x decode
tokens/s) next to this machine's measured copy bandwidth, the ceiling for reading weights once per token.

    python benchmarks/generate_vs_hf.py [--threads 2] [--compile] [--quick] [--json out.json]

Numbers on a shared machine move with other load: compare the ratio columns, which come from one run.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

NEW_TOKENS = 128


def copy_bandwidth(clock, mb: int = 512, repeats: int = 5) -> float:
    """GB/s of a large tensor copy (bytes read + bytes written), best of a few, on the benchmark's clock."""
    src = torch.ones(mb * (1 << 20) // 4)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        t = clock()
        dst.copy_(src)
        best = min(best, clock() - t)
    return 2 * src.numel() * 4 / best / 1e9


def prompts_of(batch: int, length: int, vocab: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, vocab - 100, (batch, length), generator=g)


def hf_run(model, ids: torch.Tensor, new: int) -> None:
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                             min_new_tokens=new, do_sample=False, pad_token_id=0)
    assert out.shape[1] == ids.shape[1] + new


def ours_run(engine, ids: torch.Tensor, new: int) -> None:
    rows = engine.generate_batch(ids.tolist(), new, eos_ids=())
    assert all(r.num_tokens == new for r in rows)


def measure(runs: dict, ids: torch.Tensor, clock, repeats: int) -> dict[str, tuple[float, float]]:
    """name -> (prefill s, decode s): prefill = a run making 1 token, decode = a 128-token run minus
    that (best of `repeats`). The same for every implementation, so none is timed by its own
    instrumentation; the implementations take turns, so that load from elsewhere hits all alike."""
    pre: dict[str, list[float]] = {name: [] for name in runs}
    full: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for new, out in ((1, pre), (NEW_TOKENS, full)):
            for name, run in runs.items():
                t = clock()
                run(ids, new)
                out[name].append(clock() - t)
    return {name: (min(pre[name]), max(min(full[name]) - min(pre[name]), 1e-9)) for name in runs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--compile", action="store_true", help="also time llamazoo with generation.compile=true")
    ap.add_argument("--quick", action="store_true", help="batch 1, prompt 32 only")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per cell at batch 1 (best is kept)")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--cpu-time", action="store_true",
                    help="time with the process CPU clock instead of the wall clock: with --threads 1 it "
                         "shows each side's own cost even when other jobs share the cores")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    clock = time.process_time if args.cpu_time else time.perf_counter

    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from llamazoo.generation.engine import Engine
    from llamazoo.io.default import resolve_checkpoint
    from llamazoo.io.hf import load_model

    hf_logging.set_verbosity_error()
    folder = resolve_checkpoint("default")
    bw = copy_bandwidth(clock)
    print(f"SmolLM2-135M, {args.threads} threads, torch {torch.__version__}; copy bandwidth {bw:.1f} GB/s "
          f"(read+write); {NEW_TOKENS} new tokens, greedy; {'CPU' if args.cpu_time else 'wall'} clock", flush=True)
    cells = [(1, 32)] if args.quick else [(1, 32), (1, 512), (8, 32), (8, 512)]
    results = []
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        hf = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
        hf.generation_config.eos_token_id = None
        ours = load_model(folder, dtype=dtype_name)
        param_bytes = sum(p.numel() * p.element_size() for p in ours.parameters())
        engines = {"llamazoo": Engine(ours, None)}
        for batch, plen in cells:
            ids = prompts_of(batch, plen, ours.config.vocab_size)
            repeats = args.repeats if batch == 1 else 1
            row = {"dtype": dtype_name, "batch": batch, "prompt": plen}
            eng = engines["llamazoo"]
            contenders = {"transformers": lambda i, n: hf_run(hf, i, n), "llamazoo": lambda i, n: ours_run(eng, i, n)}
            if args.compile and batch == 1:  # on CPU, compile=true changes batch-1 decode only
                if "compiled" not in engines:
                    engines["compiled"] = Engine(ours, None, compile=True)
                contenders["compiled"] = lambda i, n: ours_run(engines["compiled"], i, n)
            for name, run in contenders.items():  # warm-up (allocator, oneDNN primitives, compile)
                t = time.perf_counter()
                run(ids, NEW_TOKENS if name == "compiled" else 4)
                if name == "compiled":
                    row["compile_s"] = time.perf_counter() - t
            runs = measure(contenders, ids, clock, repeats)
            for name, (pre, dec) in runs.items():
                row[f"{name}_prefill_tps"] = batch * plen / pre
                row[f"{name}_decode_tps"] = batch * (NEW_TOKENS - 1) / dec
            if batch == 1:
                for name in runs:
                    row[f"{name}_weight_gbps"] = param_bytes * row[f"{name}_decode_tps"] / 1e9
            results.append(row)
            print_row(row, list(runs), bw)
        del hf, ours, engines
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": args.threads, "copy_gbps": bw, "results": results}, f, indent=2)


def print_row(row: dict, names: list[str], bw: float) -> None:
    ref_p, ref_d = row["transformers_prefill_tps"], row["transformers_decode_tps"]
    parts = [f"{row['dtype']:>8} b{row['batch']} p{row['prompt']:<3}"]
    for n in names:
        p, d = row[f"{n}_prefill_tps"], row[f"{n}_decode_tps"]
        s = f"{n}: prefill {p:7.0f} decode {d:6.1f} tok/s"
        if n != "transformers":
            s += f" (x{p / ref_p:.2f}, x{d / ref_d:.2f})"
        if row["batch"] == 1:
            s += f" [{row[f'{n}_weight_gbps']:.1f} GB/s = {100 * row[f'{n}_weight_gbps'] / bw:.0f}% of copy]"
        parts.append(s)
    if "compile_s" in row:
        parts.append(f"first compiled run {row['compile_s']:.0f}s")
    print(" | ".join(parts), flush=True)


if __name__ == "__main__":
    main()
