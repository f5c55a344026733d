"""LoRA and quantized layers in the model: NF4/int8 storage and arithmetic, LoRA layers (merge, targets),
PEFT adapter folders (round trip, clear errors), packing and generation with adapters, `llamazoo merge`."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import hf_tiny_model
from llamazoo.cli import main as cli_main
from llamazoo.io.adapter import load_adapter, peft_tensors, read_adapter, save_adapter
from llamazoo.io.hf import load_model
from llamazoo.model.lora import (LoRALinear, LoRASpec, adapter_parameter_names, apply_lora, lora_layers,
                                 merge_lora)
from llamazoo.model.quant import NF4_LEVELS, QuantizedLinear, nf4_dequantize, nf4_quantize

pytestmark = pytest.mark.usefixtures("one_thread")


# -- quantization -------------------------------------------------------------------------------------------
def test_nf4_stores_each_weight_as_its_nearest_level_of_its_block_absmax():
    torch.manual_seed(0)
    w = torch.randn(96, 200)  # 19200 weights: 300 blocks of 64, not a multiple of 256 blocks
    q = nf4_quantize(w)
    assert q["codes"].dtype == torch.uint8 and q["codes"].numel() == w.numel() // 2
    assert q["absmax_q"].dtype == torch.int8 and q["absmax_q"].numel() == 300
    assert q["absmax_scale"].numel() == 2  # 300 block scales in blocks of 256
    blocks = w.flatten().view(-1, 64)
    absmax = blocks.abs().amax(1)
    levels = torch.tensor(NF4_LEVELS)
    nearest = levels[(blocks / absmax[:, None])[..., None].sub(levels).abs().argmin(-1)]
    deq_absmax = q["absmax_q"].float() * q["absmax_scale"].repeat_interleave(256)[:300] + q["absmax_mean"]
    assert (deq_absmax - absmax).abs().max() <= (absmax.max() - absmax.min()) / 254 + 1e-6  # 8-bit absmax
    expected = (nearest * deq_absmax[:, None]).view(w.shape)
    assert torch.equal(nf4_dequantize(q, w.shape, torch.float32), expected)
    # a weight that is exactly levels x a block scale comes back exactly (up to the 8-bit absmax)
    exact = (levels.repeat(4)[torch.randperm(64)] * 0.37).repeat(64, 1)
    assert torch.allclose(nf4_dequantize(nf4_quantize(exact), exact.shape, torch.float32), exact, atol=1e-6)


@pytest.mark.parametrize("kind,max_ratio", [("nf4", 0.3), ("int8", 0.55)])
def test_quantized_linear_bytes_forward_and_backward(kind, max_ratio):
    torch.manual_seed(1)
    lin = nn.Linear(576, 192, bias=True).to(torch.bfloat16)
    q = QuantizedLinear(lin, kind)
    assert q.quantized_bytes() <= max_ratio * lin.weight.numel() * 2
    assert not any(p.requires_grad for p in q.parameters())
    err = (q.weight.float() - lin.weight.float()).abs().mean() / lin.weight.float().abs().mean()
    assert err < (0.12 if kind == "nf4" else 0.01)
    x = torch.randn(3, 5, 576, dtype=torch.bfloat16, requires_grad=True)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = q(x)
    assert not any(t.numel() == lin.weight.numel() for t in saved)  # the dequantized weight is not kept
    w = q.dequantize(torch.bfloat16)
    assert torch.equal(y, F.linear(x, w, lin.bias))
    g = torch.randn_like(y)
    y.backward(g)
    assert torch.equal(x.grad, g @ w)


# -- LoRA layers --------------------------------------------------------------------------------------------
def tiny_llamazoo(tmp_path, **overrides):
    hf_tiny_model(**overrides).save_pretrained(tmp_path / "base")
    return tmp_path / "base"


def test_apply_lora_freezes_the_base_and_adds_peft_named_adapters(tmp_path):
    model = load_model(tiny_llamazoo(tmp_path, num_key_value_heads=2))
    names = apply_lora(model, LoRASpec(rank=4, alpha=8, target_modules=("q_proj", "v_proj", "down_proj")))
    assert names == [f"model.layers.{i}.{m}" for i in range(2) for m in ("self_attn.q_proj", "self_attn.v_proj",
                                                                        "mlp.down_proj")]
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trained == adapter_parameter_names(model)
    assert trained[:2] == ["model.layers.0.self_attn.q_proj.lora_A.weight",
                           "model.layers.0.self_attn.q_proj.lora_B.weight"]
    q = model.model.layers[0].self_attn.q_proj
    assert q.lora_A.weight.shape == (4, 64) and q.lora_B.weight.shape == (64, 4) and q.scaling == 2.0
    assert not q.lora_B.weight.any()  # PEFT's init: the adapter starts as a no-op
    ids = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        before = model(ids)
        for m in lora_layers(model).values():
            m.lora_B.weight.normal_()
        unmerged = model(ids)
        assert not torch.allclose(before, unmerged)
        for m in lora_layers(model).values():
            m.merge()
        assert torch.allclose(model(ids), unmerged, atol=1e-5)
        for m in lora_layers(model).values():
            m.unmerge()
        assert torch.allclose(model(ids), unmerged, atol=1e-5)
        assert merge_lora(model) == 6 and not lora_layers(model)
        assert type(model.model.layers[0].self_attn.q_proj) is nn.Linear
        assert torch.allclose(model(ids), unmerged, atol=1e-5)


def test_lora_targets_outside_the_decoder_projections_are_one_clear_error(tmp_path):
    model = load_model(tiny_llamazoo(tmp_path))
    with pytest.raises(ValueError, match=r"target_modules: 'lm_head' is not a linear projection of a decoder "
                                         r"layer; llamazoo's LoRA adapts q_proj, k_proj"):
        apply_lora(model, LoRASpec(rank=2, alpha=2, target_modules=("q_proj", "lm_head")))
    with pytest.raises(ValueError, match=r"target_modules: \('qkv',\) matches no module of the model"):
        apply_lora(model, LoRASpec(rank=2, alpha=2, target_modules=("qkv",)))


def test_qlora_quantizes_every_projection_and_adapts_the_targets(tmp_path):
    model = load_model(tiny_llamazoo(tmp_path))
    apply_lora(model, LoRASpec(rank=2, alpha=4, target_modules=("q_proj",)), quantization="nf4")
    layer = model.model.layers[0]
    assert isinstance(layer.self_attn.q_proj, LoRALinear) and isinstance(layer.self_attn.q_proj.base_layer,
                                                                          QuantizedLinear)
    assert all(isinstance(m, QuantizedLinear) for m in (layer.self_attn.k_proj, layer.mlp.down_proj))
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight.dtype == torch.float32
    with pytest.raises(ValueError, match="cannot merge a LoRA adapter into a nf4-quantized weight"):
        layer.self_attn.q_proj.merge()


# -- adapter folders ----------------------------------------------------------------------------------------
def trained_like_adapter(model: nn.Module) -> None:
    with torch.no_grad():
        for m in lora_layers(model).values():
            m.lora_B.weight.normal_(0, 0.05)


def test_adapter_folder_round_trip_and_peft_format(tmp_path):
    base = tiny_llamazoo(tmp_path)
    model = load_model(base)
    spec = LoRASpec(rank=4, alpha=16, target_modules=("q_proj", "k_proj", "up_proj"), use_rslora=True)
    apply_lora(model, spec)
    trained_like_adapter(model)
    folder = save_adapter(peft_tensors((n, p) for n, p in model.named_parameters() if p.requires_grad), spec,
                          tmp_path / "adapter", base_model=str(base))
    cfg = json.loads((folder / "adapter_config.json").read_text())
    assert (cfg["peft_type"], cfg["r"], cfg["lora_alpha"], cfg["use_rslora"], cfg["target_modules"],
            cfg["base_model_name_or_path"]) == ("LORA", 4, 16, True, ["k_proj", "q_proj", "up_proj"], str(base))
    spec2, tensors = read_adapter(folder)
    assert spec2.scaling == 8.0 and sorted(tensors) == sorted(adapter_parameter_names(model))
    again = load_model(base)
    load_adapter(again, folder)
    ids = torch.randint(0, 256, (1, 7))
    with torch.no_grad():
        assert torch.equal(again(ids), model(ids))


def test_unsupported_or_damaged_adapters_are_one_clear_error(tmp_path):
    base = tiny_llamazoo(tmp_path)
    model = load_model(base)
    spec = LoRASpec(rank=2, alpha=4, target_modules=("q_proj",))
    apply_lora(model, spec)
    good = save_adapter(peft_tensors((n, p) for n, p in model.named_parameters() if p.requires_grad), spec,
                        tmp_path / "good")
    cfg = json.loads((good / "adapter_config.json").read_text())

    def variant(name: str, **changes) -> str:
        d = tmp_path / name
        shutil.copytree(good, d)
        (d / "adapter_config.json").write_text(json.dumps({**cfg, **changes}))
        return str(d)

    with pytest.raises(ValueError, match=r"adapter_config.json: use_dora=True is not supported by llamazoo's LoRA"):
        read_adapter(variant("dora", use_dora=True))
    with pytest.raises(ValueError, match=r"peft_type is 'IA3'; llamazoo reads LoRA adapters"):
        read_adapter(variant("ia3", peft_type="IA3"))
    with pytest.raises(FileNotFoundError, match=r"nowhere: no such folder; expected a PEFT LoRA adapter folder"):
        read_adapter(tmp_path / "nowhere")
    with pytest.raises(ValueError, match=r"other_targets: adapter tensor 'base_model.model.model.layers.0.self_attn."
                                         r"q_proj.lora_A.weight' belongs to no module that target_modules selects"):
        load_adapter(load_model(base), variant("other_targets", target_modules=["o_proj"]))
    with pytest.raises(ValueError, match=r"has shape \(2, 64\), expected \(3, 64\) \(r and the base model's sizes\)"):
        load_adapter(load_model(base), variant("other_rank", r=3))
    (tmp_path / "cut").mkdir()
    shutil.copy(good / "adapter_config.json", tmp_path / "cut")
    (tmp_path / "cut" / "adapter_model.safetensors").write_bytes((good / "adapter_model.safetensors").read_bytes()[:50])
    with pytest.raises(ValueError, match=r"cut/adapter_model.safetensors: damaged or truncated safetensors file"):
        read_adapter(tmp_path / "cut")


# -- inference with adapters --------------------------------------------------------------------------------
def test_packing_declines_unmerged_adapters_and_engine_gives_merged_tokens(tmp_path):
    from llamazoo.generation.engine import Engine
    from llamazoo.generation.packed import can_pack, pack_for_inference
    from llamazoo.generation.sampling import SamplingParams
    from llamazoo.io.tokenizer import load_tokenizer

    base = tiny_llamazoo(tmp_path)
    model = load_model(base)
    apply_lora(model, LoRASpec(rank=4, alpha=8))
    trained_like_adapter(model)
    assert can_pack(model).startswith("the model has unmerged LoRA adapters")
    assert not pack_for_inference(model) and model.model.layers[0].self_attn.fused_qkv is None
    tok = load_tokenizer("tests/data/tokenizers/gpt2")
    prompts = [[5, 17, 99, 3], [42, 7, 11, 8]]
    unmerged = Engine(model, tok).generate(prompts, 6, 2, SamplingParams(), [], [], 0)
    merge_lora(model)
    merged_engine = Engine(model, tok)
    merged = merged_engine.generate(prompts, 6, 2, SamplingParams(), [], [], 0)
    assert [r.token_ids for r in unmerged] == [r.token_ids for r in merged]


def test_generate_with_checkpoint_adapter_equals_generating_from_the_merged_folder(tmp_path, capsys,
                                                                                   default_model_dir):
    out = tmp_path / "tiny"
    hf_tiny_model(vocab_size=49152, max_position_embeddings=128, eos_token_id=2).save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(default_model_dir / name, out / name)
    model = load_model(out)
    spec = LoRASpec(rank=4, alpha=8)
    apply_lora(model, spec)
    trained_like_adapter(model)
    adapter = save_adapter(peft_tensors((n, p) for n, p in model.named_parameters() if p.requires_grad), spec,
                           tmp_path / "adapter")
    assert cli_main(["merge", "--base", str(out), "--adapter", str(adapter), "--output", str(tmp_path / "m")]) == 0
    assert "merged" in capsys.readouterr().out
    common = ["generation.max_new_tokens=6", "generation.output_format=jsonl", "generation.output_dir=null",
              'generation.prompts=["Hello there","A longer prompt about llamas"]', "generation.batch_size=2"]
    runs = []
    for extra in ([f"checkpoint.model_name_or_path={out}", f"checkpoint.adapter={adapter}"],
                  [f"checkpoint.model_name_or_path={tmp_path / 'm'}"], [f"checkpoint.model_name_or_path={out}"]):
        assert cli_main(["generate", *common, *extra]) == 0
        cap = capsys.readouterr()
        runs.append([json.loads(line)["token_ids"] for line in cap.out.splitlines()])
        if len(runs) == 1:
            assert f"adapter: {adapter} (merged)" in cap.err
    assert runs[0] == runs[1] and runs[0] != runs[2]
    assert cli_main(["merge", "--base", str(out), "--adapter", str(tmp_path / "nope"), "--output",
                     str(tmp_path / "m2")]) == 1
    assert "llamazoo merge: error: " in capsys.readouterr().err


def test_fused_head_loss_with_a_frozen_head_gives_the_hidden_gradient_alone():
    """LoRA freezes the LM head: the fused loss then skips the head's [V, H] gradient matmul."""
    from llamazoo.training.loss import weighted_linear_cross_entropy

    torch.manual_seed(0)
    h = torch.randn(12, 16, requires_grad=True)
    weight = torch.randn(40, 16)  # frozen
    labels, w = torch.randint(0, 40, (12,)), torch.rand(12)
    weighted_linear_cross_entropy(h, weight, labels, w, chunk=5).backward()
    ref_h = h.detach().clone().requires_grad_()
    (F.cross_entropy(ref_h @ weight.t(), labels, reduction="none") * w).sum().backward()
    torch.testing.assert_close(h.grad, ref_h.grad)
    assert weight.grad is None
