"""One plain-PyTorch Llama, with Hugging Face parameter names and RoPE layout.

A HF `LlamaForCausalLM` state_dict loads 1:1. The module tree mirrors HF's
(`model.embed_tokens`, `model.layers.N.self_attn.q_proj`, ..., `lm_head`) so
that checkpoints, tensor-parallel plans and optimizers address the same names.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from llamazoo.kernels import cpu as cpu_kernels

SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "llama3")


@dataclass
class LlamaConfig:
    """The architecture, in HF's config.json vocabulary."""

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    attention_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None
    torch_dtype: str | None = None
    # a quantized checkpoint's description (llamazoo.model.quantize); None for float weights
    quantization_config: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.rope_scaling is not None:
            kind = rope_type(self.rope_scaling)
            if kind not in SUPPORTED_ROPE_TYPES:
                raise ValueError(
                    f"rope_scaling type {kind!r} is not supported; expected one of {', '.join(SUPPORTED_ROPE_TYPES)}"
                )

    @classmethod
    def from_hf(cls, d: dict[str, Any], source: str = "config.json") -> "LlamaConfig":
        """Reads a HF config dict (transformers 4.x `rope_scaling` or 5.x `rope_parameters` style)."""
        model_type = d.get("model_type", "llama")
        if model_type != "llama":
            raise ValueError(f"{source}: model_type is {model_type!r}; llamazoo reads 'llama' models only")
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in known}
        params = d.get("rope_parameters")
        if isinstance(params, dict):
            kwargs.setdefault("rope_theta", params.get("rope_theta", 10000.0))
            if rope_type(params) != "default" and not d.get("rope_scaling"):
                kwargs["rope_scaling"] = {k: v for k, v in params.items() if k != "rope_theta"}
        if kwargs.get("rope_scaling") and rope_type(kwargs["rope_scaling"]) == "default":
            kwargs["rope_scaling"] = None
        if "torch_dtype" not in kwargs and isinstance(d.get("dtype"), str):
            kwargs["torch_dtype"] = d["dtype"]
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            if key not in d:
                raise ValueError(f"{source}: missing required key {key!r}")
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{source}: {e}") from None

    def to_hf(self) -> dict[str, Any]:
        d = asdict(self)
        if d["quantization_config"] is None:
            del d["quantization_config"]
        d.update(model_type="llama", architectures=["LlamaForCausalLM"], hidden_act="silu",
                 attention_dropout=0.0, pretraining_tp=1, use_cache=True)
        return d

    @property
    def num_parameters(self) -> int:
        """Closed form; equals the meta-device count (tested)."""
        h, q, kv = self.hidden_size, self.num_attention_heads * self.head_dim, self.num_key_value_heads * self.head_dim
        attn = h * q * 2 + h * kv * 2 + (q + 2 * kv + h) * self.attention_bias
        mlp = 3 * h * self.intermediate_size + (2 * self.intermediate_size + h) * self.mlp_bias
        layer = attn + mlp + 2 * h
        emb = self.vocab_size * h
        return self.num_hidden_layers * layer + h + emb * (1 if self.tie_word_embeddings else 2)


@dataclass
class PrecisionOptions:
    """The original Model Zoo's precision knobs. They matter only for a bf16/fp16 model.

    fp32_ln: RMSNorm computed in fp32 (else in the model dtype).
    fp32_logits: logits returned in fp32.
    fp32_skip_add: the residual stream is kept in fp32.
    mixedp_attn: attention on low-precision q/k/v with fp32 scores and softmax (SDPA's fused kernels
        accumulate QK^T and softmax in fp32 and feed low-precision probabilities to P.V); when False,
        q/k/v are upcast and the whole attention runs in fp32.
    """

    fp32_ln: bool = False
    fp32_logits: bool = True
    fp32_skip_add: bool = True
    mixedp_attn: bool = True


def rope_type(scaling: dict[str, Any]) -> str:
    return scaling.get("rope_type", scaling.get("type", "default"))


