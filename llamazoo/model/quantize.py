"""Weight-only int8 / int4 linear layers for inference, on llamazoo's C kernels or torch's CPU kernels (`model.quantize`).

Tensors of a quantized layer P (its state_dict and a quantized folder's safetensors):
  int8  P.weight_q     int8  [out, in]           w = q * scale, q in -127..127
        P.weight_scale float [out, in / g]       one scale per g inputs of a row (g = in: per channel)
  int4  P.weight_q     uint8 [out, in / 2]       input k in byte k // 2, even k in the low nibble, q in 0..15
        P.weight_scale, P.weight_zero  float [out, in / g]     w = (q - 8) * scale + zero
  P.bias as nn.Linear's. `quantize_linear` writes per-channel symmetric int8 and grouped asymmetric int4
(scale = (max - min) / 15 per group) with bf16 scales, the precision the kernels use. GGUF imports keep
llama.cpp's blocks (llamazoo.io.quantized): Q8_0 is int8 with g = 32, Q4_0 / Q4_1 are int4 with g = 32.

Kernels, chosen by measurement (AVX2 EPYC, one thread, a 22016 x 4096 weight, batch 1 / 8, ms):
  bf16 F.linear 20 / 276; fp32 oneDNN-packed 23 / 74; int8 `_weight_int8pack_mm` 23 / 51;
  int4 `_weight_int4pack_mm_for_cpu` (g 64) 15 / 110; inductor-compiled dequantize + multiply-reduce
  (int8 96, int4 412 at batch 1): not used. torch's int kernels are vectorized for bf16 activations only
  (fp32 ones take ~10x longer), so activations enter them as bf16 and the result is cast back.
  Where llamazoo.kernels.cpu is built (x86-64 AVX2 and a C compiler), int8 layers, per channel or
  grouped, use its `lz_linear_int8` instead ("lz8": fp32 activations, and a row's numbers independent of
  the batch; 2 threads, 22016 x 4096 at 1 / 8 / 32 rows: 2.9 / 12.6 / 43.7 ms vs torch's 4.0 / 17.8 / 68.6),
  and int4 layers with groups of a multiple of 32 its `lz_linear_int4` ("lz4": the stored codes as they are,
  activations quantized to int8 per 32 inputs as llama.cpp's Q4_0 x Q8_0 product does, exact integer block
  sums; 2.6 / 12.0 / 46.2 ms vs torch's 6.4 / 21.1 / 83.8 at group 32).
At load (`prepare`) a layer takes its kernel's layout in place of the stored one, so its weight is held
once: int8 (lz8, or torch's per channel) and lz4 keep their codes (lz4's scale and zero become one bf16
[out, in / g, 2] tensor); for torch's int4 kernel the codes are reordered into the kernel's blocked layout and
scale/zero become one bf16 [in / g, out, 2] tensor; grouped int8 (Q8_0) runs as two int4 halves of the
same bytes (q = 16 * hi + lo: hi rows with scale 16 * s, lo rows with s and zero 8 * s, outputs summed).
state_dict() gives the stored format back (scales as the bf16 the kernel holds). Elsewhere (another
device, shapes the kernels reject) a layer keeps the stored tensors and dequantizes for each call.

`weight` is a placeholder [out, in] tensor of the compute dtype (zero strides, no memory), so code that
reads a layer's shape, dtype or device works as for nn.Linear; nothing may compute with it.
"""
from __future__ import annotations

import functools
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from llamazoo.kernels import cpu as cpu_kernels
from llamazoo.model.quant import int8_quantize

