"""LoRA training steps: llamazoo LoRA vs llamazoo full fine-tuning vs transformers + PEFT LoRA, plus llamazoo
QLoRA (NF4 base): tokens/s and peak memory of each, and the bytes of QLoRA's quantized layers.

Same weights (the embedded SmolLM2-135M-Instruct by default), same rows (--rows dense: every row one
full-length article; chat: single::-packed dialogue lengths, mostly padding, which llamazoo's batches trim
and transformers computes), same threads, same AdamW hyper-parameters; LoRA rank 16, alpha 32, on all
seven projections of every decoder layer for both LoRA implementations. A step is forward + backward +
AdamW over what trains. llamazoo's steps are the trainer's (`loss_sums`, fused AdamW, gradient-norm
computation; bf16 with fp32 masters); transformers + PEFT is the usual
`model(input_ids, labels=...).loss.backward(); opt.step()` with SDPA attention (bf16: autocast over fp32
weights, as in benchmarks/train_vs_hf.py).

Timing: the implementations take turns, one step each in a rotating order, so that a busy machine slows
all alike; the median step is reported (after one warm-up step each). Memory: each implementation runs
again alone in a child process: the peak of the bytes its tensors hold during a step (weights incl.
frozen and quantized ones, optimizer states and fp32 masters, plus everything the step allocates:
activations, gradients, temporaries; on CPU counted by a dispatch mode over the live tensor storages, on
CUDA torch's peak allocation), and the bytes of each kind of state, counted from the objects.

Run:  python benchmarks/lora_train.py [--model default] [--batch 4] [--seq 256] [--steps 5] [--dtype fp32]
      [--rows dense|chat] [--rank 16] [--threads N] [--device cpu|cuda] [--no-memory]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

LR, WEIGHT_DECAY = 1e-4, 0.0
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
IMPLS = ("llamazoo full", "llamazoo LoRA", "llamazoo QLoRA nf4", "transformers + PEFT LoRA")


def rows(args, vocab: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """benchmarks/train_vs_hf.py's rows: dense (full-length articles) or chat (single::-packed, mostly padding)."""
    from train_vs_hf import make_rows

    ids, types = make_rows(args.batch, args.seq, vocab, args.rows)
    return ids.to(device), types.to(device)


