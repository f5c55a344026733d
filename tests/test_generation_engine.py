"""Greedy generation is token-identical to transformers' generate, alone and in left-padded batches;
stops, EOS ids and streaming detokenization end and print at the right token."""
from __future__ import annotations

import logging

import pytest
import torch

from conftest import hf_tiny_model
from llamazoo.generation.engine import Engine, StreamDecoder, _RowState
from llamazoo.generation.sampling import SamplingParams
from llamazoo.io.hf import load_model

NEW = 64


pytestmark = pytest.mark.usefixtures("one_thread")
VARIANTS = {
    "mha": {},
    "gqa": dict(num_key_value_heads=2),
    "rope_llama3": dict(num_key_value_heads=2, rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16}),
}


def hf_greedy(hf_model, prompts: list[list[int]], new: int, eos: int | None, pad: int = 0) -> list[list[int]]:
    """transformers generate(do_sample=False) on a left-padded batch; rows cut after their EOS."""
    T = max(map(len, prompts))
    ids = torch.full((len(prompts), T), pad)
    attn = torch.zeros(len(prompts), T, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, T - len(p):] = torch.tensor(p)
        attn[b, T - len(p):] = 1
    with torch.no_grad():
        out = hf_model.generate(input_ids=ids, attention_mask=attn, max_new_tokens=new, do_sample=False,
                                eos_token_id=eos, pad_token_id=pad, min_new_tokens=0)
    rows = []
    for row in out[:, T:].tolist():
        if eos is not None and eos in row:
            row = row[:row.index(eos) + 1]
        rows.append(row)
    return rows


def random_prompts(lengths, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_greedy_matches_transformers_alone_and_batched(tmp_path, variant):
    hf_model = hf_tiny_model(max_position_embeddings=256, **VARIANTS[variant])
    hf_model.save_pretrained(tmp_path)
    engine = Engine(load_model(tmp_path), tokenizer=None)
    prompts = random_prompts([11, 5, 17, 1], 256, seed=1)
    eos = None  # random weights: run all 64 steps, so every position is compared
    ref_batch = hf_greedy(hf_model, prompts, NEW, eos)
    ref_alone = hf_greedy(hf_model, prompts[:1], NEW, eos)
    ours_batch = [r.token_ids for r in engine.generate_batch(prompts, NEW, eos_ids=())]
    assert ours_batch == ref_batch
    assert [r.token_ids for r in engine.generate_batch(prompts[:1], NEW)] == ref_alone
    for p, row in zip(prompts, ours_batch):  # each row gives what it gives alone
        assert engine.generate_batch([p], NEW)[0].token_ids == row


def test_eos_ids_end_rows_and_finished_rows_stop(tmp_path):
    hf_tiny_model(max_position_embeddings=256, num_key_value_heads=2).save_pretrained(tmp_path)
    engine = Engine(load_model(tmp_path), tokenizer=None)
    prompts = random_prompts([6, 9], 256, seed=2)
    full = [r.token_ids for r in engine.generate_batch(prompts, 24)]
    # pick two ids that appear in the free-running rows: each row must end at the first of either
    eos = {full[0][5], full[1][9]}
    rows = engine.generate_batch(prompts, 24, eos_ids=sorted(eos))
    for got, ref in zip(rows, full):
        cut = next(i for i, t in enumerate(ref) if t in eos)
        assert got.token_ids == ref[:cut + 1]
        assert got.stop_reason == "eos"


def test_smollm2_greedy_64_tokens_matches_transformers(default_model_dir):
    from transformers import AutoModelForCausalLM

    from llamazoo.io.tokenizer import load_tokenizer

    tok = load_tokenizer(default_model_dir)
    texts = ["Once upon a time", "The capital of France is", "def fibonacci(n):\n", "Llamas are"]
    prompts = [tok.encode(t) for t in texts]
    assert len(set(map(len, prompts))) > 2
    hf_model = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32).eval()
    eos = tok.eos_token_id
    ref_batch = hf_greedy(hf_model, prompts, NEW, eos, pad=tok.pad_token_id)
    ref_alone = hf_greedy(hf_model, prompts[:1], NEW, eos, pad=tok.pad_token_id)
    del hf_model
    engine = Engine(load_model(default_model_dir), tok)
    batch = engine.generate_batch(prompts, NEW, eos_ids=[eos])
    assert [r.token_ids for r in batch] == ref_batch
    alone = engine.generate_batch(prompts[:1], NEW, eos_ids=[eos])[0]
    assert alone.token_ids == ref_alone[0]
    assert alone.text == tok.decode(ref_alone[0])  # streamed pieces add up to the whole decode
    assert len(alone.token_ids) == NEW and alone.stop_reason == "length"