BITS = (8, 4)
KERNEL_GROUP_SIZES = (32, 64, 128, 256)  # what the int4 CPU kernel accepts
DEFAULT_GROUP_SIZE = 32  # llama.cpp's block size
ROW_CHUNK = 1 << 22  # weights converted at a time (fp32 / int32 temporaries of ~16 MB)
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _rows_per_chunk(cols: int, multiple: int = 64) -> int:
    return max(multiple, ROW_CHUNK // max(cols, 1) // multiple * multiple)


# -- the CPU int4 kernel's blocked layout -----------------------------------------------------------------
def _to_int4pack(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes [N, K] (0..15) -> the int4 kernel's packed [N, K/2] (converted 64 rows at a time or more:
    the layout is made of independent blocks of 32 or 64 rows, so chunks give the same bytes)."""
    N, K = codes.shape
    out = torch.empty(N, K // 2, dtype=torch.uint8)
    step = _rows_per_chunk(K)
    for i in range(0, N, step):
        out[i:i + step] = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes[i:i + step].to(torch.int32), 1)
    return out


@functools.lru_cache(maxsize=64)
def _int4pack_positions(rows: int, K: int) -> torch.Tensor:
    """For the packing of a [rows, K] weight: the flat index (n * K + k) of the weight element held by each
    nibble of the packed bytes (low nibble first), found by packing the index's base-16 digits."""
    idx = torch.arange(rows * K, dtype=torch.int64).view(rows, K)
    pos = torch.zeros(rows * K, dtype=torch.int64)
    shift = 0
    while (1 << shift) < rows * K:
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(((idx >> shift) & 15).to(torch.int32), 1)
        pos |= torch.stack((packed & 15, packed >> 4), -1).flatten().to(torch.int64) << shift
        shift += 4
    return pos


def _from_int4pack(packed: torch.Tensor, N: int, K: int) -> torch.Tensor:
    """The inverse of `_to_int4pack`: uint8 codes [N, K]."""
    codes = torch.empty(N * K, dtype=torch.uint8)
    flat = packed.reshape(-1)
    block = 64
    for start in (0, N // block * block):
        rows = N // block * block if start == 0 else N - start
        if rows == 0:
            continue
        size = min(rows, block)
        pos = _int4pack_positions(size, K)
        src = flat[start * K // 2:(start + rows) * K // 2].view(-1, size * K // 2)
        nib = torch.stack((src & 15, src >> 4), -1).view(-1, size * K)
        dst = codes[start * K:(start + rows) * K].view(-1, size * K)
        dst[:, pos] = nib
    return codes.view(N, K)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes [N, K] (0..15) -> [N, K/2], input k in byte k // 2, even k in the low nibble."""
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack((packed & 15, packed >> 4), -1).view(packed.shape[0], -1)


# -- quantizers -------------------------------------------------------------------------------------------
@torch.no_grad()
def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel symmetric int8 (llamazoo.model.quant's rows: absmax / 127): codes [N, K], scale [N, 1]."""
    q = torch.empty(w.shape, dtype=torch.int8)
    scale = torch.empty(w.shape[0], 1, dtype=torch.float32)
    step = _rows_per_chunk(w.shape[1], 1)
    for i in range(0, w.shape[0], step):
        part = int8_quantize(w[i:i + step])
        q[i:i + step], scale[i:i + step, 0] = part["codes"], part["scale"]
    return q, scale


@torch.no_grad()
def quantize_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Grouped asymmetric int4: packed codes [N, K/2], bf16 scale and zero [N, K/g] (w = (q - 8) * s + z).
    The codes are rounded against the bf16 scale and zero, the numbers the kernel computes with."""
    N, K = w.shape
    if K % group_size:
        raise ValueError(f"model.quantize_group_size={group_size} does not divide the layer's {K} inputs")
    packed = torch.empty(N, K // 2, dtype=torch.uint8)
    scale = torch.empty(N, K // group_size, dtype=torch.bfloat16)
    zero = torch.empty_like(scale)
    step = _rows_per_chunk(K, 1)
    for i in range(0, N, step):
        g = w[i:i + step].float().view(-1, K // group_size, group_size)
        lo, hi = g.amin(-1), g.amax(-1)
        s = ((hi - lo) / 15).to(torch.bfloat16).float()
        s = torch.where(s > 0, s, torch.ones_like(s))
        z = (lo + 8 * s).to(torch.bfloat16).float()
        q = (torch.round((g - z[..., None]) / s[..., None]) + 8).clamp(0, 15).to(torch.uint8)
        packed[i:i + step] = pack_nibbles(q.view(-1, K))
        scale[i:i + step], zero[i:i + step] = s.to(torch.bfloat16), z.to(torch.bfloat16)
    return packed, scale, zero


def dequantize(stored: dict[str, torch.Tensor]) -> torch.Tensor:
    """fp32 weight [out, in] from stored-format tensors (weight_q, weight_scale[, weight_zero])."""
    q, scale = stored["weight_q"], stored["weight_scale"].float()
    codes = q.float() if q.dtype == torch.int8 else unpack_nibbles(q).float() - 8
    g = codes.shape[1] // scale.shape[1]
    w = codes * scale.repeat_interleave(g, 1)
    if "weight_zero" in stored:
        w = w + stored["weight_zero"].float().repeat_interleave(g, 1)
    return w


def _kernel(kernel: str, x2: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, group_size: int) -> torch.Tensor:
    """One int8 / int4 kernel call on 2-D activations: llamazoo's (fp32 or bf16 activations read as they are,
    fp32 sums returned in their dtype) or torch's (activations cast to bf16, their vectorized type)."""
    if kernel in ("lz8", "lz4"):
        out = x2.dtype if x2.dtype in (torch.float32, torch.bfloat16) else torch.float32
        run = cpu_kernels.linear_int8 if kernel == "lz8" else cpu_kernels.linear_int4
        return run(x2, codes, scale, group_size, out_dtype=out)
    x2 = x2.to(torch.bfloat16).contiguous()
    if kernel == "int8":
        return torch.ops.aten._weight_int8pack_mm(x2, codes, scale)
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x2, codes, group_size, scale.contiguous())


# -- the layer --------------------------------------------------------------------------------------------
class WeightOnlyLinear(nn.Module):
    """A linear layer with int8 or int4 weights (the format and kernels are in the module docstring)."""

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int | None = None,
                 bias: bool = False, dtype: torch.dtype = torch.bfloat16, device: torch.device | str = "meta",
                 scale_dtype: torch.dtype = torch.bfloat16, zero_dtype: torch.dtype | None = None):
        super().__init__()
        if bits not in BITS:
            raise ValueError(f"{bits}-bit weights: expected one of {BITS}")
        g = group_size or in_features
        if in_features % g:
            raise ValueError(f"group size {g} does not divide the layer's {in_features} inputs")
        self.in_features, self.out_features, self.bits, self.group_size = in_features, out_features, bits, g
        self.compute_dtype = dtype
        codes = (out_features, in_features) if bits == 8 else (out_features, in_features // 2)
        self.register_buffer("weight_q", torch.empty(codes, dtype=torch.int8 if bits == 8 else torch.uint8,
                                                     device=device))
        self.register_buffer("weight_scale", torch.empty(out_features, in_features // g, dtype=scale_dtype,
                                                         device=device))
        if bits == 4:
            self.register_buffer("weight_zero", torch.empty(self.weight_scale.shape, dtype=zero_dtype or scale_dtype,
                                                            device=device))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device)) if bias else None
        self.kernel: str | None = None  # set by prepare(): lz8 | lz4 | int8 | int4 | int8x2, None = dequantize per call

    @classmethod
    @torch.no_grad()
    def from_linear(cls, lin: nn.Linear, bits: int, group_size: int | None = None) -> "WeightOnlyLinear":
        w = lin.weight.detach()
        layer = cls(lin.in_features, lin.out_features, bits, group_size, lin.bias is not None, w.dtype, "cpu")
        if bits == 8:
            q, s = quantize_int8(w)
            layer.weight_q, layer.weight_scale = q, s.to(torch.float32)
        else:
            layer.weight_q, layer.weight_scale, layer.weight_zero = quantize_int4(w, layer.group_size)
        if lin.bias is not None:
            layer.bias = nn.Parameter(lin.bias.detach().clone(), requires_grad=False)
        return layer.to(w.device)

    @property
    def weight(self) -> torch.Tensor:
        """A placeholder of the float weight's shape, dtype and device (see the module docstring)."""
        return torch.zeros((), dtype=self.compute_dtype, device=self.weight_q.device).expand(
            self.out_features, self.in_features)

    # -- stored format <-> kernel layout ------------------------------------------------------------------
    def _kernel_for(self) -> str | None:
        N, K, g = self.out_features, self.in_features, self.group_size
        if self.weight_q.device.type != "cpu":
            return None
        if self.bits == 8 and g % 8 == 0 and cpu_kernels.available():
            return "lz8"
        if self.bits == 4 and g % 32 == 0 and cpu_kernels.available():
            return "lz4"
        if self.bits == 8 and g == K and K % 8 == 0 and hasattr(torch.ops.aten, "_weight_int8pack_mm"):
            return "int8"
        int4 = hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and g in KERNEL_GROUP_SIZES and K % g == 0
        if self.bits == 4 and int4 and N % 16 == 0:
            return "int4"
        if self.bits == 8 and int4 and N % 8 == 0:
            return "int8x2"
        return None

    @torch.no_grad()
    def prepare(self) -> "WeightOnlyLinear":
        """Takes the kernel's layout (once, after loading or quantizing)."""
        if self.kernel is not None or self.weight_q.is_meta:
            return self
        kernel = self._kernel_for()
        if kernel == "lz8":
            scale = self.weight_scale.to(torch.bfloat16).contiguous()  # [out, in / g]; the same tensor if bf16
            self.register_buffer("_scale", scale, persistent=False)
        elif kernel == "int8":
            self.register_buffer("_scale", self.weight_scale.view(-1).to(torch.bfloat16), persistent=False)
        elif kernel == "lz4":  # codes as stored; scale and zero as bf16 pairs [out, in / g, 2]
            sz = torch.stack((self.weight_scale, self.weight_zero), -1).to(torch.bfloat16).contiguous()
            self.register_buffer("_scale", sz, persistent=False)
            del self.weight_scale, self.weight_zero
        elif kernel == "int4":
            self.weight_q = _to_int4pack(unpack_nibbles(self.weight_q))
            sz = torch.stack((self.weight_scale.t(), self.weight_zero.t()), -1).to(torch.bfloat16).contiguous()
            self.register_buffer("_scale", sz, persistent=False)
            del self.weight_scale, self.weight_zero
        elif kernel == "int8x2":
            q = self.weight_q.to(torch.int16)
            hi, lo = (q >> 4) + 8, q & 15  # q = 16 * (hi - 8) + lo
            self.weight_q = _to_int4pack(torch.cat((hi, lo)).to(torch.uint8)).view(self.out_features, -1)
            s = self.weight_scale.float().t()
            sz = torch.stack((torch.cat((16 * s, s), 1), torch.cat((torch.zeros_like(s), 8 * s), 1)), -1)
            self.register_buffer("_scale", sz.to(torch.bfloat16).contiguous(), persistent=False)
            del self.weight_scale
        self.kernel = kernel
        return self

    def stored(self) -> dict[str, torch.Tensor]:
        """The stored-format tensors (module docstring), from whatever layout the layer holds."""
        N, K = self.out_features, self.in_features
        if self.kernel in (None, "int8", "lz8"):
            out = {"weight_q": self.weight_q, "weight_scale": self.weight_scale}
            if self.bits == 4:
                out["weight_zero"] = self.weight_zero
            return out
        if self.kernel == "lz4":
            return {"weight_q": self.weight_q, "weight_scale": self._scale[..., 0].contiguous(),
                    "weight_zero": self._scale[..., 1].contiguous()}
        sz = self._scale.transpose(0, 1)  # [rows, K/g, 2]
        codes = _from_int4pack(self.weight_q.view(-1, K // 2), sz.shape[0], K)
        if self.kernel == "int4":
            return {"weight_q": pack_nibbles(codes), "weight_scale": sz[..., 0].contiguous(),
                    "weight_zero": sz[..., 1].contiguous()}
        q = 16 * (codes[:N].to(torch.int16) - 8) + codes[N:].to(torch.int16)
        return {"weight_q": q.to(torch.int8), "weight_scale": sz[N:, :, 0].contiguous()}

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        for name, t in self.stored().items():
            destination[prefix + name] = t if keep_vars else t.detach()
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The float weight [out, in] the layer computes with (the int8 kernel: with its bf16 scales)."""
        st = self.stored()
        if self.kernel in ("int8", "lz8"):
            st = {"weight_q": st["weight_q"], "weight_scale": self._scale.view(self.out_features, -1)}
        return dequantize(st).to(dtype or self.compute_dtype)

    # -- forward ----------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if self.kernel in ("lz8", "lz4", "int8", "int4"):
            y = _kernel(self.kernel, x2, self.weight_q, self._scale, self.group_size)
        elif self.kernel == "int8x2":
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(
                x2.to(torch.bfloat16).contiguous(), self.weight_q.view(2 * self.out_features, -1), self.group_size,
                self._scale)
            y = y[:, :self.out_features].float() + y[:, self.out_features:].float()
        else:
            y = F.linear(x2, self.dequantize(x.dtype))
        y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.view(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        g = "per channel" if self.group_size == self.in_features else f"group {self.group_size}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, int{self.bits} ({g}), "
                f"kernel={self.kernel}")


# -- whole models -----------------------------------------------------------------------------------------
def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def quantizable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The layers `quantize_model` quantizes: every decoder projection and the LM head (tied or not)."""
    out = {name: m for name, m in model.named_modules() if name.rpartition(".")[2] in PROJECTIONS
           and name.startswith("model.layers.")}
    out["lm_head"] = model.lm_head
    return out


class TiedQuantizedEmbedding(nn.Module):
    """The token embedding of a model whose LM head is tied to it and quantized int8 per channel: rows are
    looked up in the head's codes and scaled (one vocabulary-sized matrix held once, as int8, for both
    uses, as llama.cpp shares token_embd). The head is referenced, not registered: state_dict holds it
    once, under lm_head."""

    def __init__(self, head: WeightOnlyLinear):
        super().__init__()
        if head.bits != 8 or head.group_size != head.in_features:
            raise ValueError("a tied quantized LM head must be int8 per channel")
        object.__setattr__(self, "head", head)
        self.num_embeddings, self.embedding_dim = head.out_features, head.in_features

    @property
    def weight(self) -> torch.Tensor:
        """A placeholder [vocab, hidden] of the compute dtype (see WeightOnlyLinear.weight)."""
        return self.head.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.head
        return (h.weight_q[ids].float() * h.weight_scale[ids].float()).to(h.compute_dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8 rows of lm_head"


def describe(layers: Iterable[tuple[int, int, int]]) -> dict | None:
    """config.json's quantization_config for quantized layers given as (bits, group size, inputs); None
    without any."""
    kinds: dict[str, int] = {}
    for bits, g, inputs in layers:
        key = f"int{bits}" + (" per channel" if bits == 8 and g == inputs else f" group {g}")
        kinds[key] = kinds.get(key, 0) + 1
    if not kinds:
        return None
    return {"quant_method": "llamazoo", "weight_only": True, "layers": kinds,
            "format": "P.weight_q: int8 [out, in] (w = q * scale) or uint8 [out, in/2] (two 4-bit q per byte, "
                      "even input in the low nibble; w = (q - 8) * scale + zero); P.weight_scale / "
                      "P.weight_zero: [out, in/g], one per g inputs of a row"}


def quantization_summary(model: nn.Module) -> dict | None:
    return describe((m.bits, m.group_size, m.in_features) for m in quantized_layers(model))


@torch.no_grad()
def quantize_model(model: nn.Module, kind: str, group_size: int = DEFAULT_GROUP_SIZE,
                   release: Callable[[list[torch.Tensor]], object] | None = None) -> int:
    """Replaces the projections (and an untied LM head) by int8 or int4 layers, one layer at a time;
    returns how many. int8: per channel. int4: groups of group_size, the LM head int8 per channel (as
    llama.cpp keeps its output matrix at 6 bits in 4-bit files). release(old weights) may return their
    memory at once (llamazoo.io.mapped.release_pages for mmapped files)."""
    if kind not in ("int8", "int4"):
        raise ValueError(f"model.quantize={kind!r}: expected none, int8 or int4")
    layers = quantizable_layers(model)
    if kind == "int4":
        odd = next((f"{name}'s {m.in_features}" for name, m in layers.items()
                    if name != "lm_head" and m.in_features % group_size), None)
        if odd:
            fits = [g for g in KERNEL_GROUP_SIZES if all(m.in_features % g == 0 for m in layers.values())]
            raise ValueError(f"model.quantize_group_size={group_size} does not divide {odd} inputs; "
                             f"{' or '.join(map(str, fits)) or 'no kernel group size'} does")
    n = 0
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    for name, lin in layers.items():
        bits, g = (8, None) if kind == "int8" or name == "lm_head" else (4, group_size)
        if isinstance(lin, WeightOnlyLinear):
            if lin.bits != bits:
                raise ValueError(f"model.quantize={kind}: the checkpoint's layers are int{lin.bits} already "
                                 f"(set model.quantize=none to use them as they are)")
            continue
        if type(lin) is not nn.Linear:
            raise ValueError(f"model.quantize={kind}: {name} is a {type(lin).__name__}, not a plain linear "
                             f"layer (merge LoRA adapters first)")
        layer = WeightOnlyLinear.from_linear(lin, bits, g).prepare()
        if name == "lm_head" and tied and layer.kernel not in ("int8", "lz8"):
            continue  # the embedding looks rows up: only the int8 kernel keeps them in their plain layout
        _set_module(model, name, layer)
        if name == "lm_head" and tied:
            model.model.embed_tokens = TiedQuantizedEmbedding(layer)
        if release is not None:
            release([lin.weight.data])
        n += 1
    model.config.quantization_config = quantization_summary(model)
    return n


def quantized_skeleton(model: nn.Module, layers: dict[str, dict], dtype: torch.dtype) -> None:
    """On a meta-device model: the named layers become WeightOnlyLinear ({"bits", "groups" per row,
    "scale_dtype", "zero_dtype"}, as llamazoo.io.quantized reads them), ready for a checkpoint's tensors."""
    for name, spec in layers.items():
        try:
            lin = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"quantized tensors of {name!r}, which is not a layer of a Llama model") from None
        groups = spec["groups"]
        if not isinstance(lin, nn.Linear) or not groups or lin.in_features % groups:
            raise ValueError(f"quantized layer {name!r}: {groups} scale groups do not fit its "
                             f"{getattr(lin, 'in_features', '?')} inputs")
        layer = WeightOnlyLinear(lin.in_features, lin.out_features, spec["bits"], lin.in_features // groups,
                                 lin.bias is not None, dtype, "meta", spec["scale_dtype"], spec["zero_dtype"])
        _set_module(model, name, layer)
        if name == "lm_head" and model.config.tie_word_embeddings:
            model.model.embed_tokens = TiedQuantizedEmbedding(layer)


def prepare_quantized(model: nn.Module, release: Callable[[list[torch.Tensor]], object] | None = None) -> None:
    """Every WeightOnlyLinear takes its kernel layout (after a checkpoint's tensors were assigned)."""
    for m in model.modules():
        if isinstance(m, WeightOnlyLinear) and m.kernel is None:
            old = list(m.stored().values())
            m.prepare()
            if release is not None and m.kernel == "lz4":  # the codes stay; scale and zero were copied
                release(old[1:])
            elif release is not None and m.kernel not in (None, "int8", "lz8"):
                release(old)


def quantized_layers(model: nn.Module) -> Iterable[WeightOnlyLinear]:
    return (m for m in model.modules() if isinstance(m, WeightOnlyLinear))


# -- fused projections ----------------------------------------------------------------------------------------
def _adjacent_rows(parts: list[torch.Tensor]) -> torch.Tensor | None:
    """The tensor whose consecutive row blocks `parts` are (contiguous views, in order, of one storage), as
    one view; None when they are not that."""
    first = parts[0]
    at = first.storage_offset()
    for t in parts:
        if (not t.is_contiguous() or t.untyped_storage().data_ptr() != first.untyped_storage().data_ptr()
                or t.storage_offset() != at or t.shape[1:] != first.shape[1:] or t.dtype != first.dtype):
            return None
        at += t.numel()
    rows = sum(t.shape[0] for t in parts)
    return first.new_empty(0).set_(first.untyped_storage(), first.storage_offset(), (rows, *first.shape[1:]))


class FusedWeightOnly:
    """q/k/v or gate/up as one kernel call (one matrix of all their rows), for `fused_qkv` / `fused_gate_up`
    (llamazoo.model.llama): ~8% faster decode on SmolLM2 than a call per layer. The layers' own tensors become
    views of the fused ones, so the weights stay held once and state_dict() is unchanged."""

    def __init__(self, layers: list[WeightOnlyLinear]):
        first = layers[0]
        self.kernel, self.group_size, self.in_features = first.kernel, first.group_size, first.in_features
        self.split = [m.out_features for m in layers]
        rows_first = self.kernel in ("int8", "lz8", "lz4")  # scales [out(, groups)(, 2)]; int4's are [groups, out, 2]
        # fused before (views of one tensor, e.g. unpacked and packed again): that tensor, not a second copy
        self.codes = _adjacent_rows([m.weight_q for m in layers])
        if self.codes is None:
            self.codes = torch.cat([m.weight_q for m in layers])
        self.scale = _adjacent_rows([m._scale for m in layers]) if rows_first else None
        if self.scale is None:
            self.scale = torch.cat([m._scale for m in layers], 0 if rows_first else 1)
        self.bias = None if all(m.bias is None for m in layers) else torch.cat(
            [m.bias.detach() if m.bias is not None else torch.zeros(m.out_features, dtype=m.compute_dtype)
             for m in layers])
        start = 0
        for m, n in zip(layers, self.split):
            m.weight_q = self.codes[start:start + n]
            m._scale = self.scale[start:start + n] if rows_first else self.scale[:, start:start + n]
            start += n

    @staticmethod
    def fusable(layers: list[nn.Module]) -> bool:
        first = layers[0]
        return (all(isinstance(m, WeightOnlyLinear) for m in layers) and first.kernel in ("lz8", "lz4", "int8", "int4")
                and all(m.kernel == first.kernel and m.group_size == first.group_size and m.in_features ==
                        first.in_features and m.compute_dtype == first.compute_dtype for m in layers)
                # int4: the kernel's layout is made of blocks of 32 or 64 rows; whole blocks concatenate
                and (first.kernel != "int4" or all(m.out_features % 64 == 0 for m in layers)))

    def __call__(self, x: torch.Tensor):
        y = _kernel(self.kernel, x.reshape(-1, self.in_features), self.codes, self.scale, self.group_size).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.view(*x.shape[:-1], -1).split(self.split, dim=-1)


@torch.no_grad()
def fuse_quantized(model: nn.Module, release: Callable[[list[torch.Tensor]], object] | None = None) -> bool:
    """Installs FusedWeightOnly q/k/v and gate/up on every decoder layer whose layers allow it; returns
    whether any was. release(the layers' previous tensors), as in quantize_model: int8 codes read from a
    file stay mmapped until then."""
    done = False
    for layer in model.model.layers:
        a, m = layer.self_attn, layer.mlp
        for owner, attr, group in ((a, "fused_qkv", [a.q_proj, a.k_proj, a.v_proj]),
                                   (m, "fused_gate_up", [m.gate_proj, m.up_proj])):
            if isinstance(getattr(owner, attr), FusedWeightOnly):
                done = True
            elif FusedWeightOnly.fusable(group):
                old = [t for g in group for t in (g.weight_q, g._scale)]
                setattr(owner, attr, FusedWeightOnly(group))
                if release is not None:
                    release(old)
                done = True
    return done
