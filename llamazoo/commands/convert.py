"""`llamazoo convert`: a GGUF Llama file, or a HF folder (re-sharded / re-typed), into a HF folder;
--quantize int8|int4 writes a quantized folder (llamazoo.model.quantize), and --quantize keep keeps a
GGUF's Q8_0 / Q4_0 / Q4_1 matrices as they are."""
from __future__ import annotations

import argparse
from pathlib import Path

from llamazoo.model.quantize import DEFAULT_GROUP_SIZE, KERNEL_GROUP_SIZES


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--from-gguf", metavar="FILE", help="a GGUF file of a Llama model (any quantization)")
    src.add_argument("--from-hf", metavar="DIR", help="a HF checkpoint folder (or 'default')")
    p.add_argument("--output", "-o", required=True, metavar="DIR", help="the HF folder to write")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weights' dtype (auto: float32 for GGUF, the checkpoint's for HF)")
    p.add_argument("--max-shard-size", default="5GB", help="shard safetensors above this size (e.g. 500MB)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--quantize", default="none", choices=["none", "int8", "int4", "keep"],
                   help="weight-only quantization of the projections (and an untied LM head, int8): int8 per "
                        "channel, int4 in groups of --group-size; keep (--from-gguf): Q8_0 -> int8, Q4_0/Q4_1 -> "
                        "int4 exactly, other tensors dequantized")
    p.add_argument("--group-size", type=int, default=DEFAULT_GROUP_SIZE, choices=KERNEL_GROUP_SIZES,
                   help="int4: weights per scale and zero (default: %(default)s)")


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
    quantize = args.quantize if args.quantize in ("int8", "int4") else None
    if args.from_gguf:
        from llamazoo.io.gguf import convert_gguf

        written = convert_gguf(args.from_gguf, out, dtype=dtype or torch.float32, keep_quantized=args.quantize == "keep")
        if size < 5 * 1000**3 or quantize:  # re-shard (and quantize) through the one saver
            save_model(_quantized(load_model(written), quantize, args.group_size), out, tokenizer=written,
                       max_shard_size=size)
    else:
        from llamazoo.io.default import resolve_checkpoint
        from llamazoo.io.tokenizer import has_tokenizer

        if args.quantize == "keep":
            raise ValueError("--quantize keep keeps a GGUF file's quantized matrices; with --from-hf use int8 or int4")
        src = resolve_checkpoint(args.from_hf)
        model = _quantized(load_model(src, dtype=dtype), quantize, args.group_size)
        written = save_model(model, out, tokenizer=src if has_tokenizer(src) else None, max_shard_size=size)
    print(f"wrote {written}")
    return 0


def _quantized(model, kind: str | None, group_size: int):
    """The model with its projections quantized (one layer at a time, each float weight's pages returned)."""
    if kind:
        from llamazoo.io.mapped import release_pages
        from llamazoo.model.quantize import quantize_model

        quantize_model(model, kind, group_size, release=release_pages)
    return model
