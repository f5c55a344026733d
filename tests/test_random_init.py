"""Random init from a config: built on the meta device and materialized tensor by tensor in the target dtype,
with the weights an eager fp32 build + init + cast gives for the same seed, and a peak near the target size."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from llamazoo.io.hf import random_model
from llamazoo.model import llama
from llamazoo.model.llama import LlamaConfig, LlamaForCausalLM, init_weights

# Sizes that are not multiples of 16 (CPU normal_ draws in blocks of 16 and redraws a ragged tail).
ODD = dict(vocab_size=101, hidden_size=36, intermediate_size=50, num_hidden_layers=2, num_attention_heads=2,
           num_key_value_heads=1, attention_bias=True)


def eager_init(cfg: LlamaConfig, dtype: torch.dtype, seed: int) -> LlamaForCausalLM:
    """The previous path: the whole model built in fp32 on CPU (modules draw their default init), HF's init,
    then one cast."""
    torch.manual_seed(seed)
    with torch.device("cpu"):
        model = LlamaForCausalLM(cfg)
    init_weights(model)
    return model.to(dtype)


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk", [llama.INIT_CHUNK, 32])
def test_same_weights_as_eager_init(monkeypatch, tie, dtype, chunk):
    monkeypatch.setattr(llama, "INIT_CHUNK", chunk)  # 32: every tensor drawn in pieces
    cfg = LlamaConfig(**ODD, tie_word_embeddings=tie)
    expected = eager_init(cfg, dtype, seed=7)
    after_expected = torch.rand(4)
    got = random_model(cfg, dtype=dtype, seed=7)
    assert torch.equal(torch.rand(4), after_expected)  # the generator ends where it did
    want, have = expected.state_dict(), got.state_dict()
    assert list(have) == list(want)
    for name in want:
        assert have[name].dtype == dtype and have[name].device.type == "cpu", name
        assert torch.equal(have[name], want[name]), name
    assert (got.lm_head.weight is got.model.embed_tokens.weight) == tie
    assert not any(t.is_meta for t in list(got.parameters()) + list(got.buffers()))
    assert got.inv_freq.dtype == torch.float32  # RoPE frequencies stay fp32, as for loaded checkpoints


MEASURE = textwrap.dedent("""
    import json, resource, sys
    import torch
    from llamazoo.io.hf import load_model

    # the first load imports modules and torch's CPU backends allocate on first use (~100 MB together):
    # not the model's memory, so a tiny model is loaded first
    load_model("tiny", dtype="bfloat16", seed=0)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    model = load_model(sys.argv[1], dtype="bfloat16", seed=0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    print(json.dumps({"peak": peak, "size": size, "dtypes": sorted({str(p.dtype) for p in model.parameters()}),
                      "tied": model.lm_head.weight is model.model.embed_tokens.weight}))
""")


@pytest.mark.parametrize("tie", [False, True])
def test_bf16_random_init_peaks_near_bf16_size(tmp_path, tie):
    """~100M parameters from a config.json in bf16: the peak RSS increase stays under 1.2x the bf16 weights
    (the previous fp32 build + cast peaked at ~2x)."""
    cfg = dict(vocab_size=16384, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
               num_attention_heads=12, num_key_value_heads=12, tie_word_embeddings=tie)
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], **cfg}))
    out = subprocess.run([sys.executable, "-c", MEASURE, str(tmp_path / "config.json")], capture_output=True,
                         text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["dtypes"] == ["torch.bfloat16"] and r["tied"] == tie
    assert r["size"] > 190e6
    assert r["peak"] < 1.2 * r["size"], f"peak +{r['peak'] / 1e6:.0f} MB for {r['size'] / 1e6:.0f} MB of bf16 weights"
