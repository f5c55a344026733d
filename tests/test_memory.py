"""Weights held once during generation: the packed CPU projections replace the plain weights (which come
back for state_dict and unpack), so the peak RSS of `generate` stays near the weights plus the KV cache."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from llamazoo.generation.engine import Engine
from llamazoo.generation.packed import SCORING_HINT, can_pack, pack_for_inference, unpack
from llamazoo.io.hf import load_model, random_model, save_model
from llamazoo.model.llama import LlamaConfig

# ~214 MB of fp32 weights, untied (the LM head is packed too)
MID = dict(vocab_size=16384, hidden_size=768, intermediate_size=2048, num_hidden_layers=4, num_attention_heads=12,
           num_key_value_heads=4, max_position_embeddings=512)


@pytest.fixture(scope="module")
def mid_folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("mid") / "model"
    save_model(random_model(LlamaConfig(**MID), dtype=torch.float32, seed=3), out)
    return out


MEASURE = textwrap.dedent("""
    import json, os, sys
    import torch
    from llamazoo.generation.engine import Engine
    from llamazoo.generation.packed import pack_for_inference
    from llamazoo.io.hf import load_model

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def peak():
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM"))

    # imports, oneDNN and the allocator warm up on a tiny model first: not the model's memory
    Engine(load_model("tiny", seed=0), None).generate_batch([[1, 2, 3]], 4)
    base = rss()
    model = load_model(sys.argv[1], dtype=sys.argv[3] if len(sys.argv) > 3 else None)
    weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    if sys.argv[2] == "copy":  # the plain weights kept beside the packed ones (what compile=true does)
        pack_for_inference(model, in_place=False)
    engine = Engine(model, None)
    tokens = [r.token_ids for r in engine.generate_batch([[5, 6, 7, 8], [9, 10, 11, 12]], 8)]
    if sys.argv[2] == "repack":  # unpacked and packed again for batches (what a benchmark does between rows)
        from llamazoo.generation.packed import unpack
        unpack(model)
        engine = Engine(model, None, pack_batch_hint=32)
        assert tokens == [r.token_ids for r in engine.generate_batch([[5, 6, 7, 8], [9, 10, 11, 12]], 8)]
    kv = sum(2 * l.self_attn.kv_cache.k.numel() * l.self_attn.kv_cache.k.element_size() for l in model.model.layers)
    print(json.dumps({"ratio": (peak() - base) / (weights + kv), "packed": engine.packed, "tokens": tokens}))
