"""GGUF (llama.cpp) Llama files -> HF checkpoint folders.

Tensors are dequantized with the `gguf` package. llama.cpp's converter permutes the rows of q/k
projections into an interleaved RoPE layout; we undo that permutation to get HF's rotate-half
layout. The tokenizer is rebuilt from the GGUF's metadata as the original model's tokenizer files
(llamazoo.io.gguf_tokenizer).
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import torch

from llamazoo.io.gguf_tokenizer import gguf_tokenizer
from llamazoo.model.llama import LlamaConfig

_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_KEPT_LAYERS = tuple(f"{v}.weight" for k, v in _LAYER_NAMES.items() if not k.endswith("norm")) + ("lm_head.weight",)


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def hf_name(gguf_name: str) -> str:
    base, _, suffix = gguf_name.rpartition(".")
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)", base)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.{suffix}"
    if base in _TOP_NAMES:
        return f"{_TOP_NAMES[base]}.{suffix}"
    raise ValueError(f"unexpected GGUF tensor {gguf_name!r} for a Llama model")


def unpermute_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of llama.cpp's q/k row permutation (interleaved pairs -> two halves per head)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_config(reader, source: str) -> LlamaConfig:
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"{source}: general.architecture is {arch!r}; only 'llama' GGUF files convert")

    def need(key: str):
        v = _field(reader, f"llama.{key}")
        if v is None:
            raise ValueError(f"{source}: GGUF metadata lacks llama.{key}")
        return v

    n_heads = int(need("attention.head_count"))
    hidden = int(need("embedding_length"))
    names = {t.name for t in reader.tensors}
    tokens = _field(reader, "tokenizer.ggml.tokens")
    vocab = int(_field(reader, "llama.vocab_size", len(tokens) if tokens is not None else 0))
    rope_dim = _field(reader, "llama.rope.dimension_count")
    scaling = None
    if _field(reader, "llama.rope.scaling.type") == "linear":
        scaling = {"rope_type": "linear", "factor": float(_field(reader, "llama.rope.scaling.factor"))}
    return LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=int(need("feed_forward_length")),
        num_hidden_layers=int(need("block_count")), num_attention_heads=n_heads,
        num_key_value_heads=int(_field(reader, "llama.attention.head_count_kv", n_heads)),
        head_dim=int(rope_dim) if rope_dim else hidden // n_heads,
        max_position_embeddings=int(_field(reader, "llama.context_length", 2048)),
        rms_norm_eps=float(_field(reader, "llama.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(_field(reader, "llama.rope.freq_base", 10000.0)), rope_scaling=scaling,
        tie_word_embeddings="output.weight" not in names,
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=_field(reader, "tokenizer.ggml.eos_token_id"),
        pad_token_id=_field(reader, "tokenizer.ggml.padding_token_id"),
    )


def gguf_state_dict(reader, cfg: LlamaConfig, dtype: torch.dtype, keep_quantized: bool = False
                    ) -> dict[str, torch.Tensor]:
    """keep_quantized: Q8_0 / Q4_0 / Q4_1 projection and LM head matrices stay int8 / int4 tensors
    (llamazoo.io.quantized), everything else is dequantized to `dtype`."""
    from gguf.quants import dequantize

    from llamazoo.io.quantized import GGUF_KEPT, gguf_block_tensors

    sd = {}
    for t in reader.tensors:
        name = hf_name(t.name)
        if keep_quantized and t.tensor_type.name in GGUF_KEPT and name.endswith(_KEPT_LAYERS) and len(t.shape) == 2:
            rows, cols = int(t.shape[1]), int(t.shape[0])
            q = gguf_block_tensors(t.data, t.tensor_type.name, rows, cols)
            if name.endswith(("q_proj.weight", "k_proj.weight")):  # rows, so the codes and scales alike
                heads = cfg.num_attention_heads if name.endswith("q_proj.weight") else cfg.num_key_value_heads
                q = {k: torch.from_numpy(np.ascontiguousarray(unpermute_rope(v.numpy(), heads))) for k, v in q.items()}
            sd.update({f"{name[:-len('.weight')]}.{k}": v for k, v in q.items()})
            continue
        w = dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
        w = w.reshape([int(d) for d in reversed(t.shape)]) if w.ndim == 1 and len(t.shape) > 1 else w
        if name.endswith("self_attn.q_proj.weight"):
            w = unpermute_rope(w, cfg.num_attention_heads)
        elif name.endswith("self_attn.k_proj.weight"):
            w = unpermute_rope(w, cfg.num_key_value_heads)
        sd[name] = torch.from_numpy(np.array(w, copy=True, order="C")).to(dtype)
    return sd


def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike, dtype: torch.dtype = torch.float32,
                 keep_quantized: bool = False):
    """Writes a HF folder (config, weights, tokenizer) from a GGUF Llama file (keep_quantized: see
    gguf_state_dict; the folder is then a quantized one, loaded without a float step)."""
    from gguf import GGUFReader

    from llamazoo.io.damaged import DamagedFileError
    from llamazoo.io.hf import save_state_dict_folder

    path = Path(gguf_path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: GGUF file not found")
    try:
        reader = GGUFReader(str(path))
    except Exception as e:
        raise DamagedFileError(path, "GGUF", e) from None  # a truncated file fails here: every tensor is mapped
    cfg = gguf_config(reader, str(path))
    sd = gguf_state_dict(reader, cfg, dtype, keep_quantized)
    if any(k.endswith(".weight_q") for k in sd):
        from llamazoo.io.quantized import folder_quantization_config

        cfg.quantization_config = folder_quantization_config(sd)
    tokenizer = gguf_tokenizer(path)
    name = _field(reader, "general.name")
    return save_state_dict_folder(sd, cfg, out_dir, tokenizer=tokenizer,
                                  extra_files={"llamazoo_source.json": json.dumps(
                                      {"converted_from": path.name, "general.name": name}, indent=2) + "\n"})