def tensor_bytes(ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


class Step:
    """One implementation: a step function, the bytes its state holds, and its state's tensors."""

    def __init__(self, step: Callable[[], float], state_bytes: Callable[[], dict[str, int]],
                 tensors: Callable[[], list[torch.Tensor]], extra: dict | None = None):
        self.step, self.state_bytes, self.tensors, self.extra = step, state_bytes, tensors, extra or {}


def state_tensors(model: torch.nn.Module, opt: torch.optim.Optimizer, master=None) -> list[torch.Tensor]:
    return [*model.parameters(), *model.buffers(), *(v for st in opt.state.values() for v in st.values()
                                                     if isinstance(v, torch.Tensor)),
            *(master.master if master is not None else [])]


def llamazoo_step(folder: str, dtype: torch.dtype, device: torch.device, ids, types, method: str, rank: int) -> Step:
    from llamazoo.io.hf import load_model
    from llamazoo.model.lora import LoRASpec, apply_lora
    from llamazoo.model.quant import QuantizedLinear
    from llamazoo.training.optim import MasterWeights, build_optimizer, clip_grad_norm
    from llamazoo.training.trainer import loss_sums, make_batch

    class T:
        prompt_loss_weight, article_attention, reset_position_ids = 1.0, True, False

    model = load_model(folder, dtype=dtype, device="cpu" if method == "qlora" else device)
    with torch.no_grad():  # out of the checkpoint's mmap, as a load onto a GPU copies: memory then counts alike
        for p in model.parameters():
            p.data = p.data.clone()
    extra = {}
    if method != "full":
        apply_lora(model, LoRASpec(rank, 2 * rank, target_modules=tuple(TARGETS)),
                   "nf4" if method == "qlora" else "none", device=device)
    if method == "qlora":
        q = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
        extra["quantized_bytes"] = sum(m.quantized_bytes() for m in q)
        extra["bf16_bytes"] = sum(m.in_features * m.out_features * 2 for m in q)
    model.train()
    master = MasterWeights(model) if dtype != torch.float32 else None
    opt = build_optimizer(model, LR, WEIGHT_DECAY, master)
    params = [p for p in model.parameters() if p.requires_grad]

    def step() -> float:
        batch = make_batch(ids, types, T, device)
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

    def state() -> dict[str, int]:
        frozen = [p for p in model.parameters() if not p.requires_grad]
        return {"weights": tensor_bytes(model.parameters()) + tensor_bytes(model.buffers()),
                "trained": tensor_bytes(params), "frozen": tensor_bytes(frozen) + tensor_bytes(model.buffers()),
                "gradients": tensor_bytes(params),
                "optimizer": sum(tensor_bytes(v for k, v in st.items() if k != "step") for st in opt.state.values())
                + (tensor_bytes(master.master) if master is not None else 0)}

    return Step(step, state, lambda: state_tensors(model, opt, master), extra)


def peft_step(folder: str, dtype: torch.dtype, device: torch.device, ids, types, rank: int) -> Step:
    import transformers
    from peft import LoraConfig, get_peft_model

    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa")
    model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=TARGETS))
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY)
    from train_vs_hf import hf_labels

    labels = hf_labels(ids, types)

    def step() -> float:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    def state() -> dict[str, int]:
        frozen = [p for p in model.parameters() if not p.requires_grad]
        return {"weights": tensor_bytes(model.parameters()) + tensor_bytes(model.buffers()),
                "trained": tensor_bytes(params), "frozen": tensor_bytes(frozen) + tensor_bytes(model.buffers()),
                "gradients": tensor_bytes(params),
                "optimizer": sum(tensor_bytes(v for k, v in st.items() if k != "step") for st in opt.state.values())}

    return Step(step, state, lambda: state_tensors(model, opt))


