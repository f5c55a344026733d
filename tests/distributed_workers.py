"""Worker script for the distributed tests, launched with torchrun by tests/test_distributed_*.py.

    torchrun --nproc_per_node N tests/distributed_workers.py SCENARIO OUT_DIR CHECKPOINT

Each scenario runs several layouts in one world (starting processes is the expensive part on CPU) and
compares each against a single-process reference computed locally on every rank, writing the
differences to OUT_DIR/SCENARIO-rank{R}.json for the test to assert on.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

torch.set_num_threads(1)

from llamazoo.distributed.mesh import exit_process, init_parallel  # noqa: E402
from llamazoo.distributed.parallelize import (clip_grad_norm, full_tensor, load_parallel_model,  # noqa: E402
                                              unwrap)
from llamazoo.io.hf import load_model, save_sharded_model  # noqa: E402

GLOBAL_BATCH, SEQ, STEPS, LR = 4, 16, 3, 1e-3
# CI runs on CPU with gloo; benchmarks/gpu.sh reuses this worker on CUDA (nccl) with LLAMAZOO_TEST_DEVICE=cuda.
DEVICE = os.environ.get("LLAMAZOO_TEST_DEVICE", "cpu")


def batches(vocab: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(123)
    return [torch.randint(0, vocab, (GLOBAL_BATCH, SEQ + 1), generator=g).to(dev()) for _ in range(STEPS)]


def dev() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if DEVICE == "cuda" else torch.device("cpu")


def train_steps(model, ids_list, dp_rank: int, dp_size: int, parallel: bool, group=None) -> list[float]:
    """AdamW steps on a mean token loss; each DP rank takes its rows of the global batch.

    Rows are equal length, so the mean of the per-rank means is the global mean, which DDP/FSDP's
    gradient averaging turns into the one-process gradient.
    """
    opt = torch.optim.AdamW(model.parameters(), lr=LR, foreach=False)
    losses = []
    for ids in ids_list:
        part = ids.chunk(dp_size)[dp_rank]
        logits = model(part[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), part[:, 1:].flatten())
        loss.backward()
        clip_grad_norm(model.parameters(), 1.0) if parallel else torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        mean = loss.detach().clone()
        if parallel and dp_size > 1:
            torch.distributed.all_reduce(mean, group=group)
            mean /= dp_size
        losses.append(float(mean))
    return losses


def max_weight_diff(model, ref) -> float:
    """Gathers every (sharded) tensor: a collective, so all ranks call it."""
    sd = unwrap(model).state_dict()
    diff = 0.0
    for name, t in ref.state_dict().items():
        diff = max(diff, (full_tensor(sd[name]).detach().to(t.device) - t).abs().max().item())
    return diff


@torch.no_grad()
def greedy(model, prompt: torch.Tensor, n: int) -> list[int]:
    model.setup_cache(1, prompt.shape[1] + n)
    logits = model(prompt, cache_pos=torch.arange(prompt.shape[1], device=prompt.device))
    out = []
    for i in range(n):
        tok = logits[:, -1].argmax(-1, keepdim=True)
        out.append(int(tok))
        logits = model(tok, cache_pos=torch.tensor([prompt.shape[1] + i], device=prompt.device))
    model.clear_cache()
    return out


def compare_training(ckpt: str, ctx, data_parallel: str) -> dict:
    ref = load_model(ckpt, device=dev())
    model = load_parallel_model(ckpt, ctx, data_parallel)
    ids_list = batches(ref.config.vocab_size)
    model.train()
    ref.train()
    ref_losses = train_steps(ref, ids_list, 0, 1, parallel=False)
    losses = train_steps(model, ids_list, ctx.dp_rank, ctx.dp_size, parallel=True, group=ctx.dp_mesh.get_group())
    return {"losses": losses, "ref_losses": ref_losses, "weight_diff": max_weight_diff(model, ref), "model": model}


def world2(out: Path, ckpt: str) -> dict:
    res: dict = {}
    # Tensor parallel 2: logits, greedy generation with a head-sharded KV cache, training, sharded save.
    ctx = init_parallel(tensor_parallel=2, device=DEVICE)
    ref = load_model(ckpt, device=dev())
    model = load_parallel_model(ckpt, ctx, "ddp")
    ids = torch.randint(0, ref.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0)).to(dev())
    with torch.no_grad():
        res["tp_logits_diff"] = (model(ids) - ref(ids)).abs().max().item()
    res["tp_local_kv_heads"] = unwrap(model).model.layers[0].self_attn.k_proj.weight.to_local().shape[0] // \
        ref.config.head_dim
    res["tp_greedy"] = greedy(unwrap(model), ids[:1, :5], 12)
    res["ref_greedy"] = greedy(ref, ids[:1, :5], 12)
    save_sharded_model(unwrap(model), out / "tp_saved", max_shard_size=60_000)
    r = compare_training(ckpt, ctx, "ddp")
    res["tp_train"] = {k: v for k, v in r.items() if k != "model"}
    # Data parallel 2 (same world, another mesh): DDP and FSDP2.
    ctx = init_parallel(tensor_parallel=1, device=DEVICE)
    for dp in ("ddp", "fsdp"):
        r = compare_training(ckpt, ctx, dp)
        res[f"{dp}_train"] = {k: v for k, v in r.items() if k != "model"}
        if dp == "fsdp":  # through the trainer-facing hook that publishes the final HF files
            from llamazoo.distributed.trainer_hooks import make_checkpoint_io

            (out / "fsdp_saved").mkdir(exist_ok=True)
            make_checkpoint_io(ctx).publish_hf_folder(out / "fsdp_saved", unwrap(r["model"]))
    # A model whose KV heads do not divide by the TP size fails with the sizes named.
    try:
        from llamazoo.distributed.parallelize import check_tensor_parallel
        from llamazoo.model.llama import LlamaConfig

        check_tensor_parallel(LlamaConfig(hidden_size=48, num_attention_heads=3, num_key_value_heads=3,
                                          intermediate_size=64), 2)
        res["tp_error"] = None
    except ValueError as e:
        res["tp_error"] = str(e)
    return res


def world4(out: Path, ckpt: str) -> dict:
    # DP x TP = 2 x 2 with FSDP2 over the data-parallel dim: one training step and a sharded save.
    ctx = init_parallel(tensor_parallel=2, device=DEVICE)
    r = compare_training(ckpt, ctx, "fsdp")
    save_sharded_model(unwrap(r["model"]), out / "dp2tp2_saved", max_shard_size=60_000)
    res = {"dp2tp2_train": {k: v for k, v in r.items() if k != "model"},
           "dp_rank": ctx.dp_rank, "tp_rank": ctx.tp_rank}
    try:
        init_parallel(tensor_parallel=2, device=DEVICE)
        load_parallel_model(ckpt, ctx, "ddp")
        res["ddp_tp_error"] = None
    except ValueError as e:
        res["ddp_tp_error"] = str(e)
    return res


def main() -> None:
    scenario, out, ckpt = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
    res = {"world4": world4, "world2": world2}[scenario](out, ckpt)
    rank = int(os.environ["RANK"])
    (out / f"{scenario}-rank{rank}.json").write_text(json.dumps(res))
    exit_process(0)  # leaves the world on every rank and ends without interpreter teardown (see there)


if __name__ == "__main__":
    main()