""")


def measure(folder, mode: str, dtype: str | None = None) -> dict:
    out = subprocess.run([sys.executable, "-c", MEASURE, str(folder), mode, *([dtype] if dtype else [])],
                         capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self")
def test_generate_peak_rss_is_the_weights_once(mid_folder):
    """Packed in place: peak RSS increase of load + pack + generate <= 1.15x (weights + KV cache); the
    plain weights kept beside the packed copies (the previous default) need ~1.8x."""
    once = measure(mid_folder, "once")
    assert once["packed"]
    assert once["ratio"] <= 1.15, once
    copy = measure(mid_folder, "copy")
    assert copy["ratio"] > 1.5, copy
    assert once["tokens"] == copy["tokens"]
    plain = Engine(load_model(mid_folder), None, pack=False)
    assert [r.token_ids for r in plain.generate_batch([[5, 6, 7, 8], [9, 10, 11, 12]], 8)] == once["tokens"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self")
def test_generate_from_a_quantized_folder_holds_its_weights_once(mid_folder, tmp_path):
    """An int4 folder: codes reordered into the kernel's layout and scales into its bf16 tensor as they
    load (the mmapped stored bytes released), so the peak stays near the quantized weights + KV cache."""
    from llamazoo.model.quantize import quantize_model

    model = load_model(mid_folder, dtype="bfloat16")
    quantize_model(model, "int4", 32)
    save_model(model, tmp_path / "int4")
    once = measure(tmp_path / "int4", "once")
    assert once["packed"] and once["ratio"] <= 1.15, once  # packed: q/k/v and gate/up fused (views, held once)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self")
def test_generate_from_a_converted_folder_holds_its_weights_once(mid_folder, tmp_path):
    """A bf16 folder run in fp32: the converted weights are ordinary memory (no file pages that come back on
    their own), so a group packed whole would be resident twice for a moment (1.25x measured); packed in
    pieces whose plain rows are given back at once, the peak stays near the weights + KV cache."""
    save_model(load_model(mid_folder, dtype="bfloat16"), tmp_path / "bf16")
    once = measure(tmp_path / "bf16", "once", "float32")
    assert once["packed"] and once["ratio"] <= 1.15, once
    again = measure(tmp_path / "bf16", "repack", "float32")  # unpack, too, restores piece by piece
    assert again["ratio"] <= 1.15, again
    plain = Engine(load_model(tmp_path / "bf16", dtype="float32"), None, pack=False)
    assert [r.token_ids for r in plain.generate_batch([[5, 6, 7, 8], [9, 10, 11, 12]], 8)] == once["tokens"]


def test_packing_in_pieces_gives_the_same_numbers_and_spares_weights_held_elsewhere(mid_folder, monkeypatch):
    """Row pieces give bit-identical outputs to the whole matrix (each output is the same dot product),
    unpack restores the exact weights, and a weight that something else still holds (a state_dict the
    caller kept) keeps its values: only memory nobody else uses is given back while packing."""
    import llamazoo.generation.packed as packed

    ids = torch.tensor([[5, 6, 7, 8, 9], [1, 2, 3, 4, 5]])
    whole = load_model(mid_folder)
    ref = {k: v.clone() for k, v in whole.state_dict().items()}
    monkeypatch.setattr(packed, "PIECE_BYTES", 1 << 40)
    monkeypatch.setattr(packed, "MIN_PIECE_BYTES", 1 << 40)
    assert pack_for_inference(whole, batch_hint=SCORING_HINT) and len(whole.lm_head.packed.pieces) == 1
    monkeypatch.setattr(packed, "PIECE_BYTES", 1 << 20)
    monkeypatch.setattr(packed, "MIN_PIECE_BYTES", 1 << 20)
    pieces = load_model(mid_folder)
    kept = pieces.state_dict()  # the caller holds the weights: nothing may be discarded
    assert pack_for_inference(pieces, batch_hint=SCORING_HINT)
    assert len(pieces.lm_head.packed.pieces) > 8 and len(pieces.model.layers[0].mlp.fused_gate_up.pieces) > 2
    assert all(torch.equal(kept[k], ref[k]) for k in ref)
    del kept
    alone = load_model(mid_folder)
    assert pack_for_inference(alone, batch_hint=SCORING_HINT)  # sole owner: plain rows discarded as their pieces are packed
    with torch.inference_mode():
        for m in (pieces, alone):
            assert torch.equal(m(ids), whole(ids))
            assert torch.equal(m(ids[:1, -1:], ), whole(ids[:1, -1:]))
    for m in (pieces, alone):  # state_dict() unpacks: piece by piece, exactly
        assert all(torch.equal(m.state_dict()[k], ref[k]) for k in ref)


def test_packed_in_place_holds_no_plain_copy_and_state_dict_unpacks(mid_folder):
    model = load_model(mid_folder)
    ref = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.inference_mode():
        plain = model(ids)
        assert pack_for_inference(model, batch_hint=SCORING_HINT)
        packed = model(ids)
    lin = model.model.layers[0].mlp.down_proj
    assert lin.weight.shape == (768, 2048) and lin.weight.stride() == (0, 0)  # a placeholder: no memory
    assert model.lm_head.weight.stride() == (0, 0)
    assert model.model.embed_tokens.weight.stride() == (768, 1)  # lookups need the embedding
    torch.testing.assert_close(packed, plain, rtol=1e-5, atol=1e-5)
    sd = model.state_dict()  # unpacks first: the real weights, exactly
    assert not model.packed_for_inference and lin.__dict__.get("packed") is None
    assert list(sd) == list(ref) and all(torch.equal(sd[k], ref[k]) for k in ref)
    with torch.inference_mode():
        assert torch.equal(model(ids), plain)
    # packed again, then unpacked explicitly; a compiled engine (plain weights read) restores them too
    assert pack_for_inference(model, batch_hint=SCORING_HINT) and model.packed_for_inference
    Engine(model, None, compile=True, pack=False)
    assert all(torch.equal(model.state_dict()[k], ref[k]) for k in ref)


def test_tied_head_stays_plain_and_packing_declines_lora_or_quantized(tmp_path):
    cfg = LlamaConfig(**{**MID, "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
                         "num_attention_heads": 4, "num_key_value_heads": 2}, tie_word_embeddings=True)
    model = random_model(cfg, seed=1)
    assert pack_for_inference(model, batch_hint=SCORING_HINT)
    assert "packed" not in model.lm_head.__dict__ and model.lm_head.weight.stride() == (64, 1)
    unpack(model)
    model.model.layers[1].mlp.up_proj = torch.nn.Identity()  # stands for a LoRA or quantized layer
    assert can_pack(model).startswith("the model has unmerged LoRA adapters or quantized layers")
    assert not pack_for_inference(model)


def _vm_flags(address: int) -> list[str]:
    """The VmFlags of this process's mapping that holds `address` (/proc/self/smaps)."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split(maxsplit=1)[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(a, 16) for a in head.split("-"))
                inside = lo <= address < hi
            elif inside and head == "VmFlags:":
                return line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


