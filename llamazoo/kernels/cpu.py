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
from pathlib import Path

import torch

from llamazoo.paths import cache_dir

log = logging.getLogger("llamazoo.kernels")
SOURCE = Path(__file__).with_name("cpu_linear.c")
FLAGS = ["-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC"]
_P, _I64, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
SIGNATURES = {
    "lz_linear_bf16": [_P, _INT, _P, _P, _INT, _I64, _I64, _I64, _INT],
    "lz_linear_bf16_multi": [_P, _INT, _INT, _P, _P, _P, _INT, _I64, _I64, _INT],
    "lz_linear_f32_multi": [_P, _INT, _P, _P, _P, _I64, _I64, _INT],
    "lz_linear_int8": [_P, _INT, _P, _P, _P, _INT, _I64, _I64, _I64, _I64, _INT],
    "lz_linear_int4": [_P, _INT, _P, _P, _P, _INT, _I64, _I64, _I64, _I64, _INT],
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
            _why_not = f"building {SOURCE.name} failed: {e}"
            log.warning("CPU kernels unavailable, torch's are used instead: %s", _why_not)
    return _library


def _build(cc: str) -> Path:
    """The shared library for this source and compiler, compiled unless the cache has it (written to a
    temporary name and renamed, so concurrent first runs never load a half-written file)."""
    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + cc.encode() + " ".join(FLAGS).encode()).hexdigest()[:16]
    out = cache_dir() / "kernels" / f"cpu_linear-{key}.so"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        res = subprocess.run([cc, *FLAGS, str(SOURCE), "-o", str(tmp)], capture_output=True, text=True, timeout=120)
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
