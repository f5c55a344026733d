"""llamazoo.kernels.cpu: the C linear kernels against fp32 products, row for row the same in any batch, their
build (cached; a failing compiler is one warning and torch's kernels), and where the model uses them."""
from __future__ import annotations

import logging
import platform
import subprocess

import pytest
import torch
from torch import nn

from llamazoo.kernels import cpu


def can_build_here() -> bool:
    return (platform.machine().lower() in ("x86_64", "amd64") and cpu._compiler() is not None
            and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"))


def test_kernels_are_built_wherever_they_can_be():
    """So that the rest of the suite tests them, not a silent fallback."""
    if can_build_here():
        assert cpu.available(), cpu.why_unavailable()
    else:
        assert not cpu.available() and cpu.why_unavailable()


needs_kernels = pytest.mark.skipif(not can_build_here(), reason="the kernels are x86-64 AVX2 code built with a C compiler")


@needs_kernels
@pytest.mark.parametrize("rows,out_f,in_f", [(1, 1, 8), (2, 7, 16), (5, 70, 96), (9, 256, 576), (4, 3, 40), (3, 64, 4096)])
def test_bf16_kernel_equals_the_fp32_product(rows, out_f, in_f):
    g = torch.Generator().manual_seed(rows * out_f)
    w = torch.randn(out_f, in_f, generator=g).bfloat16()
    x = torch.randn(rows, in_f, generator=g)
    y = cpu.linear_bf16(x, w)
    ref = x.double() @ w.double().t()
    assert y.dtype == torch.float32 and y.shape == (rows, out_f)
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    # bf16 activations are read as their exact fp32 values
    assert torch.equal(cpu.linear_bf16(x.bfloat16(), w), cpu.linear_bf16(x.bfloat16().float(), w))


@needs_kernels
def test_bf16_kernel_rounds_its_output_as_torch_does():
    """bf16 results are the fp32 sums rounded once, to nearest even, as `.to(torch.bfloat16)` (ties, inf, NaN)."""
    one = 1 + 2 ** -8  # halfway between two bf16 numbers: rounds to the even one (1.0)
    values = torch.tensor([one, 1 + 3 * 2 ** -8, -one, 2 ** -130, 3.4e38 * 1.001, float("inf"), float("nan"),
                           0.0, -0.0, 65504.5, 1e-3, -7.77])
    w = torch.zeros(1, 8, dtype=torch.bfloat16)
    w[0, 0] = 1  # y = x[:, 0] exactly
    x = torch.zeros(len(values), 8)
    x[:, 0] = values
    got = cpu.linear_bf16(x, w, out_dtype=torch.bfloat16)[:, 0]
    want = values.to(torch.bfloat16)
    assert torch.equal(got.isnan(), want.isnan())
    assert torch.equal(got[~want.isnan()], want[~want.isnan()])
    g = torch.Generator().manual_seed(3)
    w = torch.randn(37, 576, generator=g).bfloat16()
    for x in (torch.randn(5, 576, generator=g), torch.randn(5, 576, generator=g).bfloat16()):
        assert torch.equal(cpu.linear_bf16(x, w, out_dtype=torch.bfloat16), cpu.linear_bf16(x, w).bfloat16())


@needs_kernels
@pytest.mark.parametrize("in_f", [576, 4096])  # rows of 1.1 KB (prefetching loop) and 8 KB
def test_several_bf16_weights_in_one_call_equal_a_call_each(in_f):
    g = torch.Generator().manual_seed(in_f)
    ws = [torch.randn(n, in_f, generator=g).bfloat16() for n in (64, 18, 18)]  # q/k/v-like, tails of 2 rows
    fused = cpu.MultiLinear(ws)
    for rows in (1, 3, 8, 30):  # 30: the panel kernel (prompt-sized calls)
        x = torch.randn(rows, in_f, generator=g).bfloat16()
        for dtype in (torch.float32, torch.bfloat16):
            want = torch.cat([cpu.linear_bf16(x, w, out_dtype=dtype) for w in ws], dim=-1)
            assert torch.equal(fused(x, out_dtype=dtype), want)
    with pytest.raises(ValueError, match="with the same number of inputs"):
        cpu.MultiLinear([ws[0], torch.ones(2, 8, dtype=torch.bfloat16)])


@needs_kernels
@pytest.mark.parametrize("group", [None, 32])
def test_int8_kernel_equals_the_dequantized_product(group):
    g = torch.Generator().manual_seed(1)
    q = torch.randint(-127, 128, (37, 96), dtype=torch.int8, generator=g)
    scale = (torch.rand(37, 96 // (group or 96), generator=g) * 0.01).bfloat16()
    x = torch.randn(6, 96, generator=g)
    w = q.double() * scale.double().repeat_interleave(group or 96, 1)
    ref = x.double() @ w.t()
    y = cpu.linear_int8(x, q, scale, group or 96)
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    # bf16 activations read as their exact fp32 values, a bf16 result rounded once
    xb = x.bfloat16()
    assert torch.equal(cpu.linear_int8(xb, q, scale, group or 96, out_dtype=torch.bfloat16),
                       cpu.linear_int8(xb.float(), q, scale, group or 96).bfloat16())


def q8_blocks(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The int4 kernel's activations: codes and scales per 32 inputs, with cpu_linear.c's fp32 operations."""
    b = x.reshape(x.shape[0], -1, 32)
    d = b.abs().amax(-1, keepdim=True) / 127
    return (b * torch.where(d != 0, 1 / d, torch.zeros_like(d))).round(), d


@needs_kernels
@pytest.mark.parametrize("rows,out_f,in_f,group", [(1, 5, 32, 32), (2, 70, 96, 32), (9, 64, 256, 64), (3, 33, 512, 128),
                                                   (4, 8, 512, 256)])
def test_int4_kernel_equals_the_integer_product_of_its_blocks(rows, out_f, in_f, group):
    """x in int8 blocks of 32 (as llama.cpp's Q8_0) times (q - 8) * s + z: the block sums are exact integers."""
    g = torch.Generator().manual_seed(out_f)
    codes = torch.randint(0, 16, (out_f, in_f), dtype=torch.uint8, generator=g)
    packed = codes[:, 0::2] | (codes[:, 1::2] << 4)  # even inputs in the low nibble
    s = (torch.rand(out_f, in_f // group, generator=g) * 0.02).bfloat16()
    z = (torch.randn(out_f, in_f // group, generator=g) * 0.02).bfloat16()
    x = torch.randn(rows, in_f, generator=g) * torch.linspace(0.1, 4, in_f)  # blocks of different ranges
    x[0, :32] = 0  # an all-zero block (scale 0)
    sz = torch.stack((s, z), -1).contiguous()
    y = cpu.linear_int4(x, packed, sz, group)
    xb = x.bfloat16()  # bf16 activations read as their exact fp32 values, a bf16 result rounded once
    assert torch.equal(cpu.linear_int4(xb, packed, sz, group, out_dtype=torch.bfloat16),
                       cpu.linear_int4(xb.float(), packed, sz, group).bfloat16())
    xq, d = q8_blocks(x)
    assert xq.abs().max() <= 127
    w = (codes.double() - 8) * s.double().repeat_interleave(group, 1) + z.double().repeat_interleave(group, 1)
    ref = (xq.double() * d.double()).reshape(rows, in_f) @ w.t()
    assert y.dtype == torch.float32 and y.shape == (rows, out_f)
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    # and within the activations' quantization error (half a step per input) of the plain product
    plain = x.double() @ w.t()
    bound = (0.5 * d.double().expand(-1, -1, 32).reshape(rows, in_f)) @ w.abs().t()
    assert ((y.double() - plain).abs() <= bound + 1e-4).all()


@needs_kernels
@pytest.mark.parametrize("kind", ["bf16", "int8", "int8-grouped", "int4", "int4-g32", "fp32", "fp32-short"])
def test_a_row_gives_the_same_numbers_alone_and_in_any_batch(kind):
    """Continuous batching needs it: a sequence decodes to the same tokens whoever shares its steps, and
    a prompt chunk gets the same numbers alone or packed with others. Up to 110 rows: prompt-sized calls
    run the panel kernel (from 24 / 32 rows; chunks of 96 rows), which must sum as the tile kernels do.
    Rows of 1056 inputs are longer than the k slices of both (sums carried between slices); 45 outputs
    end in partial blocks; fp32 rows of 2560 keep the tile kernel at every batch."""
    g = torch.Generator().manual_seed(2)
    K = {"fp32": 2560, "int4": 256, "int4-g32": 288}.get(kind, 1056)
    if kind.startswith("fp32"):
        w = torch.randn(45, K, generator=g)
        run = cpu.MultiLinear([w[:20], w[20:]])
    elif kind == "bf16":
        w = torch.randn(45, K, generator=g).bfloat16()
        run = lambda x: cpu.linear_bf16(x, w)  # noqa: E731
    elif kind.startswith("int4"):  # group 32 at 1-2 rows: each row's factors in one pass (9 groups: a tail)
        group = 32 if kind == "int4-g32" else 64
        packed = torch.randint(0, 256, (45, K // 2), dtype=torch.uint8, generator=g)
        sz = (torch.rand(45, K // group, 2, generator=g) * 0.01).bfloat16()
        run = lambda x: cpu.linear_int4(x, packed, sz, group)  # noqa: E731
    else:
        q = torch.randint(-127, 128, (45, K), dtype=torch.int8, generator=g)
        group = 32 if kind == "int8-grouped" else K
        scale = (torch.rand(45, K // group, generator=g) * 0.01).bfloat16()
        run = lambda x: cpu.linear_int8(x, q, scale, group)  # noqa: E731
    n = 110
    x = torch.randn(n, K, generator=g)
    alone = torch.cat([run(x[i:i + 1]) for i in range(n)])
    if kind.startswith("fp32"):
        ref = x.double() @ w.double().t()
        torch.testing.assert_close(run(x).double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    for batch in (2, 3, 4, 7, 13, 24, 37, 100, n):
        assert torch.equal(torch.cat([run(x[i:i + batch]) for i in range(0, n, batch)]), alone), batch
    torch.set_num_threads(1)
    try:
        assert torch.equal(run(x), alone)  # and with any number of threads
    finally:
        torch.set_num_threads(cpu_threads)


cpu_threads = torch.get_num_threads()


@needs_kernels
def test_build_is_cached_and_a_failing_compiler_warns_once(tmp_path, monkeypatch, caplog):
    def fresh_state():
        monkeypatch.setattr(cpu, "_library", None)
        monkeypatch.setattr(cpu, "_tried", False)
        monkeypatch.setattr(cpu, "_why_not", None)

    monkeypatch.setenv("LLAMAZOO_CACHE", str(tmp_path / "cache"))
    fresh_state()
    assert cpu.available()
    built = list((tmp_path / "cache" / "kernels").iterdir())
    assert len(built) == 1 and built[0].suffix == ".so"  # no temporary left beside it
    fresh_state()

    def no_compiler_run(*args, **kwargs):
        raise AssertionError("compiled again instead of loading the cached library")

    monkeypatch.setattr(subprocess, "run", no_compiler_run)
    assert cpu.available()
    monkeypatch.undo()

    monkeypatch.setenv("LLAMAZOO_CACHE", str(tmp_path / "other"))
    monkeypatch.setenv("CC", "false")  # a compiler that fails
    fresh_state()
    with caplog.at_level(logging.WARNING, logger="llamazoo.kernels"):
        assert not cpu.available() and not cpu.available()
    why = cpu.why_unavailable()
    assert why.startswith("building cpu_linear.c, cpu_decode.c failed: false exited with 1")
    assert [r.getMessage() for r in caplog.records] == [f"CPU kernels unavailable, torch's are used instead: {why}"]
    assert not list((tmp_path / "other" / "kernels").iterdir())  # nothing half-written left
    with pytest.raises(RuntimeError, match="CPU kernels are unavailable: building cpu_linear.c, cpu_decode.c failed"):
        cpu.linear_bf16(torch.ones(1, 8), torch.ones(2, 8, dtype=torch.bfloat16))


def test_switched_off_by_environment(monkeypatch):
    monkeypatch.setenv("LLAMAZOO_CPU_KERNELS", "0")
    monkeypatch.setattr(cpu, "_library", None)
    monkeypatch.setattr(cpu, "_tried", False)
    assert not cpu.available() and cpu.why_unavailable() == "LLAMAZOO_CPU_KERNELS=0"


@needs_kernels
def test_model_linear_takes_the_bf16_kernel_for_decode_rows_and_prompts(monkeypatch):
    """bf16 weights on a CPU without bf16 GEMM kernels: decode rows and prompts through the C kernel (a
    row's numbers do not depend on how many share the call), training (autograd) through F.linear."""
    from llamazoo.model import llama

    if not llama._slow_bf16_gemm(torch.ones(1, dtype=torch.bfloat16)):
        pytest.skip("this CPU has bf16 GEMM kernels: torch's are used")  # not this machine
    calls = []
    real = cpu.linear_bf16
    monkeypatch.setattr(cpu, "linear_bf16", lambda x, w, **kw: calls.append(x.shape) or real(x, w, **kw))
    torch.manual_seed(0)
    lin = nn.Linear(64, 24, bias=True).bfloat16()
    x = torch.randn(3, 1, 64).bfloat16()
    with torch.inference_mode():
        y = llama.linear(x, lin)
        prompt = llama.linear(torch.randn(1, llama.UPCAST_MIN_TOKENS, 64).bfloat16(), lin)
    assert calls == [(3, 1, 64), (1, llama.UPCAST_MIN_TOKENS, 64)]
    assert y.dtype == torch.bfloat16 and prompt.shape == (1, llama.UPCAST_MIN_TOKENS, 24)
    ref = (x.float() @ lin.weight.float().t() + lin.bias.float()).bfloat16()
    assert (y.float() - ref.float()).abs().max() <= 2 ** -7 * ref.float().abs().max()  # one bf16 rounding apart
    y_grad = llama.linear(x, lin)  # autograd on: F.linear's graph
    assert len(calls) == 2 and y_grad.requires_grad


@needs_kernels
def test_engine_fuses_bf16_projections_through_the_kernel_with_the_same_tokens():
    """A bf16 model where oneDNN has no bf16 kernels: q/k/v and gate/up become one C-kernel call each
    (the weights as they are), and generation gives what the unfused layers give."""
    from llamazoo.generation.engine import Engine
    from llamazoo.generation.packed import KernelLinear, unpack
    from llamazoo.io.hf import load_model
    from llamazoo.model import llama

    if not llama._slow_bf16_gemm(torch.ones(1, dtype=torch.bfloat16)):
        pytest.skip("this CPU has bf16 GEMM kernels: oneDNN packs bf16 instead")  # not this machine
    model = load_model("tiny", seed=0, dtype="bfloat16")
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    prompts = [[5, 9, 17, 33, 2, 8], [40, 41]]
    plain = [r.token_ids for r in Engine(model, None, pack=False).generate_batch(prompts, 12)]
    engine = Engine(model, None)
    attn = model.model.layers[0].self_attn
    assert engine.packed and isinstance(attn.fused_qkv, KernelLinear)
    assert attn.fused_qkv.weights[0].data_ptr() == attn.q_proj.weight.data_ptr()  # not a copy
    assert [r.token_ids for r in engine.generate_batch(prompts, 12)] == plain
    assert [r.token_ids for r in engine.generate_batch(prompts[:1], 12)] == plain[:1]
    x = torch.randn(3, 1, model.config.hidden_size).bfloat16()
    with torch.inference_mode():
        q, k, v = attn.fused_qkv(x)
        assert torch.equal(q, llama.linear(x, attn.q_proj)) and torch.equal(v, llama.linear(x, attn.v_proj))
    after = model.state_dict()
    assert all(torch.equal(after[k], weights[k]) for k in weights)
    unpack(model)
    assert attn.fused_qkv is None and model.model.layers[0].mlp.fused_gate_up is None


@needs_kernels
@pytest.mark.parametrize("tie", [False, True])
def test_fp32_batched_decoding_runs_every_projection_through_the_kernel(tie):
    """Engines packed for batches (generate batches, serve) on fp32 weights: every projection and the LM head
    (tied or not: nothing copied) through the C kernel, prompts included, the unpacked model's tokens, a
    row's numbers the same alone and in a batch (so serve needs no scratch row), state_dict untouched."""
    from llamazoo.generation.engine import Engine, SlotCache
    from llamazoo.generation.packed import BATCHED_HINT, KernelLinear, unpack
    from llamazoo.io.hf import random_model
    from llamazoo.model.llama import LlamaConfig

    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=tie)
    model = random_model(cfg, seed=0)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    prompts = [[5, 9, 17, 33, 2, 8], [40, 41], [7] * 20]
    plain = [r.token_ids for r in Engine(model, None, pack=False).generate_batch(prompts, 10)]
    engine = Engine(model, None, pack_batch_hint=BATCHED_HINT)
    layer = model.model.layers[1]
    for kernel in (layer.self_attn.fused_qkv, layer.mlp.fused_gate_up, layer.self_attn.o_proj.packed,
                   layer.mlp.down_proj.packed, model.lm_head.packed):
        assert isinstance(kernel, KernelLinear)
    assert model.lm_head.packed.weights[0].data_ptr() == model.lm_head.weight.data_ptr()  # not a copy
    assert (model.model.embed_tokens.weight is model.lm_head.weight) == tie
    calls = []
    real = cpu.MultiLinear.__call__
    with pytest.MonkeyPatch.context() as mp:  # prompts too (the 20-token one in one call per projection)
        mp.setattr(cpu.MultiLinear, "__call__", lambda self, x, **kw: calls.append(x.shape) or real(self, x, **kw))
        assert [r.token_ids for r in engine.generate_batch(prompts, 10)] == plain
    assert (3, 20, 64) in calls
    slots = SlotCache(engine, 4, 64)
    assert slots.min_rows == 1
    # a prompt's numbers alone and packed with others in one pass
    alone = slots.prefill(0, prompts[2], 0)
    assert torch.equal(slots.prefill_rows(0, [(prompts[2], 0), ([3] * 17, 0)])[0], alone.reshape(-1))
    after = model.state_dict()  # unpacks first
    assert all(torch.equal(after[k], weights[k]) for k in weights)
    assert layer.self_attn.fused_qkv is None and "packed" not in model.lm_head.__dict__
    unpack(model)
