"""llamazoo's Llama computes the same logits as transformers.LlamaForCausalLM (fp32, random weights)."""
from __future__ import annotations

import pytest
import torch

from llamazoo.io.hf import load_model

VARIANTS = {
    "mha": {},
    "gqa": dict(num_key_value_heads=2),
    "mqa": dict(num_key_value_heads=1),
    "rope_linear": dict(rope_scaling={"rope_type": "linear", "factor": 4.0}),
    "rope_llama3": dict(rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16}),
    "tied": dict(tie_word_embeddings=True),
    "attention_bias": dict(attention_bias=True, mlp_bias=True),
    "head_dim": dict(head_dim=24, num_key_value_heads=2),
}


def compare(hf_model, ours, ids, **kw):
    with torch.no_grad():
        ref = hf_model(ids, **kw).logits
        got = ours(ids, **{k: v for k, v in kw.items() if k != "attention_mask"})
    return ref, got


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_transformers(hf_folder, variant):
    hf_model, folder = hf_folder(**VARIANTS[variant])
    ours = load_model(folder)
    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(1))
    ref, got = compare(hf_model, ours, ids)
    assert got.shape == ref.shape == (2, 40, 256)
    assert (got - ref).abs().max().item() <= 1e-4
    assert torch.equal(got.argmax(-1), ref.argmax(-1))


def test_dynamic_rope_beyond_max_positions(hf_folder):
    # 100 tokens > max_position_embeddings (64): dynamic NTK rescales the base.
    hf_model, folder = hf_folder(rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    ours = load_model(folder)
    ids = torch.randint(0, 256, (1, 100), generator=torch.Generator().manual_seed(2))
    ref, got = compare(hf_model, ours, ids)
    assert (got - ref).abs().max().item() <= 1e-4
    # and it really differs from plain RoPE at these lengths
    plain = load_model(folder)
    plain.config.rope_scaling = None
    with torch.no_grad():
        assert (plain(ids) - got).abs().max().item() > 1e-3


def test_left_padded_batch_with_mask_and_positions(hf_folder):
    hf_model, folder = hf_folder(num_key_value_heads=2)
    ours = load_model(folder)
    lengths = [12, 7, 3]
    T = max(lengths)
    g = torch.Generator().manual_seed(3)
    ids = torch.zeros(3, T, dtype=torch.long)
    pad = torch.zeros(3, T, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, T - n:] = torch.randint(3, 256, (n,), generator=g)
        pad[i, T - n:] = 1
    position_ids = (pad.cumsum(-1) - 1).clamp(min=0)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    mask4d = causal[None, None] & pad[:, None, None, :].bool()
    with torch.no_grad():
        ref = hf_model(ids, attention_mask=pad, position_ids=position_ids).logits
        got = ours(ids, position_ids=position_ids, attention_mask=mask4d)
    valid = pad.bool()
    assert (got[valid] - ref[valid]).abs().max().item() <= 1e-4
    # each row equals the same prompt run alone, unpadded
    for i, n in enumerate(lengths):
        with torch.no_grad():
            alone = ours(ids[i:i + 1, T - n:])
        assert (alone[0] - got[i, T - n:]).abs().max().item() <= 1e-4
    assert torch.isfinite(got).all()


def test_kv_cache_decode_equals_full_forward(hf_folder):
    _, folder = hf_folder(num_key_value_heads=2)
    ours = load_model(folder)
    ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = ours(ids)
        ours.setup_cache(batch=2, max_len=32)
        pre = ours(ids[:, :15], cache_pos=torch.arange(15))
        steps = [ours(ids[:, t:t + 1], cache_pos=torch.tensor([t])) for t in range(15, 20)]
        ours.clear_cache()
    got = torch.cat([pre] + steps, dim=1)
    assert (got - full).abs().max().item() <= 1e-4


def test_precision_knobs_in_bf16(hf_folder):
    """bf16 with the knobs stays close to fp32; each knob changes the computation as documented."""
    from llamazoo.model.llama import PrecisionOptions

    _, folder = hf_folder()
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(5))
    ref = load_model(folder)(ids)
    outs = {}
    for name, opts in {
        "defaults": PrecisionOptions(),
        "all_fp32": PrecisionOptions(fp32_ln=True, fp32_logits=True, fp32_skip_add=True, mixedp_attn=False),
        "no_fp32_logits": PrecisionOptions(fp32_logits=False),
    }.items():
        model = load_model(folder, dtype="bfloat16", opts=opts)
        assert model.lm_head.weight.dtype == torch.bfloat16
        with torch.no_grad():
            outs[name] = model(ids)
    assert outs["defaults"].dtype == torch.float32
    assert outs["no_fp32_logits"].dtype == torch.bfloat16
    for name, out in outs.items():
        assert (out.float() - ref).abs().max().item() < 0.1, name
    assert not torch.equal(outs["defaults"], outs["all_fp32"])