def rope_inv_freq(cfg: LlamaConfig, seq_len: int | None = None) -> torch.Tensor:
    """Inverse frequencies for RoPE, as transformers computes them (fp32)."""
    dim = cfg.head_dim
    base = cfg.rope_theta
    scaling = cfg.rope_scaling or {}
    kind = rope_type(scaling) if scaling else "default"
    if kind == "dynamic" and seq_len is not None and seq_len > cfg.max_position_embeddings:
        factor = scaling["factor"]
        base = base * ((factor * seq_len / cfg.max_position_embeddings) - (factor - 1)) ** (dim / (dim - 2))
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_len / high) * ~(wavelen > old_len / low)
        inv_freq = torch.where(medium, smoothed, scaled)
    return inv_freq


def linear(x: torch.Tensor, lin: nn.Linear) -> torch.Tensor:
    """`lin(x)`, with three inference fast paths.

    Eager: `lin.packed` when set (llamazoo.generation.packed: a prepacked oneDNN weight; not a module, so
    names and state_dict are unchanged); else, for bf16 weights on a CPU without bf16 GEMM kernels and no
    autograd, llamazoo.kernels.cpu's bf16 kernel for any number of rows (each row's numbers do not depend
    on the others: prompts and decode steps alike), or without it an fp32 GEMM over upcast weight slices
    for prompts (`bf16_linear_in_fp32`, see UPCAST_MIN_TOKENS). Under torch.compile, one
    row on CPU (batch-1 decode) is a multiply-reduce: inductor fuses it into one pass over the weight at
    close to memory bandwidth, ~1.5x the extern matrix-vector call `F.linear` becomes. Both accumulate in fp32, like the GEMMs.
    Any other module (a LoRA layer, a quantized linear: llamazoo.model.lora) is simply called, so that
    no fast path can drop what it adds to its weight.
    """
    if not isinstance(lin, nn.Linear):
        return lin(x)
    if torch.compiler.is_compiling():
        w = lin.weight
        if x.numel() == x.shape[-1] and w.device.type == "cpu" and not hasattr(w, "placements"):
            y = (x.unsqueeze(-2).float() * w.float()).sum(-1)
            if lin.bias is not None:
                y = y + lin.bias.float()
            return y.to(x.dtype)
        return lin(x)
    packed = lin.__dict__.get("packed")
    if packed is not None:
        return packed(x)
    if not torch.is_grad_enabled() and _slow_bf16_gemm(lin.weight):
        if _bf16_kernel_fits(lin.weight):  # any number of rows: a row's numbers do not depend on them
            if lin.bias is None and x.dtype in (torch.float32, torch.bfloat16):
                return cpu_kernels.linear_bf16(x, lin.weight, out_dtype=x.dtype)  # rounded in the kernel
            y = cpu_kernels.linear_bf16(x, lin.weight)
            if lin.bias is not None:
                y += lin.bias.float()
            return y.to(x.dtype)
        if x.dim() == 3 and x.shape[1] >= UPCAST_MIN_TOKENS:
            return bf16_linear_in_fp32(x, lin.weight, lin.bias)
    return lin(x)


def _bf16_kernel_fits(w: torch.Tensor) -> bool:
    return w.shape[1] % 8 == 0 and w.is_contiguous() and cpu_kernels.available()


