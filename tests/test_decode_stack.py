"""The decode-stack kernel (llamazoo.kernels.cpu.DecoderStack, cpu_decode.c) as the generation engine installs it
(llamazoo.generation.packed.install_decode_stack): one-token steps of every layer in one call, against the
model's own layers (fp32: within summation order; bf16: within rounding, same tokens), a row's numbers the
same in any batch, int8 / int4 layers, the fallbacks (replaced weights, other shapes) and bad input."""
from __future__ import annotations

import pytest
import torch

from conftest import hf_tiny_model
from llamazoo.generation.engine import Engine, auto_compile
from llamazoo.generation.packed import install_decode_stack, pack_for_inference, unpack
from llamazoo.io.hf import load_model
from llamazoo.kernels import cpu
from llamazoo.model.llama import PrecisionOptions
from llamazoo.model.quantize import quantize_model
from test_kernels_cpu import needs_kernels

pytestmark = needs_kernels


def teacher_forced(model, prompt_len: int = 9, steps: int = 12, rows: int = 2, stack: bool = True,
                   hidden: bool = False, last: bool = False) -> torch.Tensor:
    """fp32 logits [steps, rows, V] (or the final hidden states) of one-token steps after a prompt (the same
    random tokens either way), rows at different lengths ([B,1] cache positions, as serve decodes them).
    last: as generation asks for them (last_logits=True: the stack's own final norm and head, where it has them)."""
    saved = model.__dict__.get("decode_stack")
    if not stack:
        model.__dict__.pop("decode_stack", None)
    V = model.config.vocab_size
    g = torch.Generator().manual_seed(5)
    prompts = torch.randint(3, V, (4, prompt_len), generator=g)[:rows]  # row r's tokens whatever `rows` is
    feed = torch.randint(3, V, (steps, 4), generator=g)[:, :rows]
    model.setup_cache(rows, 64)
    out = []
    try:
        with torch.inference_mode():
            for r in range(rows):  # row r's prompt is r tokens shorter
                n = prompt_len - r
                view = [layer.self_attn.kv_cache for layer in model.model.layers]
                for layer, c in zip(model.model.layers, view):
                    layer.self_attn.kv_cache = c.rows(r, r + 1)
                model(prompts[r:r + 1, :n], cache_pos=torch.arange(n))
                for layer, c in zip(model.model.layers, view):
                    layer.self_attn.kv_cache = c
            lens = torch.tensor([prompt_len - r for r in range(rows)])
            for s in range(steps):
                pos = (lens + s)[:, None]
                mask = (torch.arange(32 * (1 + int(pos.max()) // 32)) <= pos)[:, None, None, :]
                y = model(feed[s][:, None], position_ids=pos, attention_mask=mask, cache_pos=pos,
                          return_hidden=hidden, last_logits=last)
                out.append(y if last else y[:, -1].float())
    finally:
        if saved is not None:
            model.decode_stack = saved
    return torch.stack(out)


VARIANTS = {
    "fp32 untied gqa": (torch.float32, dict(num_key_value_heads=2), {}),
    "fp32 tied mha": (torch.float32, dict(num_key_value_heads=4, tie_word_embeddings=True), {}),
    "bf16 default knobs": (torch.bfloat16, dict(num_key_value_heads=2), {}),
    "bf16 fp32_ln, fp32 attention": (torch.bfloat16, dict(num_key_value_heads=1),
                                     dict(fp32_ln=True, mixedp_attn=False)),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_stack_steps_equal_the_model_layers(tmp_path, variant):
    dtype, overrides, knobs = VARIANTS[variant]
    hf_tiny_model(max_position_embeddings=256, **overrides).save_pretrained(tmp_path)
    model = load_model(tmp_path, dtype=dtype, opts=PrecisionOptions(**knobs)) if knobs else load_model(tmp_path, dtype=dtype)
    assert install_decode_stack(model)
    assert model.decode_stack.stack.vocab == model.config.vocab_size  # the final norm and head in the call too
    ref = teacher_forced(model, stack=False)
    for got in (teacher_forced(model), teacher_forced(model, last=True)):  # the model's head, the stack's
        if dtype == torch.float32:
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
        else:  # each op rounded as torch rounds it; reductions in another order flip a last bit now and then
            assert (got - ref).abs().mean() < 0.02 * ref.abs().mean()
            assert torch.equal(got.argmax(-1), ref.argmax(-1))
    # without the stack, last_logits is the model's head (plain fp32 at 2 rows: the weight-first product)
    torch.testing.assert_close(teacher_forced(model, stack=False, last=True), ref, rtol=1e-6, atol=1e-6)


def test_a_row_gets_the_same_numbers_alone_and_among_others(tmp_path):
    """Continuous batching: rows at other lengths beside it do not change a row's numbers (bit for bit; the
    hidden states: the plain LM head's F.linear is another kernel at one row)."""
    hf_tiny_model(max_position_embeddings=256).save_pretrained(tmp_path)
    for dtype in (torch.float32, torch.bfloat16):
        model = load_model(tmp_path, dtype=dtype)
        assert install_decode_stack(model)
        three = teacher_forced(model, rows=3, hidden=True)
        one = teacher_forced(model, rows=1, hidden=True)
        assert torch.equal(three[:, 0], one[:, 0])
        # the logits too, where the stack runs the head (its kernel's sums do not depend on the rows)
        assert torch.equal(teacher_forced(model, rows=3, last=True)[:, 0], teacher_forced(model, rows=1, last=True)[:, 0])


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_int8_and_int4_layers_run_in_the_stack(tmp_path, kind):
    hf_tiny_model(max_position_embeddings=256, intermediate_size=128).save_pretrained(tmp_path)
    model = load_model(tmp_path, dtype=torch.bfloat16)
    quantize_model(model, kind, group_size=32)
    assert pack_for_inference(model) and "decode_stack" in model.__dict__  # fused q/k/v, gate/up, then the stack
    assert model.decode_stack.stack.vocab  # the int8 head in the call too
    ref = teacher_forced(model, stack=False)
    for got in (teacher_forced(model), teacher_forced(model, last=True)):
        assert (got - ref).abs().mean() < 0.02 * ref.abs().mean()
        assert torch.equal(got.argmax(-1), ref.argmax(-1))


def test_engines_install_it_and_give_the_tokens_of_the_layers(tmp_path):
    """fp32 at batch 1 and batched, bf16: generate's tokens with the stack equal those without it (the layers,
    eager); compile=auto stays eager where the stack runs; unpack and state_dict remove it."""
    hf_tiny_model(max_position_embeddings=256, tie_word_embeddings=True).save_pretrained(tmp_path)
    prompts = [[5, 9, 11, 200, 3], [7, 7, 100], [42] * 20]
    for dtype, hint in ((torch.float32, 1), (torch.float32, 32), (torch.bfloat16, 1)):
        model = load_model(tmp_path, dtype=dtype)
        assert auto_compile(model, 1, 10_000)[0] is False
        engine = Engine(model, tokenizer=None, pack_batch_hint=hint)
        assert "decode_stack" in model.__dict__
        stacked = [r.token_ids for r in engine.generate_batch(prompts, 12)]
        single = [engine.generate_batch([p], 12)[0].token_ids for p in prompts]
        del model.decode_stack
        layers = [r.token_ids for r in engine.generate_batch(prompts, 12)]
        assert stacked == layers == single
        install_decode_stack(model)
        model.state_dict()
        assert "decode_stack" not in model.__dict__
        unpack(model)


def test_a_new_cache_does_not_keep_the_old_one_alive(tmp_path):
    """The stack remembers the caches it points at without holding them: when a generate call allocates a
    new cache, the previous one is freed before the prompt runs (held until the first decode step, it sat
    next to the new one at the prefill's peak: SmolLM2 int4 at batch 8, 1.18x weights + KV cache, not 1.10x)."""
    import gc
    import weakref

    hf_tiny_model(max_position_embeddings=256).save_pretrained(tmp_path)
    model = load_model(tmp_path, dtype=torch.float32)
    engine = Engine(model, tokenizer=None, pack_batch_hint=32)
    first = [r.token_ids for r in engine.generate_batch([[5, 9, 11], [7, 8]], 6)]
    old = weakref.ref(model.model.layers[0].self_attn.kv_cache.k)
    model.setup_cache(4, 64)  # what the next call with more rows does first
    gc.collect()
    assert old() is None
    assert [r.token_ids for r in engine.generate_batch([[5, 9, 11], [7, 8]] * 2, 6)] == first * 2


def test_replaced_weights_or_a_step_it_cannot_run_take_the_layers(tmp_path):
    hf_tiny_model(max_position_embeddings=256).save_pretrained(tmp_path)
    model = load_model(tmp_path)
    assert install_decode_stack(model)
    stack = model.decode_stack
    mlp = model.model.layers[1].mlp
    mlp.down_proj.weight = torch.nn.Parameter(mlp.down_proj.weight.detach() * 2)  # not what the kernel reads
    got = teacher_forced(model)
    ref = teacher_forced(model, stack=False)
    assert torch.equal(got, ref)
    model = load_model(tmp_path)
    assert install_decode_stack(model)
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach() * 2)  # the head the stack reads
    assert torch.equal(teacher_forced(model, last=True), teacher_forced(model, stack=False, last=True))
    h = torch.zeros(1, 1, model.config.hidden_size)
    assert stack(h, None, None, torch.ones(1, 1, 1, 4, dtype=torch.bool), torch.tensor([0])) is None


def test_models_it_cannot_run_are_not_given_it(tmp_path):
    hf_tiny_model(max_position_embeddings=256, attention_bias=True).save_pretrained(tmp_path / "bias")
    assert not install_decode_stack(load_model(tmp_path / "bias"))
    hf_tiny_model(max_position_embeddings=256).save_pretrained(tmp_path / "plain")
    skip_in_bf16 = load_model(tmp_path / "plain", dtype=torch.bfloat16, opts=PrecisionOptions(fp32_skip_add=False))
    assert not install_decode_stack(skip_in_bf16)  # its residual stream is bf16: the kernel keeps it in fp32


def test_bad_slots_masks_and_caches_are_errors_not_memory_faults(tmp_path):
    hf_tiny_model(max_position_embeddings=256).save_pretrained(tmp_path)
    model = load_model(tmp_path)
    assert install_decode_stack(model)
    model.setup_cache(2, 32)
    kernel = model.decode_stack.stack
    caches = [(layer.self_attn.kv_cache.k, layer.self_attn.kv_cache.v) for layer in model.model.layers]
    D, hd = model.config.hidden_size, model.model.layers[0].self_attn.head_dim
    h, trig = torch.zeros(2, D), torch.zeros(2, hd)
    mask = torch.ones(2, 8, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"cache slots \[0, 32\] / mask width 8 beyond the cache's 32"):
        kernel(h, caches, torch.tensor([0, 32]), mask, trig, trig)
    with pytest.raises(ValueError, match="mask width 40 beyond"):
        kernel(h, caches, torch.tensor([0, 1]), torch.ones(2, 40, dtype=torch.bool), trig, trig)
    with pytest.raises(ValueError, match=r"a bool mask \[2, W\], not torch.float32"):
        kernel(h, caches, torch.tensor([0, 1]), mask.float(), trig, trig)
    with pytest.raises(ValueError, match="KV caches"):
        kernel(torch.zeros(3, D), caches, torch.tensor([0, 1, 2]), torch.ones(3, 8, dtype=torch.bool),
               torch.zeros(3, hd), torch.zeros(3, hd))  # 3 rows, a cache of 2
    with pytest.raises(ValueError, match=r"cos and sin \[2, 16\], not \[1, 16\]"):
        kernel(h, caches, torch.tensor([0, 1]), mask, trig[:1], trig[:1])
    with pytest.raises(ValueError, match="h fp32"):
        kernel(h.bfloat16(), caches, torch.tensor([0, 1]), mask, trig, trig)
    with pytest.raises(ValueError, match=r"Projection: 2 int8 weights"):
        cpu.Projection("int8", [torch.zeros(4, 8, dtype=torch.int8)] * 2)
