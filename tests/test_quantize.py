"""Weight-only int8 / int4 for generation: the layers against their dequantized weights, whole models,
quantized folders (convert --quantize, model.quantize) and GGUF Q8_0 / Q4_0 / Q4_1 kept as they are."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from conftest import hf_tiny_model
from llamazoo.io.hf import load_model
from llamazoo.model.quantize import (WeightOnlyLinear, dequantize, quantize_int4, quantize_model,
                                     unpack_nibbles)

# sizes the int4 kernel takes (out % 16, in % 32); intermediate 128 so that group sizes divide it
TINY_Q = dict(intermediate_size=128, max_position_embeddings=128)


def q8_activations(x: torch.Tensor) -> torch.Tensor:
    """x as llamazoo's int4 kernel sees it: int8 per 32 inputs (d = absmax / 127, codes rounded to even),
    the same fp32 operations as cpu_linear.c, returned as d * codes in fp64."""
    b = x.float().reshape(*x.shape[:-1], -1, 32)
    d = b.abs().amax(-1, keepdim=True) / 127
    inv = torch.where(d != 0, 1 / d, torch.zeros_like(d))
    return ((b * inv).round().double() * d.double()).reshape(x.shape)


def reference(layer: WeightOnlyLinear, x: torch.Tensor) -> torch.Tensor:
    """What the kernels compute: the activations (bf16 for torch's kernels, int8 blocks for lz4) times the
    dequantized weight (fp64 here)."""
    xin = x.to(torch.bfloat16).double() if layer.kernel in ("int8", "int4", "int8x2") else x.double()
    if layer.kernel == "lz4":
        xin = q8_activations(x)
    y = xin @ layer.dequantize(torch.float32).double().t()
    return y + layer.bias.double() if layer.bias is not None else y


# (bits, group, out, in) -> the kernel with llamazoo's CPU kernels, and with torch's alone
@pytest.mark.parametrize("bits,group,out_f,in_f,lz_kernel,torch_kernel", [
    (8, None, 192, 576, "lz8", "int8"),    # per channel: llamazoo's / _weight_int8pack_mm
    (4, 32, 192, 576, "lz4", "int4"),      # llamazoo's / _weight_int4pack_mm_for_cpu
    (4, 64, 1536, 576, "lz4", "int4"),
    (4, 128, 80, 256, "lz4", "int4"),      # torch's: a tail of 16 rows after the 64-row blocks
    (8, 32, 72, 96, "lz8", "int8x2"),      # grouped int8 (GGUF Q8_0); torch's: as two int4 halves
    (8, 32, 70, 96, "lz8", None),          # 70 rows: a tail of 2 after llamazoo's blocks of 4
    (4, 32, 40, 64, "lz4", None),          # 40 rows: torch's kernel wants a multiple of 16 (dequantized per call)
    (4, 32, 70, 64, "lz4", None),          # a tail of 2 rows after llamazoo's blocks of 4
    (8, None, 24, 20, None, None),         # 20 inputs: the int8 kernels need a multiple of 8
])
@pytest.mark.parametrize("kernels", ["llamazoo", "torch"])
def test_linear_equals_its_dequantized_weight(bits, group, out_f, in_f, lz_kernel, torch_kernel, kernels, request):
    if kernels == "torch":
        request.getfixturevalue("without_cpu_kernels")
    kernel = lz_kernel if kernels == "llamazoo" else torch_kernel
    torch.manual_seed(0)
    lin = nn.Linear(in_f, out_f, bias=True)
    layer = WeightOnlyLinear.from_linear(lin, bits, group)
    if bits == 8 and group:  # grouped scales (what a GGUF Q8_0 block holds)
        layer.weight_scale = torch.rand(out_f, in_f // group, dtype=torch.bfloat16) * 0.01
    stored = {k: v.clone() for k, v in layer.stored().items()}
    w = dequantize(stored)
    # the quantizer: every weight within half a step of its group's scale (+ the bf16 rounding of the zero)
    if not (bits == 8 and group):
        step = stored["weight_scale"].float().repeat_interleave(layer.group_size, 1)
        assert ((w - lin.weight).abs() <= 0.5 * step + 1e-2 * lin.weight.abs().max() * (bits == 4) + 1e-7).all()
    layer.prepare()
    assert layer.kernel == kernel
    assert layer.weight.shape == (out_f, in_f) and layer.weight.dtype == torch.float32
    after = layer.state_dict()  # the stored format back from the kernel layout, exactly
    assert set(after) == set(stored) | {"bias"} and all(torch.equal(after[k], stored[k]) for k in stored)
    for x in (torch.randn(1, 1, in_f), torch.randn(3, 5, in_f)):  # decode and prefill shapes
        y = layer(x)
        ref = reference(layer, x)
        assert y.shape == (*x.shape[:-1], out_f) and y.dtype == x.dtype
        if kernel in (None, "lz8", "lz4"):  # fp32 sums (lz4: exact integer block sums): only the order differs
            torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
        else:  # bf16 arithmetic in torch's kernels: errors at bf16's resolution (2^-8) of the results' magnitude
            torch.testing.assert_close(y.double(), ref, rtol=2 ** -8, atol=2 ** -8 * ref.abs().max().item())
    if kernel in ("lz8", "lz4"):  # a row gives the same numbers alone and within a batch
        x = torch.randn(7, in_f)
        assert torch.equal(layer(x[3:4]), layer(x)[3:4])


def test_int4_quantizer_rounds_against_the_bf16_scale():
    w = torch.randn(32, 64)
    packed, scale, zero = quantize_int4(w, 32)
    assert packed.dtype == torch.uint8 and scale.dtype == zero.dtype == torch.bfloat16
    codes = unpack_nibbles(packed).float().view(32, 2, 32)
    best = ((w.view(32, 2, 32) - zero.float()[..., None]) / scale.float()[..., None] + 8).round().clamp(0, 15)
    assert torch.equal(codes, best)
    assert codes.amin() == 0 and codes.amax() == 15  # each group's range is used


def dequantized_twin(model, quantized) -> None:
    """Gives `model` (a float copy) the weights `quantized`'s layers compute with."""
    with torch.no_grad():
        for name, m in quantized.named_modules():
            if isinstance(m, WeightOnlyLinear):
                model.get_submodule(name).weight.copy_(m.dequantize(torch.float32))


@pytest.mark.parametrize("kind,tie", [("int8", False), ("int4", False), ("int4", True)])
def test_quantized_model_logits_equal_the_dequantized_model(tmp_path, kind, tie):
    from llamazoo.model.quantize import TiedQuantizedEmbedding

    hf_tiny_model(**TINY_Q, tie_word_embeddings=tie).save_pretrained(tmp_path)
    model, twin = load_model(tmp_path), load_model(tmp_path)
    assert quantize_model(model, kind, 32) == 2 * 7 + 1
    assert isinstance(model.lm_head, WeightOnlyLinear) and model.lm_head.bits == 8  # int8 head in both
    # a tied head is int8 once: the embedding looks its rows up
    assert isinstance(model.model.embed_tokens, TiedQuantizedEmbedding) == tie
    assert ("model.embed_tokens.weight" in model.state_dict()) != tie
    assert {m.bits for m in model.modules() if isinstance(m, WeightOnlyLinear)} == {8, int(kind[3:])}
    dequantized_twin(twin, model)
    ids = torch.randint(3, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        got, ref = model(ids), twin(ids)
    # the quantized layers take bf16 activations: differences of that order, nothing of the weights' error
    torch.testing.assert_close(got, ref, rtol=0.02, atol=0.02 * ref.abs().max().item())
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.95
    with torch.inference_mode():  # against the float model itself, the quantization error shows
        float_logits = load_model(tmp_path)(ids)
    assert (float_logits - ref).abs().max() > (got - ref).abs().max()
    # the engine fuses q/k/v and gate/up into one kernel call each: the same numbers, the same tensors
    from llamazoo.generation.packed import pack_for_inference
    from llamazoo.model.quantize import FusedWeightOnly

    sd = {k: v.clone() for k, v in model.state_dict().items()}
    assert pack_for_inference(model)
    assert isinstance(model.model.layers[0].self_attn.fused_qkv, FusedWeightOnly)
    with torch.inference_mode():
        assert torch.equal(model(ids), got)
    after = model.state_dict()
    assert all(torch.equal(after[k], sd[k]) for k in sd)
    q = model.model.layers[1].mlp.up_proj.weight_q
    fused = model.model.layers[1].mlp.fused_gate_up
    assert q.untyped_storage().data_ptr() == fused.codes.untyped_storage().data_ptr()
    # unpacked and packed again (another engine): the fused tensors are taken as they are, not copied again
    from llamazoo.generation.packed import unpack

    unpack(model)
    assert pack_for_inference(model)
    again = model.model.layers[1].mlp.fused_gate_up
    assert again is not fused and again.codes.data_ptr() == fused.codes.data_ptr()
    assert again.scale.data_ptr() == fused.scale.data_ptr() and torch.equal(again.codes, fused.codes)
    with torch.inference_mode():
        assert torch.equal(model(ids), got)


@pytest.mark.parametrize("tie", [False, True])
def test_convert_quantize_round_trip_and_model_quantize(tmp_path, tokenizers, tie):
    import shutil

    from safetensors import safe_open

    from llamazoo.cli import main
    from llamazoo.config import GenerateConfig, load_config
    from llamazoo.generation.app import load
    from llamazoo.generation.engine import Engine

    src = tmp_path / "float"
    hf_tiny_model(**TINY_Q, tie_word_embeddings=tie).save_pretrained(src)
    for f in tokenizers("gpt2").iterdir():  # a tokenizer, for the generation app
        if f.name.startswith(("tokenizer", "vocab", "merges", "special")):
            shutil.copy(f, src / f.name)
    prompts = [[5, 9, 17, 33], [40, 41]]
    for kind in ("int8", "int4"):
        out = tmp_path / kind
        assert main(["convert", "--from-hf", str(src), "--output", str(out), "--quantize", kind,
                     "--group-size", "64"]) == 0
        cfg = json.loads((out / "config.json").read_text())["quantization_config"]
        assert cfg["quant_method"] == "llamazoo"
        assert cfg["layers"] == ({"int8 per channel": 15} if kind == "int8" else
                                 {"int4 group 64": 14, "int8 per channel": 1})
        with safe_open(str(out / "model.safetensors"), "pt") as f:
            names = set(f.keys())
            q = f.get_tensor("model.layers.0.mlp.down_proj.weight_q")
        assert "model.layers.0.mlp.down_proj.weight" not in names and "lm_head.weight_q" in names
        assert ("model.embed_tokens.weight" in names) != tie  # a tied head serves as the embedding
        assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float32"
        assert q.dtype == (torch.int8 if kind == "int8" else torch.uint8)
        loaded = load_model(out)
        layer = loaded.model.layers[0].mlp.down_proj
        assert isinstance(layer, WeightOnlyLinear) and layer.kernel == ("lz8" if kind == "int8" else "lz4")
        # the same layers as quantizing the float model in memory: the same tokens
        mem = load_model(src)
        quantize_model(mem, kind, 64)
        a = [r.token_ids for r in Engine(loaded, None).generate_batch(prompts, 12)]
        b = [r.token_ids for r in Engine(mem, None).generate_batch(prompts, 12)]
        assert a == b
        # model.quantize through the generation app gives that model too
        gen = load(load_config(GenerateConfig, overrides=[f"checkpoint.model_name_or_path={src}",
                                                          f"model.quantize={kind}", "model.quantize_group_size=64"]))
        assert [r.token_ids for r in Engine(gen.model, None).generate_batch(prompts, 12)] == a
        # saving a loaded quantized model writes the same tensors again
        assert main(["convert", "--from-hf", str(out), "--output", str(tmp_path / f"{kind}-again")]) == 0
        with safe_open(str(out / "model.safetensors"), "pt") as f1, \
                safe_open(str(tmp_path / f"{kind}-again" / "model.safetensors"), "pt") as f2:
            assert set(f1.keys()) == set(f2.keys())
            assert all(torch.equal(f1.get_tensor(k), f2.get_tensor(k)) for k in f1.keys())


def test_quantize_errors_are_one_clear_line(tmp_path, capsys):
    from llamazoo.cli import main
    from llamazoo.config import GenerateConfig, load_config

    hf_tiny_model(**TINY_Q).save_pretrained(tmp_path / "f")
    assert main(["convert", "--from-hf", str(tmp_path / "f"), "-o", str(tmp_path / "o"), "--quantize", "keep"]) == 1
    assert "--quantize keep keeps a GGUF file's quantized matrices" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"model.quantize_group_size: got 48, allowed: 32, 64, 128 or 256"):
        load_config(GenerateConfig, overrides=["model.quantize_group_size=48"])
    model = load_model(tmp_path / "f")
    with pytest.raises(ValueError, match=r"model.quantize_group_size=128 does not divide "
                                         r"model.layers.0.self_attn.q_proj's 64 inputs; 32 or 64 does"):
        quantize_model(model, "int4", 128)
    quantize_model(model, "int4", 32)
    with pytest.raises(ValueError, match=r"model.quantize=int8: the checkpoint's layers are int4 already"):
        quantize_model(model, "int8")


# -- GGUF ------------------------------------------------------------------------------------------------
def permute_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's converter's q/k row order (the inverse of llamazoo.io.gguf.unpermute_rope)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1"])
def test_gguf_blocks_equal_gguf_dequantize(qtype):
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize as gguf_dequantize, quantize as gguf_quantize

    from llamazoo.io.quantized import gguf_block_tensors

    t = GGMLQuantizationType[qtype]
    w = np.random.default_rng(0).standard_normal((48, 96)).astype(np.float32)
    data = gguf_quantize(w, t)
    want = torch.from_numpy(gguf_dequantize(data, t).reshape(48, 96))
    stored = gguf_block_tensors(data, qtype, 48, 96)
    assert stored["weight_q"].dtype == (torch.int8 if qtype == "Q8_0" else torch.uint8)
    got = dequantize(stored)
    if qtype == "Q4_1":  # kept as (q - 8) * d + (m + 8 d): the same number up to fp32 rounding
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    else:
        assert torch.equal(got, want)


class _FakeTensor:
    def __init__(self, name, qtype, array):
        from gguf import GGMLQuantizationType
        from gguf.quants import quantize as gguf_quantize

        self.name, self.tensor_type = name, GGMLQuantizationType[qtype]
        self.shape = list(reversed(array.shape))  # GGUF lists dimensions innermost first
        self.data = gguf_quantize(array, self.tensor_type) if qtype != "F32" else array


def test_gguf_import_keeps_q8_0_q4_0_q4_1_layers(tmp_path):
    """gguf_state_dict(keep_quantized=True) on llama.cpp-ordered tensors: projections and the LM head stay
    quantized (q/k rows back in HF's order), equal to the float import; the folder loads and runs."""
    from gguf.quants import dequantize as gguf_dequantize

    from llamazoo.io.gguf import gguf_state_dict
    from llamazoo.io.hf import save_state_dict_folder
    from llamazoo.io.quantized import folder_quantization_config

    hf = hf_tiny_model(**TINY_Q, num_key_value_heads=2, tie_word_embeddings=False)
    cfg = load_model_config(hf)
    kinds = ["Q8_0", "Q4_0", "Q4_1"]
    tensors = {}
    for i, (name, p) in enumerate(hf.state_dict().items()):
        w = p.float().numpy()
        if name.endswith("q_proj.weight"):
            w = permute_rope(w, cfg.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            w = permute_rope(w, cfg.num_key_value_heads)
        tensors[name] = _FakeTensor(gguf_name(name), "F32" if w.ndim == 1 else kinds[i % 3], np.ascontiguousarray(w))
    reader = type("Reader", (), {"tensors": list(tensors.values())})()
    kept = gguf_state_dict(reader, cfg, torch.float32, keep_quantized=True)
    full = gguf_state_dict(reader, cfg, torch.float32)
    for layer, t in tensors.items():
        if t.data.dtype == np.uint8 and layer != "model.embed_tokens.weight":
            prefix = layer[:-len(".weight")]
            stored = {k.rpartition(".")[2]: v for k, v in kept.items() if k.startswith(prefix + ".weight_")}
            assert set(stored) == ({"weight_q", "weight_scale"} if t.tensor_type.name == "Q8_0"
                                   else {"weight_q", "weight_scale", "weight_zero"}), t.name
            torch.testing.assert_close(dequantize(stored), full[layer], rtol=1e-6, atol=1e-6)
            if not layer.endswith(("q_proj.weight", "k_proj.weight")):
                raw = gguf_dequantize(t.data, t.tensor_type).reshape(full[layer].shape)
                torch.testing.assert_close(full[layer], torch.from_numpy(raw))
    assert "model.embed_tokens.weight" in kept  # embeddings are looked up: dequantized
    cfg.quantization_config = folder_quantization_config(kept)
    assert sum(cfg.quantization_config["layers"].values()) == 2 * 7 + 1
    save_state_dict_folder(kept, cfg, tmp_path / "kept")
    save_state_dict_folder(full, cfg, tmp_path / "full")
    ids = torch.randint(3, 256, (1, 20), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        got, ref = load_model(tmp_path / "kept")(ids), load_model(tmp_path / "full")(ids)
    torch.testing.assert_close(got, ref, rtol=0.02, atol=0.02 * ref.abs().max().item())


def load_model_config(hf):
    from llamazoo.model.llama import LlamaConfig

    return LlamaConfig.from_hf(hf.config.to_dict())


GGUF_TOP = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
GGUF_LAYER = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def gguf_name(hf_name: str) -> str:
    base, _, suffix = hf_name.rpartition(".")
    parts = base.split(".")
    if parts[:2] == ["model", "layers"]:
        return f"blk.{parts[2]}.{GGUF_LAYER['.'.join(parts[3:])]}.{suffix}"
    return f"{GGUF_TOP[base]}.{suffix}"