def test_named_config_parameter_counts():
    from llamazoo.model.registry import NAMED_CONFIGS, count_parameters, named_config

    expected = {"llama2-7b": 6_738_415_616, "llama2-13b": 13_015_864_320, "llama2-70b": 68_976_648_192,
                "llama3-8b": 8_030_261_248, "llama3.1-8b": 8_030_261_248, "llama3.1-70b": 70_553_706_496,
                "smollm2-135m": 134_515_008}
    for name, count in expected.items():
        cfg = named_config(name)
        assert count_parameters(cfg) == count == cfg.num_parameters, name
    assert {"tiny", "tiny-gqa"} <= set(NAMED_CONFIGS)


def test_named_config_matches_transformers_architecture():
    """Our llama3.1-8b config builds the same parameter shapes as transformers' from our config.json."""
    import transformers

    from llamazoo.model.llama import LlamaForCausalLM
    from llamazoo.model.registry import named_config

    cfg = named_config("llama3.1-8b")
    hf_cfg = transformers.LlamaConfig(**{k: v for k, v in cfg.to_hf().items() if k != "architectures"})
    with torch.device("meta"):
        hf = transformers.LlamaForCausalLM(hf_cfg)
        ours = LlamaForCausalLM(cfg)
    assert {k: tuple(v.shape) for k, v in hf.state_dict().items()} == \
        {k: tuple(v.shape) for k, v in ours.state_dict().items()}


@pytest.mark.parametrize("shape", [(3072, 576), (576, 1536), (100, 64)])
def test_upcast_prompt_rows_do_not_depend_on_the_rows_beside_them(shape):
    """Up to _UPCAST_WEIGHT_FIRST_ROWS rows the upcast GEMM runs weight-first, beyond it x-first: a row's
    numbers must be the same either way (serve packs prompts into one pass of any length and promises each
    the tokens it gets alone). Fails on a BLAS whose two orders sum differently: then keep one order."""
    from llamazoo.model import llama

    g = torch.Generator().manual_seed(shape[0])
    w = torch.randn(*shape, generator=g).bfloat16()
    many = torch.randn(1, llama._UPCAST_WEIGHT_FIRST_ROWS + 40, shape[1], generator=g).bfloat16()
    alone = llama.bf16_linear_in_fp32(many[:, :20], w, None)
    for rows in (20, 64, llama._UPCAST_WEIGHT_FIRST_ROWS, llama._UPCAST_WEIGHT_FIRST_ROWS + 1, many.shape[1]):
        assert torch.equal(llama.bf16_linear_in_fp32(many[:, :rows], w, None)[:, :20], alone), rows