# -- stop strings and streaming --------------------------------------------------------------------
class FakeTok:
    """A character-level tokenizer: id = ord(char)."""

    pad_token_id = 0

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(i) for i in ids)


def feed(stop: list[str], text: str) -> tuple[str, str, int | None]:
    st = _RowState(FakeTok(), [ord("x")], stop)
    streamed = ""
    for i, ch in enumerate(text):
        piece, hit = st.add_text(st.detok.push(ord(ch)))
        streamed += piece
        if hit:
            return streamed, st.text, i
    return streamed + st.finish(), st.text, None


def test_stop_string_ends_at_the_completing_token_and_is_not_streamed():
    streamed, text, at = feed(["END", "##"], "abc EN xyz ENDING")
    assert (streamed, text, at) == ("abc EN xyz ", "abc EN xyz ", 13)
    # a partial match is held back only while it can still become a stop string
    streamed, text, at = feed(["END"], "abc EN")
    assert (streamed, text, at) == ("abc EN", "abc EN", None)
    streamed, text, at = feed(["##", "END"], "x ## END")
    assert (text, at) == ("x ", 3)


def test_stop_strings_in_engine(tmp_path):
    hf_tiny_model(max_position_embeddings=256).save_pretrained(tmp_path)
    model = load_model(tmp_path)
    tok = FakeTok()
    engine = Engine(model, tok)
    prompt = random_prompts([5], 256, seed=3)
    free = engine.generate_batch(prompt, 30)[0]
    target = tok.decode(free.token_ids[7:9])  # a stop string completed by token 8
    got = engine.generate_batch(prompt, 30, stop=[target])[0]
    first = free.text.find(target)
    end_token = next(i for i in range(30) if target in tok.decode(free.token_ids[:i + 1]))
    assert got.stop_reason == "stop"
    assert got.token_ids == free.token_ids[:end_token + 1]
    assert got.text == free.text[:first]


def test_stream_decoder_multibyte_and_sentencepiece_spaces(default_model_dir, tokenizers):
    from llamazoo.io.tokenizer import load_tokenizer

    # SmolLM2's byte-level BPE, and SentencePiece: "▁" spaces, byte-fallback pieces for 🦙 and —
    text = " Llamas 🦙 live in the Andes — très haut, 日本語 too.\n  Done"
    for tok in (load_tokenizer(default_model_dir), load_tokenizer(tokenizers("sentencepiece"))):
        prompt = tok.encode("Hello")
        ids = tok.encode(text, add_special_tokens=False)
        dec = StreamDecoder(tok, prompt)
        pieces = [dec.push(i) for i in ids] + [dec.flush()]
        assert not any("\ufffd" in p for p in pieces)
        whole = tok.decode(prompt + ids)
        assert tok.decode(prompt) + "".join(pieces) == whole


def test_batch_rows_and_sampling_seeded(tmp_path):
    hf_tiny_model(max_position_embeddings=256).save_pretrained(tmp_path)
    engine = Engine(load_model(tmp_path), tokenizer=None)
    prompts = random_prompts([4, 8, 2], 256, seed=4)
    params = SamplingParams(do_sample=True, temperature=0.9, top_k=40, top_p=0.95)
    a = engine.generate(prompts, 16, batch_size=2, params=params, seed=7)
    b = engine.generate(prompts, 16, batch_size=2, params=params, seed=7)
    c = engine.generate(prompts, 16, batch_size=2, params=params, seed=8)
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    assert [r.token_ids for r in a] != [r.token_ids for r in c]
    assert [r.batch_id for r in a] == [0, 0, 1]
    greedy = engine.generate(prompts, 16, batch_size=3)
    top1 = engine.generate(prompts, 16, batch_size=3, seed=1,
                           params=SamplingParams(do_sample=True, top_k=1, temperature=0.7))
    assert [r.token_ids for r in top1] == [r.token_ids for r in greedy]