def fp32_linear_weight_first(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x W^T + b as (W x^T)^T, for a plain (unpacked) fp32 weight on CPU and 2 rows or more: the CPU BLAS
    runs the weight-first product 1.3-3x faster at these shapes (2 threads, ms, F.linear vs this, rows
    2 / 8 / 32: SmolLM2's tied head 49152x576 17.8/4.8, 21.2/9.1, 30.9/18.3; Llama-2's head 32000x4096
    56.7/32.6, 115/53, 166/104); equal at one row. The result is a transposed view, no copy. Used for the
    generation engine's LM head only: its summation order differs from F.linear's, which over every layer
    of a forward pass would move logits away from transformers' (1.6e-4 on SmolLM2)."""
    x2 = x.reshape(-1, x.shape[-1])
    y = (w @ x2.t()).t()
    if bias is not None:
        y = y + bias
    return y.reshape(*x.shape[:-1], w.shape[0])


# Prompt-sized bf16 matmuls on CPUs without bf16 GEMM kernels (AVX2; no AVX512-BF16/AMX): `F.linear` costs
# about one matrix-vector product per row there (measured, 2 threads, 4096 x 22016: 9.5 ms at 1 row, 68
# at 8, 1129 at 128), while upcasting the weight in slices of 1M elements and running the fp32 GEMM costs
# 168 ms at 128 rows (24.2 -> 3.7 ms for SmolLM2's gate/up). Only from this many tokens per sequence
# (prefill, scoring; never one-token decode, so a decoding row's numbers do not depend on the batch), and
# only without autograd (training keeps F.linear's graph).
UPCAST_MIN_TOKENS = 16
_UPCAST_SLICE = 1 << 20
# Up to this many rows the fp32 GEMM of a slice runs weight-first, (W x^T)^T (2 threads, ms, x-first vs
# weight-first at 16 / 64 / 256 / 800 rows: SmolLM2's gate/up 3.0/1.9, 5.6/3.9, 14.7/14.7, 36.6/42.6; its
# down 1.2/0.6, 2.3/1.6, 5.5/5.3, 15.1/16.5; Llama-2-7b's down at 32 rows 77/42). Both give the same
# numbers here (each output one sum over k in the same order: tests/test_model_parity.py checks it), so
# a row's numbers do not depend on how many rows share the call.
_UPCAST_WEIGHT_FIRST_ROWS = 256
_native_bf16: bool | None = None


def _slow_bf16_gemm(w: torch.Tensor) -> bool:
    global _native_bf16
    if w.dtype != torch.bfloat16 or w.device.type != "cpu" or hasattr(w, "placements"):
        return False
    if _native_bf16 is None:
        mkldnn = getattr(torch.ops, "mkldnn", None)
        _native_bf16 = bool(mkldnn is not None and hasattr(mkldnn, "_is_mkldnn_bf16_supported")
                            and mkldnn._is_mkldnn_bf16_supported())
    return not _native_bf16


def bf16_linear_in_fp32(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x W^T + b for bf16 x and W, accumulated in fp32 from the exact bf16 values (as the bf16 GEMM does),
    rounded to bf16 once; W is upcast one slice of rows at a time, and each slice's fp32 result goes into
    the bf16 output at once, so neither an fp32 W nor an fp32 output (full logits) is ever whole."""
    x32 = x.reshape(-1, x.shape[-1]).float()
    out = torch.empty(x32.shape[0], w.shape[0], dtype=x.dtype, device=x.device)
    step = max(1, _UPCAST_SLICE // w.shape[1])
    weight_first = x32.shape[0] <= _UPCAST_WEIGHT_FIRST_ROWS
    for start in range(0, w.shape[0], step):
        part = w[start:start + step].float()
        y = (part @ x32.t()).t() if weight_first else x32 @ part.t()
        if bias is not None:
            y += bias[start:start + step].float()
        out[:, start:start + step] = y
    return out.reshape(*x.shape[:-1], w.shape[0])


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, fp32: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.fp32 = fp32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out_dtype = self.weight.dtype
        if self.fp32:
            h = x.float()
            h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        else:
            # As torch computes it in the model dtype, but with the two steps whose low-precision kernels follow
            # the tensor's shape done in fp32 and rounded (the mean's summation order; rsqrt, whose vectorized
            # and scalar-tail bf16 results differ in the last bit): a row gets the same numbers alone and among
            # others, which serve's batched prefill needs. Differs from the plain bf16 ops in ~1e-4 of rsqrts.
            h = x.to(out_dtype)
            var = h.pow(2).float().mean(-1, keepdim=True).to(out_dtype) + self.eps
            h = h * torch.rsqrt(var.float()).to(out_dtype)
        return self.weight * h.to(out_dtype)


class KVCache(nn.Module):
    """A preallocated cache; slot i of every row holds the token fed at cache position i.

    cache_pos is [T] (the same slots in every row) or [B,T] (each row its own slots: rows at different
    lengths decoding together, as a continuous-batching server runs them)."""

    def __init__(self, batch: int, n_kv_heads: int, max_len: int, head_dim: int, dtype: torch.dtype, device,
                 k: torch.Tensor | None = None, v: torch.Tensor | None = None):
        super().__init__()
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device) if k is None else k, persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device) if v is None else v, persistent=False)

    def rows(self, start: int, stop: int) -> "KVCache":
        """Rows start..stop-1 as a cache of their own (views: writes land in this cache), so a batch can
        run over some rows of a larger cache without copying them."""
        k, v = self.k[start:stop], self.v[start:stop]
        return KVCache(*k.shape[:2], k.shape[2], k.shape[3], k.dtype, k.device, k=k, v=v)

    def update(self, cache_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        if cache_pos.dim() == 2:
            rows = torch.arange(k.shape[0], device=k.device)[:, None]
            self.k[rows, :, cache_pos] = k.transpose(1, 2)  # indexed [B,T] then the sliced heads: [B,T,H,D]
            self.v[rows, :, cache_pos] = v.transpose(1, 2)
        else:
            self.k.index_copy_(2, cache_pos, k)
            self.v.index_copy_(2, cache_pos, v)
        return self.k, self.v

    def update_segments(self, spans: Sequence[tuple[int, int]], k: torch.Tensor, v: torch.Tensor) -> None:
        """Packed prompts (`span_attention`): segment i of k/v [1,H,N,D] goes to row i, slots start..start+n-1."""
        off = 0
        for row, (start, n) in enumerate(spans):
            self.k[row, :, start:start + n] = k[0, :, off:off + n]
            self.v[row, :, start:start + n] = v[0, :, off:off + n]
            off += n


# Decode attends over a multiple of this many cache slots (masked beyond the row's length), so that a row
# decoded among longer rows gives the numbers it gives alone: the masked slots get zero weight, and the
# fp32 q.k^T matmul of the CPU BLAS gives the same scores at every width that is a multiple of 32 (not so
# in a tail of fewer than 4 columns, nor at widths 8-24 for small heads; measured for head sizes 16-128).
ATTENTION_WIDTH_MULTIPLE = 32


def attention_width(slots: int, cache_len: int) -> int:
    """Cache slots a one-token step attends over when the longest row fills `slots`."""
    m = ATTENTION_WIDTH_MULTIPLE
    return min(-(-slots // m) * m, cache_len)


def one_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Attention of one new token over the cache (decode), as SDPA computes it: scores and softmax in
    fp32, probabilities in v's dtype for P.V. Two small matmuls instead of SDPA's blocked CPU kernel,
    which costs ~10x more at one query. q [B,H,1,D], k/v [B,Hkv,S,D], mask bool [B,1,1,S]."""
    B, H, T, D = q.shape
    n_kv = k.shape[1]
    qg = q.reshape(B, n_kv, H // n_kv * T, D)  # query heads grouped by the kv head they read
    if torch.compiler.is_compiling():  # multiply-reduce: inductor fuses these, no extern bmm calls
        scores = (qg.float()[:, :, :, None] * k.float()[:, :, None]).sum(-1) * D**-0.5
    else:
        scores = torch.matmul(qg.float(), k.float().transpose(-1, -2)) * D**-0.5
    probs = torch.where(mask, scores, float("-inf")).softmax(-1).to(v.dtype)
    if torch.compiler.is_compiling():
        y = (probs.float()[..., None] * v.float()[:, :, None]).sum(-2).to(v.dtype)
    elif _slow_bf16_gemm(v):  # the fp32 product of the same bf16 values, rounded once (as the bf16 bmm)
        y = torch.matmul(probs.float(), v.float()).to(v.dtype)
    else:
        y = torch.matmul(probs, v)
    return y.reshape(B, H, T, D)


def span_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   spans: Sequence[tuple[int, int]]) -> torch.Tensor:
    """Attention for rows of different lengths prefilled together (right-padded): row b's queries are its
    tokens at cache slots start..start+n-1 and see slots 0..their own. Each row runs the attention call it
    would run alone (same shapes: causal SDPA from slot 0, masked SDPA after a cached prefix, the
    one-query kernel for one token), so its numbers do not depend on the other rows; padded query
    positions get zeros. q [B,H,T,D], k/v the cache [B,Hkv,S,D]. Packed (B = 1, several spans): the rows'
    tokens one after the other in q [1,H,N,D], span b's from offset n_0 + ... + n_(b-1), its keys in cache
    row b (no padding: a pass costs its tokens, not rows x the longest)."""
    y = torch.zeros_like(q)
    gqa = k.shape[1] != q.shape[1]
    packed = q.shape[0] == 1 and len(spans) > 1
    off = 0
    for b, (start, n) in enumerate(spans):
        end = start + n
        qb = q[:, :, off:off + n] if packed else q[b:b + 1, :, :n]
        if n == 1:
            w = attention_width(end, k.shape[2])
            mask = (torch.arange(w, device=q.device) < end)[None, None, None]
            yb = one_query_attention(qb, k[b:b + 1, :, :w], v[b:b + 1, :, :w], mask)
        elif start == 0:
            yb = F.scaled_dot_product_attention(qb, k[b:b + 1, :, :n], v[b:b + 1, :, :n], is_causal=True,
                                                enable_gqa=gqa)
        else:
            mask = torch.arange(end, device=q.device)[None] <= torch.arange(start, end, device=q.device)[:, None]
            yb = F.scaled_dot_product_attention(qb, k[b:b + 1, :, :end], v[b:b + 1, :, :end],
                                                attn_mask=mask[None, None], enable_gqa=gqa)
        if packed:
            y[0, :, off:off + n] = yb[0]
            off += n
        else:
            y[b, :, :n] = yb[0]
    return y


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig, opts: PrecisionOptions):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=bias)
        self.mixedp_attn = opts.mixedp_attn
        self.kv_cache: KVCache | None = None
        # Eager inference only: a callable x -> (q, k, v) computing the three projections in one matmul
        # (set by llamazoo.generation.packed; not a module, so names and state_dict are unchanged).
        self.fused_qkv: Callable | None = None

    def forward(self, x, cos, sin, mask, cache_pos, spans=None):
        B, T, _ = x.shape
        if self.fused_qkv is not None and not torch.compiler.is_compiling():
            q, k, v = self.fused_qkv(x)
        else:
            q, k, v = linear(x, self.q_proj), linear(x, self.k_proj), linear(x, self.v_proj)
        # -1 rather than the configured head count, so a tensor-parallel shard runs unchanged.
        q = q.view(B, T, -1, self.head_dim).transpose(1, 2)
        k = k.view(B, T, -1, self.head_dim).transpose(1, 2)
        v = v.view(B, T, -1, self.head_dim).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if self.kv_cache is not None and spans is not None and B == 1 and len(spans) > 1:  # packed prompts
            self.kv_cache.update_segments(spans, k, v)
            k, v = self.kv_cache.k, self.kv_cache.v
        elif self.kv_cache is not None:
            k, v = self.kv_cache.update(cache_pos, k, v)
            width = T if mask is None else mask.shape[-1]  # no mask here: a causal prefill from slot 0
            if spans is None and width < k.shape[2]:  # a narrower mask covers the first slots
                k, v = k[:, :, :width], v[:, :, :width]
        dtype = q.dtype
        if not self.mixedp_attn and dtype != torch.float32:
            q, k, v = q.float(), k.float(), v.float()
        if spans is not None:
            y = span_attention(q, k, v, spans)
        elif T == 1 and mask is not None and mask.dtype == torch.bool:
            y = one_query_attention(q, k, v, mask)
        else:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=k.shape[1] != q.shape[1]
            )
        y = y.to(dtype).transpose(1, 2).reshape(B, T, -1)
        return linear(y, self.o_proj)