def _data_start(file) -> int:
    """Where a safetensors file's tensor bytes begin (after the 8-byte length and the JSON header)."""
    with open(file, "rb") as f:
        return 8 + int.from_bytes(f.read(8), "little")


def _pad_header(file, align: int = 64) -> None:
    """Rewrites a safetensors file with its header padded with spaces (the format allows it) so that its tensor
    bytes begin at a multiple of `align`."""
    raw = open(file, "rb").read()
    start = _data_start(file)
    header = raw[8:start].rstrip(b" ")
    header += b" " * (-(8 + len(header)) % align)
    with open(file, "wb") as f:
        f.write(len(header).to_bytes(8, "little") + header + raw[start:])


def _in_a_file_mapping(t: torch.Tensor) -> bool:
    from llamazoo.io.mapped import _file_mappings

    return any(lo <= t.data_ptr() < hi for lo, hi in _file_mappings())


SMALL = LlamaConfig(vocab_size=8192, hidden_size=256, intermediate_size=512, num_hidden_layers=1,
                    num_attention_heads=4, num_key_value_heads=2)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self")
def test_matrices_off_a_64_byte_boundary_in_the_file_are_copied_aligned(tmp_path):
    """safetensors puts tensors after a header of any length (8-byte aligned), and the CPU kernels read a
    matrix that starts off a 64-byte boundary with a split cache line every other load (SmolLM2 fp32 decode
    38.6 -> 46 tok/s once aligned): such matrices are copied at load, aligned, the same numbers; aligned ones
    stay in the file's mapping."""
    from safetensors import safe_open

    save_model(random_model(SMALL, dtype=torch.bfloat16, seed=1), tmp_path / "m")
    file = tmp_path / "m" / "model.safetensors"
    with safe_open(str(file), framework="pt") as st:
        stored = {n: st.get_tensor(n).clone() for n in st.keys()}  # (the file is rewritten below)
    assert _data_start(file) % 64, "the premise: this file's tensors are not 64-byte aligned"
    model = load_model(tmp_path / "m")
    matrices = {n: p for n, p in model.state_dict().items() if p.dim() == 2 and n in stored}
    assert len(matrices) == 9  # 7 projections, the embedding, the untied head
    for n, p in matrices.items():
        assert p.data_ptr() % 64 == 0 and torch.equal(p, stored[n]), n
        assert not _in_a_file_mapping(p), n
    _pad_header(file)
    aligned = load_model(tmp_path / "m")
    for n, p in aligned.state_dict().items():
        if n in matrices:
            assert p.data_ptr() % 64 == 0 and torch.equal(p, stored[n]), n
            assert _in_a_file_mapping(p), n  # read in place: nothing copied


