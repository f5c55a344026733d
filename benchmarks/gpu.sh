#!/usr/bin/env bash
# One script for a session that has a GPU (about 5-8 minutes on one H100/H200):
#   1. CUDA checks: bf16/fp32 logits on CUDA against CPU fp32, greedy decode equal to transformers,
#      and (with >= 2 GPUs) TP=2 logits and DDP/FSDP steps over nccl equal to one GPU.
#   2. Training: tokens/s and MFU of forward+backward+fused AdamW in bf16 for a ~1.1B Llama at 2048
#      tokens per row, eager and with per-layer torch.compile.
#   3. Decode: batch-1 tokens/s and achieved weight-read bandwidth (parameter bytes x tokens/s) next to
#      the measured device copy bandwidth, eager and compiled, plus `llamazoo generate` on the default model.
# Usage: benchmarks/gpu.sh [--quick]   (--quick: smaller model and fewer steps, ~2 minutes)
# Run from the repository root with the venv active (or .venv present). Prints one table per part.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -f .venv/bin/activate ] && . .venv/bin/activate
QUICK=0
[ "${1:-}" = "--quick" ] && QUICK=1
export QUICK
# One process per part with a hard limit, so a hang in one part cannot eat the whole session.
limit() { timeout --signal=INT "$1" "${@:2}"; }

echo "== environment"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python - <<'EOF'
import torch
assert torch.cuda.is_available(), "no CUDA device visible to torch"
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.device_count()} GPU(s): "
      f"{torch.cuda.get_device_name(0)}")
EOF
NGPU=$(python -c "import torch; print(torch.cuda.device_count())")

echo; echo "== 1. CUDA checks"
limit 150 python - <<'EOF'
import torch, transformers
from llamazoo.io.hf import load_model
from llamazoo.io.default import ensure_default_model

folder = ensure_default_model()
ids = torch.randint(0, 49152, (2, 64), generator=torch.Generator().manual_seed(0))
ref = load_model(folder, dtype="float32", device="cpu")
with torch.no_grad():
    want = ref(ids)
for dtype, tol in (("float32", 1e-3), ("bfloat16", 0.5)):
    m = load_model(folder, dtype=dtype, device="cuda")
    with torch.no_grad():
        got = m(ids.cuda()).float().cpu()
    d = (got - want).abs().max().item()
    print(f"SmolLM2 {dtype} logits on CUDA vs CPU fp32: max diff {d:.2e} -> {'ok' if d <= tol else 'FAIL'}")
    assert d <= tol
# Greedy decode with llamazoo's static cache equals transformers' generate on the same GPU (fp32).
m = load_model(folder, dtype="float32", device="cuda")
hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).cuda().eval()
prompt = ids[:1, :16].cuda()
with torch.no_grad():
    theirs = hf.generate(prompt, max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=0)[0, 16:]
    m.setup_cache(1, 48)
    logits = m(prompt, cache_pos=torch.arange(16, device="cuda"))
    ours = []
    for i in range(32):
        tok = logits[:, -1].argmax(-1, keepdim=True)
        ours.append(int(tok))
        logits = m(tok, cache_pos=torch.tensor([16 + i], device="cuda"))
same = ours == theirs.tolist()
print(f"greedy 32 tokens on CUDA equal to transformers.generate: {'ok' if same else 'FAIL'}")
assert same
EOF
if [ "$NGPU" -ge 2 ]; then
  echo "-- nccl, 2 GPUs: TP=2 logits/greedy/training, DDP and FSDP steps against one GPU"
  TMP=$(mktemp -d)
  python - "$TMP" <<'EOF'
import sys, torch
from pathlib import Path
from llamazoo.io.hf import random_model, save_model
from llamazoo.model.llama import LlamaConfig
cfg = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True)
save_model(random_model(cfg, seed=0), Path(sys.argv[1]) / "ckpt", max_shard_size=60_000)
EOF
  # The CPU test worker, on CUDA: init_parallel picks nccl and cuda:LOCAL_RANK when CUDA is present.
  LLAMAZOO_TEST_DEVICE=cuda limit 180 torchrun --nproc_per_node 2 tests/distributed_workers.py world2 "$TMP" "$TMP/ckpt"
  python - "$TMP" <<'EOF'
import json, sys
for r in range(2):
    res = json.load(open(f"{sys.argv[1]}/world2-rank{r}.json"))
    print(f"rank {r}: TP logits diff {res['tp_logits_diff']:.1e}, greedy equal {res['tp_greedy'] == res['ref_greedy']}, "
          + ", ".join(f"{k} max loss diff {max(abs(a - b) for a, b in zip(v['losses'], v['ref_losses'])):.1e}"
                      for k, v in res.items() if k.endswith("_train")))
EOF
  rm -rf "$TMP"
else
  echo "-- one GPU: the nccl multi-GPU checks need 2 (the same checks run on CPU/gloo in CI)"
fi

echo; echo "== 2. training throughput (bf16, forward + backward + fused AdamW)"
limit 240 python - <<'EOF'
import os, time, torch, torch.nn.functional as F
from llamazoo.io.hf import random_model
from llamazoo.model.llama import LlamaConfig

