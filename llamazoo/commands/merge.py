"""`llamazoo merge`: a base model plus a LoRA adapter (PEFT's format, from `llamazoo train` or PEFT) -> one
HF folder with the adapter merged into the weights (W + alpha/r * B A, computed in fp32, rounded once to
the output dtype), which any HF-compatible tool loads without PEFT.

Usage: llamazoo merge --base B --adapter A --output DIR [--dtype auto|float32|bfloat16|float16]
"""
from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base", required=True, metavar="DIR", help="the base model's HF folder (or 'default')")
    p.add_argument("--adapter", required=True, metavar="DIR", help="a LoRA adapter folder (adapter_config.json "
                   "+ adapter_model.safetensors)")
    p.add_argument("--output", "-o", required=True, metavar="DIR", help="the HF folder to write")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="the merged weights' dtype (auto: the base checkpoint's)")
    p.add_argument("--max-shard-size", default="5GB", help="shard safetensors above this size (e.g. 500MB)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")


def run(args: argparse.Namespace) -> int:
    from llamazoo.commands.convert import parse_size
    from llamazoo.io.adapter import load_adapter, read_adapter
    from llamazoo.io.default import resolve_checkpoint
    from llamazoo.io.hf import load_model, parse_dtype, save_model
    from llamazoo.io.tokenizer import has_tokenizer

    out = Path(args.output)
    if out.exists() and not args.overwrite:
        raise FileExistsError(f"{out}: already exists (pass --overwrite to replace it)")
    size = parse_size(args.max_shard_size)
    read_adapter(args.adapter)  # a bad adapter fails before the base is loaded
    base = resolve_checkpoint(args.base)
    if not Path(base).is_dir():
        raise ValueError(f"--base {args.base}: expected a HF model folder with weights (or 'default')")
    model = load_model(base, dtype=parse_dtype(args.dtype))
    spec = load_adapter(model, args.adapter, merge=True)
    tokenizer = args.adapter if has_tokenizer(args.adapter) else base if has_tokenizer(base) else None
    written = save_model(model, out, tokenizer=tokenizer, max_shard_size=size)
    print(f"merged {args.adapter} (LoRA rank {spec.rank}, alpha {spec.alpha:g}) into {args.base}: wrote {written}")
    return 0
