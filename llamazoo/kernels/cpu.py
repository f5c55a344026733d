"""The CPU linear kernels of cpu_linear.c (bf16, fp32, int8 and int4 weights; a few rows of fp32 or bf16
activations), built with the system C compiler on first use and kept in the cache
(llamazoo.paths.cache_dir()/kernels).

Why a C file: on AVX2 CPUs torch has no bf16 GEMM kernel (bf16 F.linear costs about one matrix-vector
product per row) and its int8 weight-only kernel converts under memory speed. Measured (2 threads, AVX2
EPYC, Llama-2-7b's gate/up 22016 x 4096, ms at 1 / 8 / 32 rows): bf16 F.linear 8.7 / 67 / 263 vs
lz_linear_bf16 4.2 / 13.6 / 48.5; int8 `_weight_int8pack_mm` 4.0 / 17.8 / 68.6 vs lz_linear_int8 2.9 /
12.6 / 43.7. int4 (`lz_linear_int4`) multiplies integers, as llama.cpp does: the activations are quantized
to int8 per 32 inputs and each block's sum is exact (maddubs); 22016 x 4096, group 32, at 1 / 8 / 32 rows:
2.6 / 12.0 / 46.2 ms vs torch's `_weight_int4pack_mm_for_cpu` 6.4 / 21.1 / 83.8 (a float int4 kernel that
converted each weight ran at 8.4 ms per row: not kept).
Prompt-sized calls (24 rows and more; int8 from 32) take a panel path with the same sums (cpu_linear.c):
130-140 GFLOP/s on 2 threads where torch's upcast fp32 GEMM of a bf16 weight gives 80-118.
No compiler, another CPU, or LLAMAZOO_CPU_KERNELS=0: `library()` is None and callers keep torch's kernels.
A failed build warns once and is not retried in that process.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import weakref
from pathlib import Path

import torch

from llamazoo.paths import cache_dir

log = logging.getLogger("llamazoo.kernels")
SOURCE = Path(__file__).with_name("cpu_linear.c")
SOURCES = [SOURCE, SOURCE.with_name("cpu_decode.c")]
HEADERS = [SOURCE.with_name("lz_common.h")]
# no implicit FMA contraction: a*b + c written in C rounds as torch's separate ops do
FLAGS = ["-O3", "-mavx2", "-mfma", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC"]
LIBS = ["-lmvec", "-lm"]  # glibc's vector exp for softmax and SiLU
_P, _I64, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
SIGNATURES = {
    "lz_linear_bf16": [_P, _INT, _P, _P, _INT, _I64, _I64, _I64, _INT],
    "lz_linear_bf16_multi": [_P, _INT, _INT, _P, _P, _P, _INT, _I64, _I64, _INT],
    "lz_linear_f32_multi": [_P, _INT, _P, _P, _P, _I64, _I64, _INT],
    "lz_linear_int8": [_P, _INT, _P, _P, _P, _INT, _I64, _I64, _I64, _I64, _INT],
    "lz_linear_int4": [_P, _INT, _P, _P, _P, _INT, _I64, _I64, _I64, _I64, _INT],
    "lz_decode_stack": [_P, _P, _P, _I64, _P, _P, _I64, _P, _P, _P, _INT],
}

_library: ctypes.CDLL | None = None
_why_not: str | None = None
_tried = False


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def why_unavailable() -> str | None:
    """None when the kernels can be used here, else why not (builds them on the first call)."""
    library()
    return _why_not


def available() -> bool:
    return library() is not None


def library() -> ctypes.CDLL | None:
    global _library, _why_not, _tried
    if _tried:
        return _library
    _tried = True
    if os.environ.get("LLAMAZOO_CPU_KERNELS", "1") == "0":
        _why_not = "LLAMAZOO_CPU_KERNELS=0"
    elif platform.machine().lower() not in ("x86_64", "amd64"):
        _why_not = f"the kernels are written for x86-64 (this is {platform.machine()})"
    elif torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        _why_not = f"this CPU lacks AVX2 (torch reports {torch.backends.cpu.get_cpu_capability()})"
    elif _compiler() is None:
        _why_not = "no C compiler (cc / gcc, or $CC) to build them"
    else:
        try:
            _library = _load(_build(_compiler()))
        except (OSError, subprocess.SubprocessError) as e:
            _why_not = f"building {', '.join(p.name for p in SOURCES)} failed: {e}"
            log.warning("CPU kernels unavailable, torch's are used instead: %s", _why_not)
    return _library


def _build(cc: str) -> Path:
    """The shared library for this source and compiler, compiled unless the cache has it (written to a
    temporary name and renamed, so concurrent first runs never load a half-written file)."""
    source = b"".join(p.read_bytes() for p in SOURCES + HEADERS)
    key = hashlib.sha256(source + cc.encode() + " ".join(FLAGS + LIBS).encode()).hexdigest()[:16]
    out = cache_dir() / "kernels" / f"cpu_linear-{key}.so"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        res = subprocess.run([cc, *FLAGS, *map(str, SOURCES), "-o", str(tmp), *LIBS], capture_output=True, text=True, timeout=120)
        if res.returncode != 0:
            last = (res.stderr.strip().splitlines() or [f"exit {res.returncode}"])[-1]
            raise subprocess.SubprocessError(f"{cc} exited with {res.returncode}: {last}")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def _load(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    for name, args in SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, None
    return lib


def _required() -> ctypes.CDLL:
    lib = library()
    if lib is None:
        raise RuntimeError(f"llamazoo's CPU kernels are unavailable: {_why_not}")
    return lib


def _activations(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """x as contiguous rows the kernels read as they are (fp32 or bf16, flag 1 for bf16)."""
    x2 = x.reshape(-1, x.shape[-1])
    if x2.dtype not in (torch.float32, torch.bfloat16):
        x2 = x2.float()
    return x2.contiguous(), int(x2.dtype == torch.bfloat16)


def _out_flag(out_dtype: torch.dtype) -> int:
    if out_dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"the bf16 kernel writes float32 or bfloat16, not {out_dtype}")
    return int(out_dtype == torch.bfloat16)


def linear_bf16(x: torch.Tensor, w: torch.Tensor, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """x W^T for a contiguous bf16 W [N, K] (K a multiple of 8); x of any float dtype [..., K] (fp32 and bf16
    read directly); the fp32 sums are returned as out_dtype (bf16: rounded once, as `.to(torch.bfloat16)`)."""
    x2, x_bf16 = _activations(x)
    N, K = w.shape
    y = torch.empty(x2.shape[0], N, dtype=out_dtype)
    (_library or _required()).lz_linear_bf16(x2.data_ptr(), x_bf16, w.data_ptr(), y.data_ptr(), _out_flag(out_dtype),
                                             x2.shape[0], N, K, torch.get_num_threads())
    return y.view(*x.shape[:-1], N)


class MultiLinear:
    """Several weights of one dtype (bf16, or fp32) with the same inputs (q/k/v, gate/up; or one) in one kernel
    call: one parallel loop over all their rows, one output [..., sum of N] (each column the same number as
    a call of its own). The weights are referenced, not copied. bf16 weights read fp32 or bf16 activations
    and write either; fp32 weights take and give fp32."""

    def __init__(self, weights: list[torch.Tensor]):
        if not 1 <= len(weights) <= 8 or len({w.shape[1] for w in weights}) != 1:
            raise ValueError("MultiLinear: 1 to 8 weights with the same number of inputs")
        dtypes = {w.dtype for w in weights}
        if len(dtypes) != 1 or dtypes & {torch.bfloat16, torch.float32} != dtypes:
            raise ValueError(f"MultiLinear: weights of one dtype, bfloat16 or float32 (got {sorted(map(str, dtypes))})")
        if any(not w.is_contiguous() or w.shape[1] % 8 for w in weights):
            raise ValueError("MultiLinear: contiguous weights with a multiple of 8 inputs")
        self.weights = weights  # kept alive while the pointers below are in use
        self.dtype = weights[0].dtype
        self.K = weights[0].shape[1]
        self.N = sum(w.shape[0] for w in weights)
        self._ptrs = (ctypes.c_void_p * len(weights))(*[w.data_ptr() for w in weights])
        self._ns = (ctypes.c_int64 * len(weights))(*[w.shape[0] for w in weights])

    def __call__(self, x: torch.Tensor, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
        lib = _library or _required()
        if self.dtype == torch.float32:
            x2 = x.reshape(-1, self.K).to(torch.float32).contiguous()
            y = torch.empty(x2.shape[0], self.N, dtype=torch.float32)
            lib.lz_linear_f32_multi(x2.data_ptr(), len(self.weights), self._ptrs, self._ns, y.data_ptr(), x2.shape[0],
                                    self.K, torch.get_num_threads())
            y = y if out_dtype == torch.float32 else y.to(out_dtype)
        else:
            x2, x_bf16 = _activations(x)
            y = torch.empty(x2.shape[0], self.N, dtype=out_dtype)
            lib.lz_linear_bf16_multi(x2.data_ptr(), x_bf16, len(self.weights), self._ptrs, self._ns, y.data_ptr(),
                                     _out_flag(out_dtype), x2.shape[0], self.K, torch.get_num_threads())
        return y.view(*x.shape[:-1], self.N)


def linear_int8(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, group: int,
                out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """x W^T for W = q * scale: int8 codes q [N, K], bf16 scales [N, K / group] (group a multiple of 8); x and
    the result as in `linear_bf16`."""
    x2, x_bf16 = _activations(x)
    N, K = q.shape
    y = torch.empty(x2.shape[0], N, dtype=out_dtype)
    (_library or _required()).lz_linear_int8(x2.data_ptr(), x_bf16, q.data_ptr(), scale.data_ptr(), y.data_ptr(),
                                             _out_flag(out_dtype), x2.shape[0], N, K, group, torch.get_num_threads())
    return y.view(*x.shape[:-1], N)


def linear_int4(x: torch.Tensor, q: torch.Tensor, scale_zero: torch.Tensor, group: int,
                out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """x W^T for W = (q - 8) * s + z: packed codes q uint8 [N, K/2] (input k in byte k // 2, even k in
    the low nibble), bf16 (s, z) pairs [N, K / group, 2] (group a multiple of 32). x is quantized to int8 per
    32 inputs inside (see cpu_linear.c), as llama.cpp runs its 4-bit formats; x and the result as in
    `linear_bf16`."""
    x2, x_bf16 = _activations(x)
    N, K = q.shape[0], q.shape[1] * 2
    y = torch.empty(x2.shape[0], N, dtype=out_dtype)
    (_library or _required()).lz_linear_int4(x2.data_ptr(), x_bf16, q.data_ptr(), scale_zero.data_ptr(), y.data_ptr(),
                                             _out_flag(out_dtype), x2.shape[0], N, K, group, torch.get_num_threads())
    return y.view(*x.shape[:-1], N)


# -- the decode step of a whole decoder stack (cpu_decode.c) ------------------------------------------------
class _Proj(ctypes.Structure):
    _fields_ = [("kind", ctypes.c_int64), ("nw", ctypes.c_int64), ("w", ctypes.c_void_p * 3),
                ("n", ctypes.c_int64 * 3), ("scale", ctypes.c_void_p), ("k", ctypes.c_int64), ("group", ctypes.c_int64)]


class _Layer(ctypes.Structure):
    _fields_ = [("attn_norm", ctypes.c_void_p), ("mlp_norm", ctypes.c_void_p), ("k_cache", ctypes.c_void_p),
                ("v_cache", ctypes.c_void_p), ("qkv", _Proj), ("o", _Proj), ("gate_up", _Proj), ("down", _Proj)]


class _Stack(ctypes.Structure):
    _fields_ = [(name, ctypes.c_int64) for name in ("n_layers", "hidden", "heads", "kv_heads", "head_dim", "inter",
                                                     "slots", "bf16", "fp32_ln", "round_probs")] + \
               [("eps", ctypes.c_float), ("attn_scale", ctypes.c_float), ("final_norm", ctypes.c_void_p), ("head", _Proj)]


_KINDS = {"bf16": 0, "fp32": 1, "int8": 2, "int4": 3}


class Projection:
    """What one linear call of the decode stack reads: 1-3 bf16 or fp32 weights sharing the inputs (q/k/v,
    gate/up as separate tensors), or one int8 / int4 matrix as `linear_int8` / `linear_int4` take it."""

    def __init__(self, kind: str, weights: list[torch.Tensor], scale: torch.Tensor | None = None, group: int = 0):
        if kind not in _KINDS or not 1 <= len(weights) <= (3 if kind in ("bf16", "fp32") else 1):
            raise ValueError(f"Projection: {len(weights)} {kind} weights")
        if any(not w.is_contiguous() for w in weights) or (scale is not None and not scale.is_contiguous()):
            raise ValueError("Projection: contiguous tensors")
        self.kind, self.weights, self.scale, self.group = kind, weights, scale, group
        self.in_features = weights[0].shape[1] * (2 if kind == "int4" else 1)
        self.out_features = sum(w.shape[0] for w in weights)

    def fill(self, p: _Proj) -> None:
        p.kind, p.nw, p.k, p.group = _KINDS[self.kind], len(self.weights), self.in_features, self.group
        for i, w in enumerate(self.weights):
            p.w[i], p.n[i] = w.data_ptr(), w.shape[0]
        p.scale = self.scale.data_ptr() if self.scale is not None else None


class DecoderStack:
    """One decode step of every decoder layer in one kernel call (cpu_decode.c), over the layers' weights as
    they are (referenced, not copied). `layers`: per layer a dict of attn_norm, mlp_norm (weights in the model
    dtype) and the Projections qkv, o, gate_up, down (qkv's outputs: q, k, v heads in order). `final_norm` and
    `head` (a Projection), when given, let a call also give the logits (the step of a 135M model is ~20 ms:
    the ~1 ms of torch ops and Python of a separate norm and head call is worth saving)."""

    def __init__(self, layers: list[dict], *, heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
                 eps: float, fp32_ln: bool, mixedp_attn: bool, final_norm: torch.Tensor | None = None,
                 head: Projection | None = None):
        if dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"DecoderStack: float32 or bfloat16 models, not {dtype}")
        if head_dim > 1024 or head_dim % 2:
            raise ValueError(f"DecoderStack: head_dim {head_dim} (even, at most 1024)")
        self.dtype = dtype
        self.head_dim, self.kv_heads = head_dim, kv_heads
        self.hidden = layers[0]["qkv"].in_features
        self.keep = layers  # the tensors whose pointers the kernel reads
        self._layers = (_Layer * len(layers))()
        for spec, L in zip(layers, self._layers):
            for t in (spec["attn_norm"], spec["mlp_norm"]):
                if t.dtype != dtype or t.shape != (self.hidden,) or not t.is_contiguous():
                    raise ValueError("DecoderStack: norm weights [hidden] in the model dtype")
            L.attn_norm, L.mlp_norm = spec["attn_norm"].data_ptr(), spec["mlp_norm"].data_ptr()
            for name in ("qkv", "o", "gate_up", "down"):
                spec[name].fill(getattr(L, name))
        inter = layers[0]["gate_up"].out_features // 2
        self._stack = _Stack(n_layers=len(layers), hidden=self.hidden, heads=heads, kv_heads=kv_heads,
                             head_dim=head_dim, inter=inter, slots=0, bf16=int(dtype == torch.bfloat16),
                             fp32_ln=int(fp32_ln), round_probs=int(dtype == torch.bfloat16 and mixedp_attn),
                             eps=eps, attn_scale=head_dim ** -0.5)
        self.vocab = 0
        if head is not None:
            if final_norm is None or final_norm.dtype != dtype or final_norm.shape != (self.hidden,) \
                    or not final_norm.is_contiguous() or head.in_features != self.hidden:
                raise ValueError("DecoderStack: a head [vocab, hidden] and its final norm [hidden] in the model dtype")
            self.keep = [*layers, {"final_norm": final_norm, "head": head}]
            self._stack.final_norm = final_norm.data_ptr()
            head.fill(self._stack.head)
            self.vocab = head.out_features
        # weak: the caches come with every call (alive while the kernel runs); a strong reference here would
        # keep an engine's previous cache in memory next to its new one
        self._caches: list[weakref.ref] = []
        self._cache_rows = 0

    def _set_caches(self, caches: list[tuple[torch.Tensor, torch.Tensor]], rows: int) -> None:
        """Points the kernel at these caches (checked once per set of tensors; the row count every step)."""
        flat = [t for kv in caches for t in kv]
        if len(flat) == len(self._caches) and all(a is b() for a, b in zip(flat, self._caches)):
            if rows <= self._cache_rows:
                return
        if len(caches) != len(self._layers):
            raise ValueError(f"DecoderStack: {len(caches)} KV caches for {len(self._layers)} layers")
        slots = caches[0][0].shape[2]
        for t in flat:
            if (t.dtype != self.dtype or not t.is_contiguous() or t.shape[0] < rows
                    or tuple(t.shape[1:]) != (self.kv_heads, slots, self.head_dim)):
                raise ValueError(f"DecoderStack: KV caches [rows >= {rows}, {self.kv_heads}, slots, {self.head_dim}], "
                                 f"contiguous, {self.dtype}")
        for (k, v), L in zip(caches, self._layers):
            L.k_cache, L.v_cache = k.data_ptr(), v.data_ptr()
        self._stack.slots = slots
        self._caches = [weakref.ref(t) for t in flat]
        self._cache_rows = min(t.shape[0] for t in flat)

    def __call__(self, h: torch.Tensor, caches: list[tuple[torch.Tensor, torch.Tensor]], slot: torch.Tensor,
                 mask: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 logits: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(h, logits): h [B, hidden] fp32, updated in place; caches (k, v) per layer; slot [B] int64: where
        each row's new key and value go; mask [B, W] bool: the slots each row attends over; cos / sin
        [B, head_dim] in the model dtype. logits=True (a stack with a head): fp32 logits [B, vocab] of the
        last norm of h, as the head gives them in the model dtype (else None)."""
        if logits and not self.vocab:
            raise ValueError("DecoderStack: logits asked of a stack built without a head")
        B = h.shape[0]
        if h.dtype != torch.float32 or not h.is_contiguous() or h.shape[1] != self.hidden:
            raise ValueError("DecoderStack: h fp32 [B, hidden], contiguous")
        self._set_caches(caches, B)
        slot = slot.to(torch.int64).contiguous()
        if int(slot.min()) < 0 or int(slot.max()) >= self._stack.slots or mask.shape[1] > self._stack.slots:
            raise ValueError(f"DecoderStack: cache slots {slot.tolist()} / mask width {mask.shape[1]} "
                             f"beyond the cache's {self._stack.slots}")
        if mask.dtype != torch.bool or mask.shape[0] != B:
            raise ValueError(f"DecoderStack: a bool mask [{B}, W], not {mask.dtype} {list(mask.shape)}")
        mask = mask.contiguous()
        if cos.shape != (B, self.head_dim) or sin.shape != (B, self.head_dim):
            raise ValueError(f"DecoderStack: cos and sin [{B}, {self.head_dim}], not {list(cos.shape)}, {list(sin.shape)}")
        cos, sin = cos.to(self.dtype).contiguous(), sin.to(self.dtype).contiguous()
        out = torch.empty(B, self.vocab, dtype=torch.float32) if logits else None
        (_library or _required()).lz_decode_stack(
            ctypes.byref(self._stack), self._layers, h.data_ptr(), B, slot.data_ptr(), mask.data_ptr(), mask.shape[1],
            cos.data_ptr(), sin.data_ptr(), out.data_ptr() if logits else None, torch.get_num_threads())
        return h, out