def bf16_against_transformers(hf_folder, rows: int):
    """Our bf16 model and its logits for `rows` random 40-token prompts, after checking that they are as close
    to the fp32 reference as transformers' bf16 model's and pick the same tokens (95%)."""
    import transformers

    hf_model, folder = hf_folder(num_key_value_heads=2)
    hf_bf16 = transformers.LlamaForCausalLM.from_pretrained(folder, torch_dtype=torch.bfloat16)
    ours = load_model(folder, dtype="bfloat16")
    ids = torch.randint(0, 256, (rows, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, ref32 = hf_bf16(ids).logits.float(), hf_model(ids).logits
        got = ours(ids).float()
    assert (got - ref32).abs().max() <= 1.5 * (ref - ref32).abs().max() + 1e-3  # as close to fp32 as HF bf16
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.95
    return ours, ids, got


def test_bf16_prompts_run_the_c_kernel_where_the_cpu_has_no_bf16_gemm(hf_folder, monkeypatch):
    """With llamazoo's C kernel built, bf16 prompts on such CPUs take it too (its panel path from 24 rows):
    logits as close to fp32 as transformers' bf16 model, and each prompt's numbers the same alone or
    with others in the batch (the kernel's sums do not depend on the row count)."""
    from llamazoo.kernels import cpu as cpu_kernels
    from llamazoo.model import llama

    if not cpu_kernels.available():
        pytest.skip(f"llamazoo's C kernels: {cpu_kernels.why_unavailable()}")
    monkeypatch.setattr(llama, "_native_bf16", False)  # as on an AVX2 CPU, whatever this one has
    calls = []
    real = cpu_kernels.linear_bf16
    monkeypatch.setattr(cpu_kernels, "linear_bf16", lambda x, w, **kw: calls.append(x.shape) or real(x, w, **kw))
    ours, ids, got = bf16_against_transformers(hf_folder, 3)
    with torch.no_grad():
        alone = ours(ids[1:2]).float()
    n_linear = sum(isinstance(m, torch.nn.Linear) for m in ours.modules())
    assert len(calls) == 2 * n_linear and calls[0] == (3, 40, 64)
    assert torch.equal(alone[0], got[1])


def test_bf16_prompts_upcast_where_the_cpu_has_no_bf16_gemm(hf_folder, monkeypatch):
    """Prompt-sized bf16 matmuls (>= UPCAST_MIN_TOKENS tokens, no autograd) run as fp32 GEMMs over slices
    of the upcast weight on CPUs without bf16 GEMM kernels where llamazoo's C kernel is not built: the
    bf16 result of fp32 accumulation, as transformers' bf16 model gives; one-token steps and training keep
    F.linear."""
    from llamazoo.model import llama

    monkeypatch.setattr(llama, "_native_bf16", False)  # as on an AVX2 CPU, whatever this one has
    monkeypatch.setattr(llama, "_bf16_kernel_fits", lambda w: False)  # no C kernel
    monkeypatch.setattr(llama, "_UPCAST_SLICE", 7 * 64)  # several slices, the last one short
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 20, 64, generator=g).bfloat16()
    w, b = torch.randn(100, 64, generator=g).bfloat16(), torch.randn(100, generator=g).bfloat16()
    want = (x.float() @ w.float().t() + b.float()).bfloat16()
    got = llama.bf16_linear_in_fp32(x, w, b)
    assert got.dtype == torch.bfloat16 and got.shape == (2, 20, 100)
    torch.testing.assert_close(got, want, rtol=2 ** -8, atol=0)

    calls = []
    real = llama.bf16_linear_in_fp32
    monkeypatch.setattr(llama, "bf16_linear_in_fp32", lambda *a: calls.append(a[0].shape) or real(*a))
    ours, ids, _ = bf16_against_transformers(hf_folder, 2)
    n_linear = sum(isinstance(m, torch.nn.Linear) for m in ours.modules())
    assert len(calls) == n_linear and all(s[1] == 40 for s in calls)
    calls.clear()
    with torch.no_grad():
        ours(ids[:, :llama.UPCAST_MIN_TOKENS - 1])  # too short
        ours(ids[:, :1])
    ours(ids)  # autograd on: F.linear
    assert calls == []