def build(name: str, args, folder: str, ids, types) -> Step:
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    device = torch.device(args.device)
    if name == "transformers + PEFT LoRA":
        return peft_step(folder, dtype, device, ids, types, args.rank)
    method = {"llamazoo full": "full", "llamazoo LoRA": "lora", "llamazoo QLoRA nf4": "qlora"}[name]
    return llamazoo_step(folder, dtype, device, ids, types, method, args.rank)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class LiveTensorBytes(TorchDispatchMode):
    """Bytes of the tensor storages that ops create inside the mode and that are still alive, and their peak:
    on CPU what torch.cuda.max_memory_allocated is on CUDA (glibc's resident set says little: it keeps freed
    memory and counts the checkpoint's mmapped pages). Storages that existed before are not counted."""

    def __init__(self, existing: set[int]):
        super().__init__()
        self.existing, self.refs, self.now, self.peak = existing, {}, 0, 0

    def _freed(self, key: int, n: int) -> None:
        self.now -= n
        self.refs.pop(key, None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        import weakref

        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            st = t.untyped_storage()
            key = st.data_ptr()
            if not key or key in self.existing or key in self.refs:
                continue
            n = st.nbytes()
            self.refs[key] = weakref.ref(st, lambda _, k=key, n=n: self._freed(k, n))
            self.now += n
            self.peak = max(self.peak, self.now)
        return out


def memory_child(args, folder: str) -> None:
    """Runs one implementation alone; prints its peak memory during a step and its state bytes."""
    import gc

    device = torch.device(args.device)
    vocab = json.load(open(os.path.join(folder, "config.json")))["vocab_size"]
    ids, types = rows(args, vocab, device)
    impl = build(args.child, args, folder, ids, types)
    impl.step()  # warm-up: optimizer states exist from here on
    sync(device)
    gc.collect()
    state = impl.state_bytes()
    resident = state["weights"] + state["optimizer"]  # held between steps (gradients are set to None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        impl.step()
        sync(device)
        peak = torch.cuda.max_memory_allocated()
    else:
        existing = {t.untyped_storage().data_ptr() for t in impl.tensors()}
        with LiveTensorBytes(existing) as tracker:
            impl.step()
        peak = resident + tracker.peak
    print("MEMORY " + json.dumps({"peak": peak, "resident": resident, **state, **impl.extra}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per implementation (after 1 warm-up)")
    ap.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    ap.add_argument("--rows", default="dense", choices=("dense", "chat"))
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None, help="torch threads for all (default: torch's)")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--no-memory", action="store_true", help="skip the per-implementation memory runs")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from llamazoo.io.default import resolve_checkpoint

    folder = str(resolve_checkpoint(args.model))
    if args.child:
        memory_child(args, folder)
        return
    device = torch.device(args.device)
    vocab = json.load(open(os.path.join(folder, "config.json")))["vocab_size"]
    ids, types = rows(args, vocab, device)
    tokens = args.batch * args.seq
    load_start = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"load average at start: {load_start} ({os.cpu_count()} cores)", flush=True)

    impls = {name: build(name, args, folder, ids, types) for name in IMPLS}
    times: dict[str, list[float]] = {k: [] for k in IMPLS}
    first_loss: dict[str, float] = {}
    for i in range(args.steps + 1):
        order = list(IMPLS[i % len(IMPLS):] + IMPLS[:i % len(IMPLS)])
        for name in order:
            sync(device)
            t0 = time.perf_counter()
            loss = impls[name].step()
            sync(device)
            if i == 0:
                first_loss[name] = loss
            else:
                times[name].append(time.perf_counter() - t0)
    extra = impls["llamazoo QLoRA nf4"].extra
    del impls

    memory: dict[str, dict] = {}
    if not args.no_memory:
        for name in IMPLS:
            cmd = [sys.executable, __file__, "--child", name, "--model", args.model, "--batch", str(args.batch),
                   "--seq", str(args.seq), "--dtype", args.dtype, "--rows", args.rows, "--rank", str(args.rank),
                   "--device", args.device]
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            out = subprocess.run(cmd, capture_output=True, text=True)
            line = next((l for l in out.stdout.splitlines() if l.startswith("MEMORY ")), None)
            if line is None:
                raise SystemExit(f"memory run of {name} failed:\n{out.stderr[-3000:]}")
            memory[name] = json.loads(line[len("MEMORY "):])

    mib = 2**20
    print(f"\nmodel {args.model}, {args.dtype}, batch {args.batch} x {args.seq} ({args.rows} rows), LoRA rank "
          f"{args.rank} "
          f"alpha {2 * args.rank} on {len(TARGETS)} projections x all layers, device {args.device}, threads "
          f"{torch.get_num_threads()}, {args.steps} timed steps each, load average {load_start} -> "
          + " ".join(f"{x:.2f}" for x in os.getloadavg()))
    peak_name = "peak tensor memory"
    print(f"| implementation | tokens/s (median) | vs full | vs PEFT | first-step loss | {peak_name} | "
          f"weights (trained / frozen) | gradients | optimizer states |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    med = {k: statistics.median(v) for k, v in times.items()}
    for name in IMPLS:
        m = memory.get(name)
        mem = (f"{m['peak'] / mib:.0f} MiB | {m['trained'] / mib:.1f} / {m['frozen'] / mib:.0f} MiB | "
               f"{m['gradients'] / mib:.1f} MiB | {m['optimizer'] / mib:.1f} MiB") if m else "- | - | - | -"
        print(f"| {name} | {tokens / med[name]:.1f} | {med['llamazoo full'] / med[name]:.2f}x | "
              f"{med['transformers + PEFT LoRA'] / med[name]:.2f}x | {first_loss[name]:.4f} | {mem} |")
    print(f"\nQLoRA's quantized linear layers: {extra['quantized_bytes'] / mib:.1f} MiB = "
          f"{extra['quantized_bytes'] / extra['bf16_bytes']:.3f}x their bf16 bytes "
          f"({extra['bf16_bytes'] / mib:.1f} MiB)")


if __name__ == "__main__":
    main()