@pytest.mark.parametrize("dtype,batch_hint", [(torch.float32, 1), (torch.bfloat16, 1), (torch.float32, 32),
                                              (torch.float32, 128)])
def test_packed_projections_compute_the_same_logits(tmp_path, dtype, batch_hint):
    """Every layout (packed for 1 row, batched decoding, scoring) computes the plain model's logits, for a
    9-token prefill of 2 rows and one-token steps of 1 and 5 rows."""
    from llamazoo.generation.packed import can_pack, pack_for_inference, unpack

    hf_tiny_model(max_position_embeddings=256, num_key_value_heads=2, attention_bias=True).save_pretrained(tmp_path)
    model = load_model(tmp_path, dtype=dtype)
    ids = torch.tensor(random_prompts([9, 9], 256, seed=5))
    names = sorted(model.state_dict())
    # An AVX2-only CPU: oneDNN has no bf16 reorder there, so oneDNN packing declines (not crash) and bf16
    # projections without a bias (gate/up here; q/k/v have one) are fused through llamazoo's C kernel
    avx2_bf16 = dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported()
    if avx2_bf16:
        assert "no oneDNN bfloat16" in can_pack(model)
    steps = [ids[:1, :1], torch.tensor(random_prompts([1] * 5, 256, seed=6))]
    with torch.inference_mode():
        ref = [model(x) for x in (ids, *steps)]
        assert pack_for_inference(model, batch_hint=batch_hint)
        if avx2_bf16:
            from llamazoo.generation.packed import KernelLinear

            layer = model.model.layers[0]
            assert layer.self_attn.fused_qkv is None and isinstance(layer.mlp.fused_gate_up, KernelLinear)
        got = [model(x) for x in (ids, *steps)]
        unpack(model)
        again = [model(x) for x in (ids, *steps)]
    assert sorted(model.state_dict()) == names  # parameters untouched
    for i, (r, g, a) in enumerate(zip(ref, got, again)):
        if dtype == torch.bfloat16:
            assert torch.equal(g, r)
        else:
            torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)
        if i == 0 or dtype == torch.bfloat16:  # the plain weights come back exactly
            assert torch.equal(a, r)
        else:  # (fp32 matrix-vector products may sum in another order: the restored copy's alignment)
            torch.testing.assert_close(a, r, rtol=1e-6, atol=1e-6)


def test_compiled_decode_step_gives_the_same_tokens(tmp_path):
    """compile=true: batch-1 decode runs the compiled layer step (multiply-reduce projections and
    attention) and gives eager's tokens; a longer prompt (new cache length) recompiles and still agrees;
    a batch of 2 takes the eager packed step on CPU."""
    hf_tiny_model(max_position_embeddings=256, num_key_value_heads=2, attention_bias=True).save_pretrained(tmp_path)
    prompts = random_prompts([5, 9, 80], 256, seed=6)
    eager = Engine(load_model(tmp_path), tokenizer=None, pack=False)
    compiled = Engine(load_model(tmp_path), tokenizer=None, compile=True)
    assert compiled.uses_compiled_step(1) and not compiled.uses_compiled_step(2)
    layer_calls = []
    compiled_layer = compiled._compiled_layer
    compiled._compiled_layer = lambda *a: layer_calls.append(1) or compiled_layer(*a)
    for p in prompts:  # 5 and 9 share a 64-slot cache; 80 needs 128 slots
        ref = eager.generate_batch([p], 12)[0].token_ids
        assert compiled.generate_batch([p], 12)[0].token_ids == ref
    assert len(layer_calls) == 3 * 11 * 2  # 11 decode steps x 2 layers per prompt
    ref = [r.token_ids for r in eager.generate_batch(prompts[:2], 10)]
    assert [r.token_ids for r in compiled.generate_batch(prompts[:2], 10)] == ref
    assert len(layer_calls) == 3 * 11 * 2


