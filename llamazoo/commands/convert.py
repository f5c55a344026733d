"""`llamazoo convert`: a GGUF Llama file, or a HF folder (re-sharded / re-typed), into a HF folder."""
from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--from-gguf", metavar="FILE", help="a GGUF file of a Llama model (any quantization)")
    src.add_argument("--from-hf", metavar="DIR", help="a HF checkpoint folder (or 'default')")
    p.add_argument("--output", "-o", required=True, metavar="DIR", help="the HF folder to write")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weights' dtype (auto: float32 for GGUF, the checkpoint's for HF)")
    p.add_argument("--max-shard-size", default="5GB", help="shard safetensors above this size (e.g. 500MB)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")


def parse_size(text: str) -> int:
    units = {"KB": 1000, "MB": 1000**2, "GB": 1000**3, "KIB": 1024, "MIB": 1024**2, "GIB": 1024**3, "B": 1}
    t = text.strip().upper()
    for unit, mult in sorted(units.items(), key=lambda u: -len(u[0])):
        if t.endswith(unit):
            try:
                return int(float(t[: -len(unit)]) * mult)
            except ValueError:
                break
    try:
        return int(t)
    except ValueError:
        raise ValueError(f"--max-shard-size {text!r}: expected a size like 500MB or 5GB") from None


def run(args: argparse.Namespace) -> int:
    import torch

    from llamazoo.io.hf import load_model, parse_dtype, save_model

    out = Path(args.output)
    if out.exists() and not args.overwrite:
        raise FileExistsError(f"{out}: already exists (pass --overwrite to replace it)")
    dtype = parse_dtype(args.dtype)
    size = parse_size(args.max_shard_size)
    if args.from_gguf:
        from llamazoo.io.gguf import convert_gguf

        written = convert_gguf(args.from_gguf, out, dtype=dtype or torch.float32)
        if size < 5 * 1000**3:  # re-shard through the one saver
            save_model(load_model(written), out, tokenizer=written, max_shard_size=size)
    else:
        from llamazoo.io.default import resolve_checkpoint
        from llamazoo.io.tokenizer import has_tokenizer

        src = resolve_checkpoint(args.from_hf)
        model = load_model(src, dtype=dtype)
        written = save_model(model, out, tokenizer=src if has_tokenizer(src) else None, max_shard_size=size)
    print(f"wrote {written}")
    return 0
