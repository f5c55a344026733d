"""CPU inference at real Llama shapes: llamazoo next to transformers (and llama.cpp when built), every precision.

Models: SmolLM2-135M-Instruct (the default model, its real weights) and a Llama-2-7b-shaped model (hidden
4096, FFN 11008, vocab 32000, 32 heads, --layers decoder layers, random weights from a fixed seed).
Precisions: fp32 and bf16 (llamazoo, transformers, llama.cpp f32/bf16), int8 and int4 (llamazoo's quantized
folders from `llamazoo convert --quantize` of the bf16 weights; llama.cpp Q8_0 / Q4_0 of the same weights).
Each row: batch 1 and 8, a --prompt-token random prompt, greedy, --new-tokens tokens: prefill and decode tokens/s
(decode = all rows' tokens after the first / the time after the first), and the peak RSS of the process that
ran it: each implementation x model x precision runs in a fresh process, so the peak is that row's alone;
"model" is the peak minus the process before loading (imports, allocator), compared with the weights + KV
cache ("x": the acceptance asks <= 1.15). Quality (SmolLM2's real weights): perplexity on
benchmarks/data/perplexity.txt in windows of 256 tokens with the second half of each scored (llama-perplexity's
rule, run with -c 256 on the same text), each quantized model next to its own bf16 original.

llama.cpp columns appear when its tools are built: $LLAMACPP_DIR (default ~/.cache/llamazoo-bench/llama.cpp)
/src/build/bin/{llama-bench,llama-batched-bench,llama-quantize,llama-perplexity} and /src/convert_hf_to_gguf.py
(a helper script that builds them from the llama-cpp-python sdist lives outside this repository). GGUFs are made
from the same folders with llama.cpp's converter and quantizer; the 7b-shaped model gets a SentencePiece
tokenizer with Llama-2's settings (tests/generated_data.py; the converter pads the vocabulary).

    python benchmarks/cpu_inference.py [--models smollm2,llama2-7b-shape] [--layers 4] [--threads 2]
        [--precisions fp32,bf16,int8,int4] [--batches 1,8] [--new-tokens 64] [--no-transformers] [--json out]

Numbers move with other load on a shared machine (the load average is printed): compare ratios from one run.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TEXT = REPO / "benchmarks" / "data" / "perplexity.txt"
PPL_WINDOW = 256
SEVEN_B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
               num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)
LLAMACPP_TYPES = {"fp32": "f32", "bf16": "bf16", "int8": "q8_0", "int4": "q4_0"}


# -- measurements inside a row's own process --------------------------------------------------------------------
def rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def rss_peak() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))


def prompts(batch: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, vocab - 100, (batch, length), generator=g).tolist()


def best_time(fn, repeats: int) -> float:
    out = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out = min(out, time.perf_counter() - t)
    return out


def perplexity(model, ids: list[int], window: int = PPL_WINDOW) -> float:
    """exp(mean NLL) of the second half of each full window of `window` tokens (llama-perplexity's rule)."""
    import torch
    import torch.nn.functional as F

    nll, n = 0.0, 0
    with torch.inference_mode():
        for start in range(0, len(ids) - window + 1, window):
            chunk = torch.tensor([ids[start:start + window]])
            logits = model(chunk)[0, window // 2 - 1:-1].float()
            nll += F.cross_entropy(logits, chunk[0, window // 2:], reduction="sum").item()
            n += window - window // 2
    return float(torch.tensor(nll / n).exp())


def child(spec: dict) -> dict:
    """One implementation x model x precision: every batch size in turn (peaks only grow with the batch)."""
    import torch

    torch.set_num_threads(spec["threads"])
    out: dict = {"rows": []}
    if spec["impl"] == "llamazoo":
        from llamazoo.generation.app import compile_settings
        from llamazoo.generation.engine import Engine
        from llamazoo.generation.packed import BATCHED_HINT, unpack
        from llamazoo.io.hf import load_model

        # imports (all of them before `base`: ~10 MB of modules are not the model's), oneDNN, allocator
        Engine(load_model("tiny", seed=0), None).generate_batch([[1, 2, 3]], 4)
        base = rss_now()
        t = time.perf_counter()
        model = load_model(spec["folder"], dtype=spec["dtype"])
        out["load_s"] = time.perf_counter() - t
        out["weights"] = sum(x.numel() * x.element_size() for x in [*model.parameters(), *model.buffers()])
        engine = Engine(model, None)
        out["packed"] = engine.packed

        def for_batch(batch):
            """The engine `llamazoo generate` builds for this batch size and run length: the decode step
            generation.compile chooses (auto: see llamazoo.generation.engine.auto_compile) and the layout
            it packs for (see generation.packed)."""
            nonlocal engine
            kwargs, _ = compile_settings(spec["compile"], model, batch, spec["new_tokens"])
            if kwargs["compile"]:
                if not engine.compile:
                    engine = Engine(model, None, **kwargs)  # auto: weights held once
                    engine.warmup(batch, spec["prompt"], spec["new_tokens"])
                return "compiled"
            hint = 1 if batch == 1 else BATCHED_HINT
            if engine.compile or (engine.packed and getattr(engine, "hint", 1) != hint):
                unpack(model)
                engine = Engine(model, None, pack_batch_hint=hint)
                engine.hint = hint
            return "eager"

        def run(ids, new):
            rows = engine.generate_batch(ids, new, eos_ids=())
            assert all(r.num_tokens == new for r in rows)

        def kv_bytes(batch):
            return sum(2 * c.k.numel() * c.k.element_size() for c in (l.self_attn.kv_cache for l in model.model.layers))
    else:
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        base = rss_now()
        t = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(spec["folder"], dtype=getattr(torch, spec["dtype"])).eval()
        model.generation_config.eos_token_id = None
        out["load_s"] = time.perf_counter() - t
        out["weights"] = sum(p.numel() * p.element_size() for p in model.parameters())

        def for_batch(batch):
            return ""

        def run(ids, new):
            x = torch.tensor(ids)
            with torch.inference_mode():
                y = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=new,
                                   min_new_tokens=new, do_sample=False, pad_token_id=0)
            assert y.shape[1] == x.shape[1] + new

        def kv_bytes(batch):
            c = model.config
            head_dim = c.hidden_size // c.num_attention_heads
            return (2 * c.num_hidden_layers * batch * c.num_key_value_heads * head_dim
                    * (spec["prompt"] + spec["new_tokens"]) * torch.finfo(model.dtype).bits // 8)
    for batch in spec["batches"]:
        step = for_batch(batch)
        ids = prompts(batch, spec["prompt"], spec["vocab"])
        run(ids, 4)  # warm-up: caches, oneDNN primitives
        repeats = spec["repeats"] if batch == 1 else 1
        pre = best_time(lambda: run(ids, 1), repeats)
        full = best_time(lambda: run(ids, spec["new_tokens"]), repeats)
        out["rows"].append({"batch": batch, "step": step, "prefill_tps": batch * spec["prompt"] / pre,
                            "decode_tps": batch * (spec["new_tokens"] - 1) / max(full - pre, 1e-9),
                            "peak": rss_peak(), "model_peak": rss_peak() - base, "kv": kv_bytes(batch)})
    if spec.get("ppl_ids") and spec["impl"] == "llamazoo":
        model.clear_cache()  # a plain forward over each window
        out["ppl"] = perplexity(model, spec["ppl_ids"])
    return out


def run_child(spec: dict) -> dict:
    res = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True)
    if res.returncode != 0:
        return {"error": (res.stderr.strip().splitlines() or ["exit %d" % res.returncode])[-1]}
    return json.loads(res.stdout.strip().splitlines()[-1])


# -- model folders --------------------------------------------------------------------------------------------
def llamazoo_cli(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "llamazoo", *args], check=True, capture_output=True, text=True)


def make_random_folder(out: Path, layers: int, seed: int = 0) -> None:
    code = ("import sys, json, torch\nfrom llamazoo.io.hf import random_model, save_model\n"
            "from llamazoo.model.llama import LlamaConfig\n"
            "save_model(random_model(LlamaConfig(**json.loads(sys.argv[1])), dtype=torch.bfloat16, seed=int(sys.argv[2])), "
            "sys.argv[3])\n")
    subprocess.run([sys.executable, "-c", code, json.dumps({**SEVEN_B, "num_hidden_layers": layers}), str(seed),
                    str(out)], check=True)
    sys.path.insert(0, str(REPO / "tests"))
    from generated_data import write_sentencepiece_tokenizer  # Llama-2's SentencePiece settings, for llama.cpp

    tok = write_sentencepiece_tokenizer(out.parent / "sentencepiece")
    for f in tok.iterdir():
        if f.is_file() and f.name != "config.json":
            shutil.copy(f, out / f.name)


def folders(model: str, work: Path, layers: int, group: int) -> dict[str, tuple[Path, str]]:
    """precision -> (folder, dtype to load it in)."""
    from llamazoo.io.default import ensure_default_model

    if model == "smollm2":
        fp32 = ensure_default_model()  # converted from the shipped GGUF: fp32
        bf16 = work / "smollm2-bf16"
        if not bf16.is_dir():
            llamazoo_cli("convert", "--from-hf", str(fp32), "--output", str(bf16), "--dtype", "bfloat16")
    else:
        bf16 = fp32 = work / f"llama2-7b-shape-{layers}l-bf16"
        if not bf16.is_dir():
            make_random_folder(bf16, layers)
    out = {"fp32": (fp32, "float32"), "bf16": (bf16, "bfloat16")}
    for kind in ("int8", "int4"):
        q = work / f"{bf16.name.removesuffix('-bf16')}-{kind}{'-g%d' % group if kind == 'int4' else ''}"
        if not q.is_dir():
            llamazoo_cli("convert", "--from-hf", str(bf16), "--output", str(q), "--quantize", kind,
                         "--group-size", str(group))
        out[kind] = (q, "auto")
    return out


# -- llama.cpp ------------------------------------------------------------------------------------------------
def llamacpp_dir() -> Path:
    return Path(os.environ.get("LLAMACPP_DIR", Path.home() / ".cache" / "llamazoo-bench" / "llama.cpp")) / "src"


def llamacpp_available() -> bool:
    d = llamacpp_dir()
    return all((d / "build" / "bin" / t).is_file() for t in ("llama-bench", "llama-batched-bench", "llama-quantize",
                                                             "llama-perplexity")) and (d / "convert_hf_to_gguf.py").is_file()


def make_gguf(folder: Path, precision: str, out: Path) -> Path:
    if out.is_file():
        return out
    d, kind = llamacpp_dir(), LLAMACPP_TYPES[precision]
    if kind in ("f32", "bf16"):
        subprocess.run([sys.executable, str(d / "convert_hf_to_gguf.py"), str(folder), "--outtype", kind,
                        "--outfile", str(out)], check=True, capture_output=True)
    else:
        tmp = out.with_suffix(".f16.tmp.gguf")
        subprocess.run([sys.executable, str(d / "convert_hf_to_gguf.py"), str(folder), "--outtype", "f16",
                        "--outfile", str(tmp)], check=True, capture_output=True)
        subprocess.run([str(d / "build" / "bin" / "llama-quantize"), str(tmp), str(out), kind.upper()], check=True,
                       capture_output=True)
        tmp.unlink()
    return out


def with_peak(cmd: list[str]) -> tuple[str, int]:
    """A tool's stdout and its peak RSS (measured by a fresh wrapper process, so it is this tool's alone)."""
    wrap = ("import resource, subprocess, sys\nr = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
            "sys.stdout.write(r.stdout + r.stderr)\nprint('\\nPEAK', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n")
    res = subprocess.run([sys.executable, "-c", wrap, *cmd], capture_output=True, text=True)
    peak = int(re.findall(r"PEAK (\d+)", res.stdout)[-1]) * 1024
    return res.stdout, peak


def llamacpp_rows(gguf: Path, args, batches: list[int]) -> dict:
    bin_ = llamacpp_dir() / "build" / "bin"
    out: dict = {"rows": []}
    for batch in batches:
        if batch == 1:
            text, peak = with_peak([str(bin_ / "llama-bench"), "-m", str(gguf), "-p", str(args.prompt), "-n",
                                    str(args.new_tokens), "-t", str(args.threads), "-r", str(args.repeats), "-o", "json"])
            data = json.loads(text[text.index("["):text.rindex("]") + 1])
            pp = next(d["avg_ts"] for d in data if d["n_prompt"] > 0 and d["n_gen"] == 0)
            tg = next(d["avg_ts"] for d in data if d["n_gen"] > 0 and d["n_prompt"] == 0)
        else:
            ctx = batch * (args.prompt + args.new_tokens) + 64
            text, peak = with_peak([str(bin_ / "llama-batched-bench"), "-m", str(gguf), "-c", str(ctx), "-b", "2048",
                                    "-ub", "512", "-npp", str(args.prompt), "-ntg", str(args.new_tokens), "-npl",
                                    str(batch), "-t", str(args.threads)])
            cells = next(r for r in (line.split("|") for line in text.splitlines())
                         if len(r) > 10 and r[3].strip() == str(batch))
            pp, tg = float(cells[6]), float(cells[8])  # S_PP t/s, S_TG t/s: all sequences together
        out["rows"].append({"batch": batch, "prefill_tps": pp, "decode_tps": tg, "peak": peak})
    return out


def llamacpp_ppl(gguf: Path, threads: int) -> float | None:
    text, _ = with_peak([str(llamacpp_dir() / "build" / "bin" / "llama-perplexity"), "-m", str(gguf), "-f", str(TEXT),
                         "-c", str(PPL_WINDOW), "-t", str(threads)])
    m = re.search(r"Final estimate: PPL = ([0-9.]+)", text)
    return float(m.group(1)) if m else None


# -- the table ------------------------------------------------------------------------------------------------
def gb(n: float) -> str:
    return f"{n / 1e9:.2f}"


def table_row(model: str, precision: str, impl: str, r: dict, row: dict, runs: dict, ppl_bf16: dict) -> str:
    cpp = next((x for x in runs.get("llama.cpp", {}).get("rows", []) if x["batch"] == row["batch"]), None)
    vs = f"x{row['decode_tps'] / cpp['decode_tps']:.2f}" if cpp and impl != "llama.cpp" else ""
    need = r.get("weights", 0) + row.get("kv", 0)
    own = row.get("model_peak")
    ppl = r.get("ppl")
    label = f"{impl} ({row['step']})" if row.get("step") else impl
    cells = [model, precision, label, row["batch"], f"{row['prefill_tps']:.1f}", f"{row['decode_tps']:.2f}", vs,
             gb(row["peak"]), gb(own) if own is not None else "", gb(need) if need else "",
             f"{own / need:.2f}" if own is not None and need else "", f"{ppl:.3f}" if ppl else "",
             f"{ppl / ppl_bf16[impl]:.4f}" if ppl and ppl_bf16.get(impl) else ""]
    return "| " + " | ".join(str(c) for c in cells) + " |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--models", default="smollm2,llama2-7b-shape")
    ap.add_argument("--layers", type=int, default=4, help="decoder layers of the 7b-shaped model")
    ap.add_argument("--precisions", default="fp32,bf16,int8,int4")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--group-size", type=int, default=32, help="int4 group size")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs at batch 1 (best kept)")
    ap.add_argument("--compile", choices=("auto", "false"), default="auto",
                    help="llamazoo's decode step: as `llamazoo generate` chooses by default for a run of "
                         "--new-tokens tokens (auto compiles batch 1 from 256 tokens where it pays), or eager")
    ap.add_argument("--no-transformers", action="store_true")
    ap.add_argument("--no-llamacpp", action="store_true")
    ap.add_argument("--workdir", default=str(Path.home() / ".cache" / "llamazoo-bench" / "cpu_inference"))
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    batches = [int(b) for b in args.batches.split(",")]
    use_cpp = not args.no_llamacpp and llamacpp_available()
    print(f"{args.threads} threads, load average {os.getloadavg()[0]:.1f} at start; prompt {args.prompt}, "
          f"{args.new_tokens} new tokens, greedy; llama.cpp: {'yes' if use_cpp else 'not built'}", flush=True)
    results = []
    header = ("| model | precision | impl | batch | prefill tok/s | decode tok/s | vs llama.cpp | peak RSS GB | "
              "model GB | weights+KV GB | x | ppl | ppl / bf16 |")
    print(header + "\n" + "|---" * 13 + "|", flush=True)
    for model in args.models.split(","):
        dirs = folders(model, work, args.layers, args.group_size)
        ppl_ids = None
        if model == "smollm2":
            from llamazoo.io.tokenizer import load_tokenizer

            ppl_ids = load_tokenizer(str(dirs["fp32"][0])).encode(TEXT.read_text(), add_special_tokens=False)
        vocab = 49152 if model == "smollm2" else SEVEN_B["vocab_size"]
        ppl_bf16: dict[str, float] = {}
        for precision in args.precisions.split(","):
            folder, dtype = dirs[precision]
            spec = dict(folder=str(folder), dtype=dtype, batches=batches, prompt=args.prompt, vocab=vocab,
                        new_tokens=args.new_tokens, threads=args.threads, repeats=args.repeats, ppl_ids=ppl_ids,
                        compile="auto" if args.compile == "auto" else False)
            runs = {"llamazoo": run_child({**spec, "impl": "llamazoo"})}
            if precision in ("fp32", "bf16") and not args.no_transformers:
                runs["transformers"] = run_child({**spec, "impl": "transformers"})
            if use_cpp:
                src = dirs["bf16"][0] if precision != "fp32" else dirs["fp32"][0]
                gguf = make_gguf(src, precision, work / f"{folder.name}-{LLAMACPP_TYPES[precision]}.gguf")
                runs["llama.cpp"] = llamacpp_rows(gguf, args, batches)
                if ppl_ids:
                    runs["llama.cpp"]["ppl"] = llamacpp_ppl(gguf, args.threads)
            for impl, r in runs.items():
                if "ppl" in r and precision == "bf16":
                    ppl_bf16[impl] = r["ppl"]
            for impl, r in runs.items():
                if "error" in r:
                    print(f"| {model} | {precision} | {impl} | error: {r['error']} |", flush=True)
                    continue
                for row in r["rows"]:
                    print(table_row(model, precision, impl, r, row, runs, ppl_bf16), flush=True)
                results.append({"model": model, "precision": precision, "impl": impl, **r})
    print(f"load average {os.getloadavg()[0]:.1f} at the end", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=2))


if __name__ == "__main__":
    main()