class MLP(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        h, i, bias = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.gate_proj = nn.Linear(h, i, bias=bias)
        self.up_proj = nn.Linear(h, i, bias=bias)
        self.down_proj = nn.Linear(i, h, bias=bias)
        self.fused_gate_up: Callable | None = None  # inference only: x -> (gate, up) in one matmul

    def forward(self, x):
        if self.fused_gate_up is not None and not torch.compiler.is_compiling():
            gate, up = self.fused_gate_up(x)
        else:
            gate, up = linear(x, self.gate_proj), linear(x, self.up_proj)
        return linear(F.silu(gate) * up, self.down_proj)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LlamaConfig, opts: PrecisionOptions):
        super().__init__()
        self.self_attn = Attention(cfg, opts)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, opts.fp32_ln)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, opts.fp32_ln)

    def forward(self, h, cos, sin, mask, cache_pos, spans=None):
        # h may be fp32 (fp32_skip_add) while the weights are bf16: sublayers see the weights' dtype.
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, mask, cache_pos, spans)
        return h + self.mlp(self.post_attention_layernorm(h))


class LlamaModel(nn.Module):
    def __init__(self, cfg: LlamaConfig, opts: PrecisionOptions):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, opts) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, opts.fp32_ln)


class LlamaForCausalLM(nn.Module):
    """Forward: input_ids [B,T] -> logits [B,T,V].

    position_ids [B,T] default to 0..T-1 (offset by the cache position when a cache is set up);
    attention_mask is boolean (True = may attend), [B,1,T,S] or broadcastable, S being T or, with a
    KV cache, the cache length. Without a mask the model is causal (with a cache: cache_pos holds
    consecutive slots). run_layer(layer, h, cos, sin, mask, cache_pos), when given, calls each decoder
    layer (the generation engine passes a compiled one). spans [(start, n) per row], with a cache and
    [B,T] cache_pos instead of a mask: rows of different lengths prefilled together (`span_attention`).
    last_logits=True: fp32 logits [B, V] of the last position only (what generation samples from).
    A `decode_stack` attribute (set by llamazoo.generation.packed; not a module) runs one-token eager steps
    of all layers in one call: decode_stack(h, cos, sin, mask, cache_pos, logits) -> (h, logits or None), or
    None where it does not apply; with last_logits it can run the final norm and the head too.
    """

    def __init__(self, cfg: LlamaConfig, opts: PrecisionOptions | None = None):
        super().__init__()
        self.config = cfg
        self.opts = opts or PrecisionOptions()
        self.model = LlamaModel(cfg, self.opts)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)
        self.cache_len = 0

    # -- KV cache -------------------------------------------------------------------------------
    def setup_cache(self, batch: int, max_len: int, dtype: torch.dtype | None = None, device=None) -> None:
        """Preallocates a static KV cache of max_len slots per row."""
        p = self.lm_head.weight
        for layer in self.model.layers:
            attn = layer.self_attn
            w = attn.k_proj.weight
            w = w.to_local() if hasattr(w, "to_local") else w  # a DTensor shard under tensor parallel
            n_kv = w.shape[0] // attn.head_dim
            attn.kv_cache = KVCache(batch, n_kv, max_len, attn.head_dim, dtype or p.dtype, device or p.device)
        self.cache_len = max_len

    def clear_cache(self) -> None:
        for layer in self.model.layers:
            layer.self_attn.kv_cache = None
        self.cache_len = 0

    # -- forward ----------------------------------------------------------------------------------
    def rope(self, position_ids: torch.Tensor, dtype: torch.dtype):
        inv_freq = self.inv_freq
        scaling = self.config.rope_scaling
        if scaling and rope_type(scaling) == "dynamic":
            seq_len = int(position_ids.max()) + 1
            if seq_len > self.config.max_position_embeddings:
                inv_freq = rope_inv_freq(self.config, seq_len).to(inv_freq.device)
        freqs = position_ids[..., None].float() * inv_freq.float()
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache_pos: torch.Tensor | None = None,
        return_hidden: bool = False,
        run_layer: Callable | None = None,
        spans: Sequence[tuple[int, int]] | None = None,
        last_logits: bool = False,
    ) -> torch.Tensor:
        B, T = input_ids.shape
        if self.cache_len:
            if cache_pos is None:
                raise ValueError("cache_pos is required once a KV cache is set up")
            # No mask: causal. A prefill into an empty cache (slots 0..T-1) keeps no mask, so that SDPA
            # takes its causal path over the T new keys (it skips the masked half); anything else gets
            # an explicit mask over the cache slots.
            if attention_mask is None and cache_pos.dim() == 2 and spans is None:
                raise ValueError("per-row cache positions ([B,T] cache_pos) need an attention_mask or spans")
            if attention_mask is None and spans is None and not (T > 1 and int(cache_pos[0]) == 0):
                slots = torch.arange(self.cache_len, device=input_ids.device)
                attention_mask = (slots[None, :] <= cache_pos[:, None])[None, None]
            if position_ids is None:
                position_ids = cache_pos if cache_pos.dim() == 2 else cache_pos[None].expand(B, T)
        elif position_ids is None:
            position_ids = torch.arange(T, device=input_ids.device)[None].expand(B, T)
        if attention_mask is not None and attention_mask.dtype == torch.bool:
            # A query row that may attend to nothing (padding) would give NaN and poison later layers.
            attention_mask = attention_mask | ~attention_mask.any(-1, keepdim=True)
        dtype = self.lm_head.weight.dtype
        h = self.model.embed_tokens(input_ids)
        if self.opts.fp32_skip_add:
            h = h.float()
        cos, sin = self.rope(position_ids, dtype)
        stack = self.__dict__.get("decode_stack")
        if (stack is not None and T == 1 and spans is None and run_layer is None and h.dtype == torch.float32
                and attention_mask is not None and attention_mask.dtype == torch.bool
                and not torch.is_grad_enabled() and not torch.compiler.is_compiling()):
            # one new token per row, eager inference: every layer in one kernel call (generation.packed)
            out = stack(h, cos, sin, attention_mask, cache_pos, logits=last_logits and not return_hidden)
            layers = self.model.layers if out is None else ()  # None: it does not apply to this step
            if out is not None:
                h, logits = out
                if logits is not None:  # the final norm and the head ran in the same call
                    return logits
        else:
            layers = self.model.layers
        for layer in layers:
            if spans is not None:
                h = layer(h, cos, sin, attention_mask, cache_pos, spans)
            elif run_layer is None:
                h = layer(h, cos, sin, attention_mask, cache_pos)
            else:
                h = run_layer(layer, h, cos, sin, attention_mask, cache_pos)
        h = self.model.norm(h)
        if return_hidden:
            return h
        if last_logits:
            return self.head_logits(h[:, -1])
        logits = linear(h.to(dtype), self.lm_head)
        return logits.float() if self.opts.fp32_logits else logits

    def head_logits(self, h: torch.Tensor) -> torch.Tensor:
        """fp32 logits [B, V] of final hidden states [B, D] (after the last norm): what generation samples
        from. A plain fp32 head on CPU (a tied one is not packed) with 2+ rows takes the weight-first product
        (2x faster there)."""
        head = self.lm_head
        x = h.to(head.weight.dtype)
        w = head.weight
        if (x.shape[0] >= 2 and w.dtype == torch.float32 and w.device.type == "cpu" and type(head) is nn.Linear
                and "packed" not in head.__dict__ and not hasattr(w, "placements")):
            return fp32_linear_weight_first(x, w, head.bias)
        return linear(x, head).float()


