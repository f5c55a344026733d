"""`llamazoo plan`: per-device memory of a training or generation layout, and the smallest one that fits.

Usage: llamazoo plan MODEL [--mode train|generate] [--dtype bf16|fp32] [--batch-size N] [--seq-len N]
       [--tp N] [--dp N] [--data-parallel ddp|fsdp] [--activation-checkpointing] [--device-memory GiB]
       [--method full|lora|qlora] [--lora-rank N]
MODEL is a named config (`llamazoo models`), a config.json, a HF folder or `default`.
"""
from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="named config (e.g. llama2-70b), config.json, HF folder or 'default'")
    p.add_argument("--mode", choices=("train", "generate"), default="train")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16",
                   help="training.dtype (bf16 keeps fp32 master weights) or the generation dtype")
    p.add_argument("--batch-size", type=int, default=1,
                   help="per-device (per data-parallel rank) batch for training; the batch for generation")
    p.add_argument("--seq-len", type=int, default=None,
                   help="training sequence length, or prompt + new tokens (default: max_position_embeddings, "
                        "at most 4096)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size (parallel.tensor_parallel)")
    p.add_argument("--dp", type=int, default=1, help="data-parallel size (processes / TP size)")
    p.add_argument("--data-parallel", choices=("ddp", "fsdp"), default="ddp", help="parallel.data_parallel")
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--method", choices=("full", "lora", "qlora"), default="full",
                   help="training: every weight, LoRA adapters on a frozen base (training.lora.rank), or QLoRA "
                        "(training.lora.base_quantization=nf4)")
    p.add_argument("--lora-rank", type=int, default=16, help="training.lora.rank for --method lora/qlora")
    p.add_argument("--device-memory", type=float, default=80.0, metavar="GiB", help="memory of one device")
    p.add_argument("--headroom", type=float, default=0.1,
                   help="fraction of device memory kept free for the CUDA context and fragmentation")
    p.add_argument("--max-tp", type=int, default=8, help="largest TP size to suggest (GPUs per node)")


def run(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from llamazoo.distributed.plan import Layout, Workload, format_plan, plan_memory, smallest_layout
    from llamazoo.io.default import resolve_checkpoint
    from llamazoo.io.hf import read_config
    from llamazoo.model.registry import NAMED_CONFIGS

    name = args.model
    cfg = read_config(name if name in NAMED_CONFIGS else resolve_checkpoint(name, need_weights=False))
    seq = args.seq_len or min(cfg.max_position_embeddings, 4096)
    if not 0 <= args.headroom < 1:
        raise ValueError(f"--headroom must be in [0, 1) (got {args.headroom})")
    if args.lora_rank < 1:
        raise ValueError(f"--lora-rank must be >= 1 (got {args.lora_rank})")
    if args.method != "full" and args.mode != "train":
        raise ValueError(f"--method {args.method} plans training; generation with an adapter merges it into the "
                         f"weights (plan it with --method full)")
    w = Workload(mode=args.mode, dtype=args.dtype, batch_size=args.batch_size, seq_len=seq,
                 activation_checkpointing=args.activation_checkpointing, method=args.method,
                 lora_rank=args.lora_rank)
    title = f"{name} ({cfg.num_parameters / 1e9:.2f} B parameters)"
    layout = Layout(tp=args.tp, dp=args.dp, data_parallel=args.data_parallel)
    plan = plan_memory(cfg, w, layout, args.device_memory, args.headroom)
    print(format_plan(plan, title))
    if args.mode == "train" and args.method == "full":
        other = {m: plan_memory(cfg, replace(w, method=m), layout, args.device_memory, args.headroom)
                 for m in ("lora", "qlora")}
        print(f"  (LoRA rank {w.lora_rank}: {other['lora'].total / 2**30:.2f} GiB; QLoRA: "
              f"{other['qlora'].total / 2**30:.2f} GiB per device on this layout: --method lora|qlora for their rows)")
    best = smallest_layout(cfg, w, args.device_memory, args.headroom, max_tp=args.max_tp)
    print()
    if best is None:
        hint = "" if args.activation_checkpointing or args.mode != "train" else \
            "; try --activation-checkpointing or a smaller --batch-size"
        print(f"No layout up to TP {args.max_tp} x FSDP 1024 fits {args.device_memory:g} GiB devices{hint}.")
    else:
        lay = best.layout
        if lay.devices == 1:
            print(f"Smallest layout that fits: 1 device, {best.total / 2**30:.1f} GiB")
            return 0
        flags = f"parallel.tensor_parallel={lay.tp}" + (" parallel.data_parallel=fsdp" if lay.dp > 1 else "")
        print(f"Smallest layout that fits: {lay.describe()}, {best.total / 2**30:.1f} GiB per device "
              f"(torchrun --nproc_per_node ... with {flags})")
        if (lay.tp, lay.dp) != (args.tp, args.dp):
            print(format_plan(best, title))
    return 0