def test_compile_without_a_working_cxx_compiler_is_one_clear_error(tmp_path, caplog):
    import torch._dynamo
    import torch._inductor.config as inductor_config

    hf_tiny_model(hidden_size=48).save_pretrained(tmp_path)  # a shape no other test compiled
    torch._dynamo.reset()
    try:
        with inductor_config.patch({"cpp.cxx": ("/nonexistent/g++",), "force_disable_caches": True}):
            engine = Engine(load_model(tmp_path), tokenizer=None, compile=True)
            with pytest.raises(RuntimeError, match=r"generation.compile: torch.compile could not build "
                                                   r"the decode step .*C\+\+ compiler.*generation.compile=false"):
                engine.generate_batch([[5, 6, 7]], 4)
            # generation.compile=auto: the run goes on eagerly, with one warning
            torch._dynamo.reset()
            eager = Engine(load_model(tmp_path), tokenizer=None).generate_batch([[5, 6, 7]], 6)[0].token_ids
            fallback = Engine(load_model(tmp_path), tokenizer=None, compile=True, compile_fallback=True)
            with caplog.at_level(logging.WARNING, logger="llamazoo.generate"):
                assert fallback.generate_batch([[5, 6, 7]], 6)[0].token_ids == eager
            assert not fallback.compile and not fallback.uses_compiled_step(1)
            assert [r.getMessage().split(" (")[0] for r in caplog.records if r.name == "llamazoo.generate"] == [
                "generation.compile=auto: torch.compile could not build the decode step"]
    finally:
        torch._dynamo.reset()


def test_reuse_prefix_prefills_only_new_tokens_and_gives_the_same_tokens(tmp_path):
    """Chat turns: the previous exchange is already in the KV cache; only the rest is prefilled."""
    hf_tiny_model(max_position_embeddings=256).save_pretrained(tmp_path)
    fresh = Engine(load_model(tmp_path), tokenizer=None)
    chat = Engine(load_model(tmp_path), tokenizer=None)
    prefill_lengths = []
    step = chat._eager_step
    chat._eager_step = lambda ids, *a: prefill_lengths.append(ids.shape[1]) or step(ids, *a)

    turn1 = random_prompts([20], 256, seed=3)[0]
    r1 = chat.generate_batch([turn1], 10, reuse_prefix=True)[0]
    assert r1.token_ids == fresh.generate_batch([turn1], 10)[0].token_ids
    assert prefill_lengths[0] == 20
    turn2 = turn1 + r1.token_ids + [7, 8, 9]
    prefill_lengths.clear()
    r2 = chat.generate_batch([turn2], 10, reuse_prefix=True)[0]
    assert prefill_lengths[0] == 4  # the answer's last token (never fed back) and the 3 new ones
    assert r2.token_ids == fresh.generate_batch([turn2], 10)[0].token_ids
    turn3 = turn2 + r2.token_ids + list(range(20, 60))  # needs a bigger cache: the prefix is copied over
    prefill_lengths.clear()
    assert chat.generate_batch([turn3], 10, reuse_prefix=True)[0].token_ids == \
        fresh.generate_batch([turn3], 10)[0].token_ids
    assert prefill_lengths[0] == 41 and chat.model.cache_len == 128
    turn3 = turn1[:5] + [11, 12]  # diverges after 5 tokens: only those are reused
    prefill_lengths.clear()
    assert chat.generate_batch([turn3], 6, reuse_prefix=True)[0].token_ids == \
        fresh.generate_batch([turn3], 6)[0].token_ids
    assert prefill_lengths[0] == 2
    prefill_lengths.clear()
    chat.generate_batch([turn3], 6)  # without reuse_prefix: the whole prompt
    assert prefill_lengths[0] == 7