# -- random init ----------------------------------------------------------------------------------------
# A model built on the meta device is materialized in its target dtype and initialized one tensor at a time,
# drawing in fp32 and casting, so that a seed gives the weights an eager fp32 build, init and cast gave, while
# the peak memory stays near the model's size in its dtype (7B in bf16: ~13.5 GB, not the 27 GB of fp32).
INIT_CHUNK = 1 << 22  # elements drawn at a time on CPU (16 MB in fp32); a multiple of 16, see _pieces


def _pieces(n: int, device: torch.device) -> list[tuple[int, int]]:
    """Ranges of n elements whose draws, made in order, equal one draw over all n. On CPU, torch's normal_
    turns uniforms into normals in blocks of 16 and redraws the last 16 when n is not a multiple of 16, so
    pieces start at multiples of 16 and the last one keeps the tail; uniform_ draws element by element.
    Other devices' generators count offsets per launch: one piece."""
    if device.type != "cpu" or n <= INIT_CHUNK:
        return [(0, n)]
    out, i = [], 0
    while i < n:
        j = n if n - i - INIT_CHUNK < 16 else i + INIT_CHUNK
        out.append((i, j))
        i = j
    return out


@torch.no_grad()
def _draw(target: torch.Tensor | None, n: int, device: torch.device, draw: Callable[[torch.Tensor], Any]) -> None:
    """draw(buffer) fills fp32 buffers in place; the values go to `target` (cast to its dtype) or, with None,
    are discarded (the generator advances as if n elements were drawn)."""
    if target is not None and target.dtype == torch.float32:
        draw(target)
        return
    for a, b in _pieces(n, device):
        buf = torch.empty(b - a, dtype=torch.float32, device=device)
        draw(buf)
        if target is not None:
            target.view(-1)[a:b].copy_(buf)
        del buf