@pytest.mark.skipif(not os.path.exists("/sys/kernel/mm/transparent_hugepage/enabled"),
                    reason="no transparent huge pages in this kernel (or not Linux)")
def test_weights_converted_at_load_are_offered_huge_pages(tmp_path):
    """A bf16 folder loaded in fp32: each converted weight of 4 MB or more is a tensor of our own, advised
    MADV_HUGEPAGE (VmFlags `hg`) before it is written, so the kernel can back it with 2 MB pages, and the
    smaller ones of a decoder layer share an advised mapping (HugePageArena); weights read as stored (and
    64-byte aligned in the file) stay in the file's mapping (not advised); the numbers are the plain
    conversion's."""
    from llamazoo.io.mapped import HUGE_PAGE

    save_model(random_model(SMALL, dtype=torch.bfloat16, seed=1), tmp_path / "bf16")
    _pad_header(tmp_path / "bf16" / "model.safetensors")
    fp32 = load_model(tmp_path / "bf16", dtype="float32")
    emb = fp32.model.embed_tokens.weight  # 8 MB in fp32
    inner = -(-emb.data_ptr() // HUGE_PAGE) * HUGE_PAGE
    assert "hg" in _vm_flags(inner)
    as_stored = load_model(tmp_path / "bf16")
    assert "hg" not in _vm_flags(as_stored.model.embed_tokens.weight.data_ptr())
    assert torch.equal(emb, as_stored.model.embed_tokens.weight.float())
    # a decoder layer's weights (each well under 4 MB) share one advised mapping, each with its own storage
    layer, stored = fp32.model.layers[0], as_stored.model.layers[0]
    params = [p for p in layer.parameters() if p.dim() == 2]
    assert "hg" in _vm_flags(layer.self_attn.q_proj.weight.data_ptr())
    assert len({p.untyped_storage().data_ptr() for p in params}) == len(params)
    for (name, p), q in zip(layer.named_parameters(), stored.parameters()):
        assert p.dtype == torch.float32 and torch.equal(p, q.float()), name
    # and they save like any other (no shared storage for safetensors to refuse) and load back equal
    save_model(fp32, tmp_path / "fp32")
    again = load_model(tmp_path / "fp32")
    assert all(torch.equal(a, b) for a, b in zip(fp32.state_dict().values(), again.state_dict().values()))


def test_quantizing_weights_converted_at_load_gives_their_memory_back(tmp_path):
    """A bf16 folder loaded in fp32 and quantized to int8 at load (model.quantize): each decoder layer's
    converted matrices share one mapping (HugePageArena), which must go away once they are all replaced,
    so the process ends near the int8 size, not holding the fp32 layers too."""
    from llamazoo.io.mapped import trim_heap
    from llamazoo.model.quantize import quantize_model

    cfg = LlamaConfig(vocab_size=256, hidden_size=512, intermediate_size=1536, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=8)
    save_model(random_model(cfg, dtype=torch.bfloat16, seed=3), tmp_path / "bf16")

    def rss() -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))

    model = load_model(tmp_path / "bf16", dtype="float32")
    layer_bytes = sum(p.numel() * 4 for n, p in model.named_parameters() if ".layers." in n and p.dim() == 2)
    before = rss()
    quantize_model(model, "int8")
    trim_heap()
    assert before - rss() >= 0.6 * layer_bytes  # fp32 -> int8 frees 3/4 of the layers' bytes