def test_a_tied_head_packed_copy_keeps_the_embedding(tmp_path):
    """`llamazoo serve` packs a copy of a tied LM head (batched decoding): same logits, the embedding
    stays the plain tensor lookups read, state_dict and unpack unchanged."""
    from llamazoo.generation.packed import BATCHED_HINT, pack_for_inference, unpack

    hf_tiny_model(max_position_embeddings=256, tie_word_embeddings=True).save_pretrained(tmp_path)
    model = load_model(tmp_path)
    emb = model.model.embed_tokens.weight
    assert model.lm_head.weight is emb
    ids = torch.tensor(random_prompts([9, 9], 256, seed=7))
    steps = torch.tensor(random_prompts([1] * 5, 256, seed=8))
    with torch.inference_mode():
        ref = [model(ids), model(steps)]
        assert pack_for_inference(model, batch_hint=BATCHED_HINT, tied_head_copy=True)
        assert model.lm_head.__dict__.get("packed") is not None
        assert model.model.embed_tokens.weight is emb and emb.data_ptr() == model.lm_head.weight.data_ptr()
        got = [model(ids), model(steps)]
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)
    sd = model.state_dict()  # unpacks
    assert "packed" not in model.lm_head.__dict__ and torch.equal(sd["model.embed_tokens.weight"], emb)
    unpack(model)