quick = os.environ.get("QUICK") == "1"
# ~1.1B (Llama-style, GQA) or ~0.3B for --quick; sequence 2048.
cfg = LlamaConfig(vocab_size=32000, hidden_size=2048 if not quick else 1024, intermediate_size=5632 if not quick else 2816,
                  num_hidden_layers=22 if not quick else 16, num_attention_heads=32 if not quick else 16,
                  num_key_value_heads=4, max_position_embeddings=2048)
B, T = (4, 2048) if not quick else (4, 1024)
name = torch.cuda.get_device_name(0)
peak = 989e12 if ("H100" in name or "H200" in name) else 312e12 if "A100" in name else None
N = cfg.num_parameters
flops_per_token = 6 * N + 12 * cfg.num_hidden_layers * cfg.hidden_size * T  # weights + causal attention (x0.5 x2)
print(f"model {N / 1e9:.2f} B params, batch {B} x {T}, {name}")
def run(compiled: bool) -> None:
    torch.manual_seed(0)
    model = random_model(cfg, dtype=torch.bfloat16, device="cuda").train()
    if compiled:
        for layer in model.model.layers:
            layer.compile()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    ids = torch.randint(0, cfg.vocab_size, (B, T + 1), device="cuda")
    def step():
        loss = F.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
        loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
    for _ in range(3):
        step()
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
    n = 5 if quick else 10
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / n
    tps = B * T / dt
    mfu = f"{tps * flops_per_token / peak:.1%}" if peak else "n/a (unknown peak)"
    print(f"  {'compiled' if compiled else 'eager   '}: {tps:10.0f} tokens/s  MFU {mfu}  "
          f"peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    del model, opt
    torch.cuda.empty_cache()
for compiled in (False, True):
    try:
        run(compiled)
    except Exception as e:  # report and go on: the other numbers are still worth having
        print(f"  {'compiled' if compiled else 'eager'}: failed ({type(e).__name__}: {str(e)[:200]})")
        torch.cuda.empty_cache()
EOF
echo "  (compare the peak memory with: llamazoo plan <config> --batch-size B --seq-len T --dtype bf16)"

echo; echo "== 3. decode throughput (batch 1, bf16, static KV cache)"
limit 240 python - <<'EOF'
import os, time, torch
from llamazoo.io.hf import random_model
from llamazoo.model.llama import LlamaConfig

quick = os.environ.get("QUICK") == "1"
src = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda"); dst = torch.empty_like(src)
for _ in range(3):
    dst.copy_(src)
torch.cuda.synchronize(); t0 = time.perf_counter()
for _ in range(20):
    dst.copy_(src)
torch.cuda.synchronize()
copy_bw = 2 * src.numel() * 20 / (time.perf_counter() - t0)  # read + write
print(f"device copy bandwidth: {copy_bw / 1e9:.0f} GB/s (read + write)")
del src, dst
cfg = LlamaConfig(vocab_size=32000, hidden_size=2048 if not quick else 1024, intermediate_size=5632 if not quick else 2816,
                  num_hidden_layers=22 if not quick else 16, num_attention_heads=32 if not quick else 16,
                  num_key_value_heads=4, max_position_embeddings=2048)
model = random_model(cfg, dtype=torch.bfloat16, device="cuda").eval()
weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
prompt, new = 128, 256
def run(compiled: bool) -> None:
    model.setup_cache(1, prompt + new)
    step = model
    if compiled:
        step = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    ids = torch.randint(0, cfg.vocab_size, (1, prompt), device="cuda")
    with torch.no_grad():
        logits = model(ids, cache_pos=torch.arange(prompt, device="cuda"))
        tok = logits[:, -1:].argmax(-1)
        for i in range(8):  # warm-up (and compile)
            logits = step(tok, cache_pos=torch.tensor([prompt + i], device="cuda"))
        torch.cuda.synchronize(); t0 = time.perf_counter()
        for i in range(8, new):
            logits = step(tok, cache_pos=torch.tensor([prompt + i], device="cuda"))
            tok = logits[:, -1:].argmax(-1)
        torch.cuda.synchronize()
    tps = (new - 8) / (time.perf_counter() - t0)
    print(f"  {'compiled' if compiled else 'eager   '}: {tps:7.1f} tokens/s, weight reads {weight_bytes * tps / 1e9:6.0f} GB/s "
          f"({weight_bytes * tps / (copy_bw / 2):.0%} of the copy read bandwidth), model {weight_bytes / 1e9:.2f} GB")
    model.clear_cache()
for compiled in (False, True):
    try:
        run(compiled)
    except Exception as e:
        print(f"  {'compiled' if compiled else 'eager'}: failed ({type(e).__name__}: {str(e)[:200]})")
        model.clear_cache()
EOF
echo "-- llamazoo generate on the default model (app-level report)"
limit 90 python -m llamazoo generate model.device=cuda model.dtype=bfloat16 generation.max_new_tokens=128 \
  generation.output_dir=/tmp/llamazoo-gpu-generate | tail -n 9
echo; echo "done"
