"""Quantized checkpoints on disk: which layers a folder holds quantized, and llama.cpp's Q8_0 / Q4_0 / Q4_1
blocks as llamazoo's int8 / int4 tensors (the format is in llamazoo.model.quantize's docstring).

A quantized folder is a HF folder whose config.json has a `quantization_config` (llamazoo's, with
quant_method "llamazoo") and whose quantized layers have P.weight_q / P.weight_scale (/ P.weight_zero)
instead of P.weight; what each layer is (int8 or int4, its group size) is read from those tensors'
dtypes and shapes, so the folder says it once.

GGUF blocks of 32 weights map exactly: Q8_0 (fp16 d, 32 int8 q: w = d * q) is int8 with groups of 32;
Q4_0 (fp16 d, 16 bytes of 4-bit q: element j in the low nibble of byte j, element j + 16 in the high one;
w = d * (q - 8)) is int4 with scale d and zero 0; Q4_1 (fp16 d and m: w = d * q + m) is int4 with scale d
and zero m + 8 d (kept in fp32).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from llamazoo.io.damaged import reading

SAFETENSORS_DTYPES = {"I8": torch.int8, "U8": torch.uint8, "F16": torch.float16, "BF16": torch.bfloat16,
                      "F32": torch.float32}


def quantized_layer_specs(files: list[Path]) -> dict[str, dict]:
    """{layer name: {"bits", "groups", "scale_dtype", "zero_dtype"}} from the safetensors headers of a
    folder's weight files (names ending in .weight_q)."""
    from llamazoo.io.hf import open_safetensors

    headers: dict[str, tuple[str, list[int], Path]] = {}
    for f in files:
        if f.suffix != ".safetensors":
            continue
        with open_safetensors(f) as st:
            for name in st.keys():
                with reading(f, "safetensors"):
                    sl = st.get_slice(name)
                    headers[name] = (sl.get_dtype(), list(sl.get_shape()), f)
    specs = {}
    for name, (dtype, shape, f) in headers.items():
        if not name.endswith(".weight_q"):
            continue
        layer = name[:-len(".weight_q")]
        if dtype not in ("I8", "U8") or len(shape) != 2:
            raise ValueError(f"{f}: tensor {name!r} is {dtype} {shape}; expected int8 [out, in] or uint8 [out, in/2]")
        scale = headers.get(layer + ".weight_scale")
        zero = headers.get(layer + ".weight_zero")
        if scale is None or (dtype == "U8") != (zero is not None):
            need = "weight_scale and weight_zero" if dtype == "U8" else "weight_scale"
            raise ValueError(f"{f}: quantized layer {layer!r} lacks its {need} tensor")
        specs[layer] = {"bits": 8 if dtype == "I8" else 4, "groups": scale[1][1] if len(scale[1]) == 2 else 0,
                        "scale_dtype": SAFETENSORS_DTYPES.get(scale[0], torch.float32),
                        "zero_dtype": SAFETENSORS_DTYPES.get(zero[0], torch.float32) if zero else None}
    return specs


# -- GGUF blocks --------------------------------------------------------------------------------------------
GGUF_KEPT = {"Q8_0": (8, 34), "Q4_0": (4, 18), "Q4_1": (4, 20)}  # type -> (bits, bytes per 32 weights)


def _nibbles_q4(qs: np.ndarray) -> np.ndarray:
    """[..., 16] bytes of a Q4 block -> its 32 codes: element j in the low nibble of byte j, j + 16 high."""
    return np.concatenate((qs & 15, qs >> 4), axis=-1)


def gguf_block_tensors(data: np.ndarray, type_name: str, rows: int, cols: int) -> dict[str, torch.Tensor]:
    """A Q8_0 / Q4_0 / Q4_1 matrix (GGUF's uint8 rows of blocks) as weight_q / weight_scale (/ weight_zero)."""
    bits, size = GGUF_KEPT[type_name]
    blocks = np.ascontiguousarray(data).reshape(rows, cols // 32, size)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0]
    if type_name == "Q8_0":
        q = blocks[..., 2:].copy().view(np.int8).reshape(rows, cols)
        return {"weight_q": torch.from_numpy(q), "weight_scale": torch.from_numpy(d.copy())}
    qs = blocks[..., 2:] if type_name == "Q4_0" else blocks[..., 4:]
    codes = _nibbles_q4(qs).reshape(rows, cols)
    packed = codes[:, 0::2] | (codes[:, 1::2] << 4)
    if type_name == "Q4_0":
        zero = torch.zeros(d.shape, dtype=torch.float16)
    else:
        m = blocks[..., 2:4].copy().view(np.float16)[..., 0]
        zero = torch.from_numpy(m.astype(np.float32) + 8 * d.astype(np.float32))
    return {"weight_q": torch.from_numpy(np.ascontiguousarray(packed)), "weight_scale": torch.from_numpy(d.copy()),
            "weight_zero": zero}


def folder_quantization_config(sd: dict[str, torch.Tensor]) -> dict | None:
    """config.json's quantization_config for a state dict holding quantized layers."""
    from llamazoo.model.quantize import describe

    layers = []
    for name, q in sd.items():
        if name.endswith(".weight_q"):
            inputs = q.shape[1] * (1 if q.dtype == torch.int8 else 2)
            groups = sd[name[:-len("_q")] + "_scale"].shape[1]
            layers.append((8 if q.dtype == torch.int8 else 4, inputs // groups, inputs))
    return describe(layers)