def test_a_plain_fp32_head_takes_the_weight_first_product_for_several_rows(tmp_path, monkeypatch):
    """The engine's LM head, plain fp32 on CPU (an engine without packing or llamazoo's kernels), computes
    (W x^T)^T from two rows on: the same logits as F.linear within fp32 rounding, and the same greedy tokens;
    one row keeps F.linear."""
    from llamazoo.model import llama as llama_module
    from llamazoo.model.llama import fp32_linear_weight_first

    hf_tiny_model(max_position_embeddings=256, tie_word_embeddings=True).save_pretrained(tmp_path)
    eng = Engine(load_model(tmp_path), tokenizer=None, pack=False)
    assert "packed" not in eng.model.lm_head.__dict__
    calls = []
    monkeypatch.setattr(llama_module, "fp32_linear_weight_first",
                        lambda *a: calls.append(a[0].shape) or fp32_linear_weight_first(*a))
    h = torch.randn(3, 4, eng.model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        got = eng._logits(h)
        one = eng._logits(h[:1])
    want = torch.nn.functional.linear(h[:, -1], eng.model.lm_head.weight)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        want_one = torch.nn.functional.linear(h[:1, -1], eng.model.lm_head.weight)
    assert calls == [(3, eng.model.config.hidden_size)] and torch.equal(one, want_one)
    prompts = random_prompts([5, 9], 256, seed=3)
    batched = [r.token_ids for r in eng.generate_batch(prompts, 8)]
    assert batched == [eng.generate_batch([p], 8)[0].token_ids for p in prompts]


def test_auto_compile_decides_by_batch_tokens_layer_size_dtype_and_compiler(tmp_path, monkeypatch):
    import torch._inductor.config as inductor_config

    import llamazoo.generation.engine as engine_module
    from llamazoo.generation.engine import auto_compile
    from llamazoo.model.quantize import quantize_model

    hf_tiny_model().save_pretrained(tmp_path)
    model = load_model(tmp_path)
    if engine_module.cpu_kernels.available():  # the decode stack runs it: faster than any compiled step
        assert auto_compile(model, 1, 10_000) == (False, "llamazoo's decode-stack kernel (every layer of a step "
                                                  "in one call) is faster than a compiled step")
    monkeypatch.setattr(engine_module, "decode_stack_fits", lambda model: False)  # as without llamazoo's kernels
    assert auto_compile(model, 1, 300) == (True, "batch 1, 300 tokens to decode")
    assert auto_compile(model, 1, 255) == (False, "255 tokens to decode, under 256: a compile would not pay")
    assert auto_compile(model, 2, 10_000) == (False, "batch > 1: the packed GEMMs of the eager step are faster")
    with inductor_config.patch({"cpp.cxx": ("/nonexistent/g++",)}):
        assert auto_compile(model, 1, 10_000) == (False, "no C++ compiler found (torch.compile needs one on CPU)")
    monkeypatch.setattr(engine_module, "AUTO_COMPILE_MAX_LAYER_BYTES", 1024)  # these layers count as large now
    on, why = auto_compile(model, 1, 10_000)
    assert not on and why.endswith("MB per layer: the eager kernels already read them at memory speed")
    # bf16 large layers: eager where oneDNN or llamazoo's CPU kernels read them at memory speed; on a CPU
    # without bf16 GEMM kernels and without llamazoo's, compiled whatever the layer size
    bf16 = load_model(tmp_path, dtype=torch.bfloat16)
    native = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert auto_compile(bf16, 1, 10_000)[0] == (not native and not engine_module.cpu_kernels.available())
    monkeypatch.setattr(engine_module.cpu_kernels, "available", lambda: False)
    assert auto_compile(bf16, 1, 10_000)[0] == (not native)
    quantize_model(model, "int8")
    assert auto_compile(model, 1, 10_000) == (False, "quantized or adapter layers: not measured")


def test_compiled_engines_grow_the_cache_in_powers_of_two(tmp_path):
    """The compiled step is specialized to the cache length: a growing conversation gets few lengths
    (each compiled once), not one per turn; eager steps read only the slots in use, so they round to 64."""
    hf_tiny_model(max_position_embeddings=1000).save_pretrained(tmp_path)
    compiled = Engine(load_model(tmp_path), tokenizer=None, compile=True)
    assert [compiled._ensure_cache(1, n) for n in (20, 100, 150, 200, 300, 999)] == [64, 128, 256, 256, 512, 1000]
    eager = Engine(load_model(tmp_path), tokenizer=None)
    assert [eager._ensure_cache(1, n) for n in (20, 100, 150, 200)] == [64, 128, 192, 256]


def test_auto_compiled_engine_with_a_tied_head_gives_eager_tokens(tmp_path, monkeypatch):
    """generation.compile=auto's engine (compiled, weights not packed) on a tied LM head, as SmolLM2 has:
    the compiled head reads the embedding matrix; the tokens are eager's. (auto compiles where llamazoo's
    decode stack cannot run: as here, made so.)"""
    import llamazoo.generation.engine as engine_module
    from llamazoo.generation.app import compile_settings

    monkeypatch.setattr(engine_module, "decode_stack_fits", lambda model: False)

    hf_tiny_model(max_position_embeddings=256, tie_word_embeddings=True).save_pretrained(tmp_path)
    model = load_model(tmp_path)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    kwargs, why = compile_settings("auto", model, 1, 300)
    assert kwargs == {"compile": True, "pack": False, "compile_fallback": True} and why.startswith("auto: compiled")
    auto = Engine(model, tokenizer=None, **kwargs)
    assert not auto.packed and auto.uses_compiled_step(1)
    eager = Engine(load_model(tmp_path), tokenizer=None)
    for p in random_prompts([7, 40], 256, seed=3):
        assert auto.generate_batch([p], 16)[0].token_ids == eager.generate_batch([p], 16)[0].token_ids
    assert auto.compile  # it really ran compiled (no fallback)


def test_bf16_rmsnorm_gives_a_row_the_same_numbers_in_any_batch():
    """RMSNorm in bf16 (fp32_ln=false, the default knobs): a row's output does not depend on the rows beside
    it (torch's bf16 mean and rsqrt kernels follow the tensor's shape), and it is at least as close to the
    exact norm as the plain bf16 ops are."""
    from llamazoo.model.llama import RMSNorm

    torch.manual_seed(0)
    norm = RMSNorm(576, 1e-5, fp32=False).bfloat16()
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(3, 19, 576).bfloat16()
    alone = norm(x[:1, :16])
    assert torch.equal(norm(x)[:1, :16], alone)
    assert torch.equal(norm(x[:, :1])[:1], alone[:, :1])  # one decode token among three
    h = x[:1, :16]
    plain = norm.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5))
    exact = norm.weight.double() * h.double() / torch.sqrt(h.double().pow(2).mean(-1, keepdim=True) + 1e-5)
    err = [((y.double() - exact).abs() / exact.abs()) for y in (alone, plain)]
    assert err[0].max() <= 2 ** -6 and err[0].mean() <= err[1].mean()