def replay_default_init(model: LlamaForCausalLM, device: str | torch.device) -> None:
    """Advances the random generator of `device` as building `model` eagerly there would have: each nn.Linear
    draws uniform weights then biases, each nn.Embedding normal weights, as it is built (module order)."""
    device = torch.device(device)
    for m in model.modules():
        if isinstance(m, nn.Linear):
            _draw(None, m.weight.numel(), device, lambda t: t.uniform_())
            if m.bias is not None:
                _draw(None, m.bias.numel(), device, lambda t: t.uniform_())
        elif isinstance(m, nn.Embedding):
            _draw(None, m.weight.numel(), device, lambda t: t.normal_())


def materialize_parameters(model: nn.Module, device: str | torch.device, dtype: torch.dtype) -> None:
    """Gives a meta-device model uninitialized parameters on `device` in `dtype`, one tensor at a time
    (tied parameters stay one tensor), so nothing but the model itself is allocated."""
    new: dict[int, nn.Parameter] = {}
    for m in model.modules():
        for name, p in list(m.named_parameters(recurse=False)):
            if id(p) not in new:
                new[id(p)] = nn.Parameter(torch.empty(p.shape, device=device, dtype=dtype), p.requires_grad)
            setattr(m, name, new[id(p)])


@torch.no_grad()
def init_weights(model: LlamaForCausalLM) -> None:
    """HF's init: normal(0, initializer_range) for linear and embedding weights, zeros for biases, ones for norms.

    Weights in another dtype than fp32 get fp32 draws cast to their dtype (a few MB at a time on CPU), so a
    seed gives the same values, rounded, at every dtype. A tied lm_head is drawn again, as HF's
    module-by-module init does."""
    std = model.config.initializer_range

    def normal_(w: torch.Tensor) -> None:
        _draw(w, w.numel(), w.device, lambda t: t.normal_(0.0, std))

    for m in model.modules():
        if isinstance(m, nn.Linear):
            normal_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            normal_(m.weight)
        elif isinstance(m, RMSNorm):
            nn.init.ones_(m.weight)
