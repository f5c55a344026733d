"""Returning the memory of weights read from memory-mapped files once they are replaced.

A safetensors file is loaded as one private memory mapping of the whole file; every tensor's bytes lie in
it, and the mapping goes away only when the last tensor of the file is freed. The pages of a tensor that
were read stay resident until then, so replacing weights one at a time by packed or quantized copies
(llamazoo.generation.packed, llamazoo.model.quantize) would hold the old bytes and the new ones together.
`release_pages` drops the resident pages of one tensor's bytes at once (madvise MADV_DONTNEED on Linux).
For a private file mapping that is safe even if something still reads the tensor: an unmodified page is
read from the file again. Memory that is not a file mapping (a tensor the process computed) is left
alone; freeing the tensor returns it, except that glibc keeps freed blocks below its (adaptive) mmap
threshold in its heap: temporaries of a few MB freed between long-lived tensors pile up there (+30 MB
on a 70 MB int4 model), so release_pages also hands free heap memory back (malloc_trim).
"""
from __future__ import annotations

import ctypes
import math
import mmap
import sys

import torch

_MADV_DONTNEED = 4


def _file_mappings() -> list[tuple[int, int]]:
    """(start, end) of the private file mappings of this process."""
    out = []
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            if len(parts) == 6 and parts[1].endswith("p") and parts[5].startswith("/"):
                start, end = (int(a, 16) for a in parts[0].split("-"))
                out.append((start, end))
    return out


def _libc():
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def _drop_pages(libc, t: torch.Tensor) -> int:
    """madvise(MADV_DONTNEED) on the whole pages of t's bytes (neighbours share the edge pages)."""
    page = mmap.PAGESIZE
    lo, hi = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
    a, b = -(-lo // page) * page, hi // page * page
    if b > a and libc.madvise(ctypes.c_void_p(a), ctypes.c_size_t(b - a), _MADV_DONTNEED) == 0:
        return b - a
    return 0


def trim_heap() -> None:
    """Hands the heap's free memory back to the system (glibc's malloc_trim)."""
    libc = _libc() if sys.platform == "linux" else None
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def release_pages(tensors: list[torch.Tensor]) -> int:
    """Drops the resident whole pages of each tensor's bytes that lie in a private file mapping and trims
    the heap; returns the mapped bytes released (0 off Linux or for tensors in ordinary memory). Call when
    the tensors are no longer needed (reading them later is still correct: the pages come from the file
    again)."""
    if sys.platform != "linux":
        return 0
    libc = _libc()
    try:
        maps = _file_mappings()
    except OSError:
        return 0
    if libc is None:
        return 0
    trim_heap()
    released = 0
    for t in tensors:
        if t.device.type != "cpu" or not t.is_contiguous() or t.numel() == 0:
            continue
        lo, hi = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
        if any(s <= lo and hi <= e for s, e in maps):
            released += _drop_pages(libc, t)
    return released


def discard_pages(t: torch.Tensor) -> int:
    """Drops the resident whole pages of a CPU tensor's bytes, whatever memory they lie in; returns the bytes.
    Unlike `release_pages` this is for a tensor the caller owns and will never read again (it is about to be
    freed): its anonymous pages come back as zeros. Why: a large weight converted at load (not a file
    mapping) can then be given back piece by piece while its packed copy is built, instead of all at the end."""
    if sys.platform != "linux" or t.device.type != "cpu" or not t.is_contiguous() or t.numel() == 0:
        return 0
    libc = _libc()
    return 0 if libc is None else _drop_pages(libc, t)


HUGE_PAGE = 2 << 20


def empty_on_huge_pages(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An empty CPU tensor whose whole 2 MB pages the kernel may back with transparent huge pages (a
    HugePageArena of its own from 4 MB on; smaller ones a plain tensor). Why: a decode step streams every
    weight once, and with 4 KB pages each 4 KB costs a TLB miss (2 threads, SmolLM2's fp32 LM head at one
    row 4.9 -> 4.4 ms, Llama-2-7b's gate/up 10.2 -> 9.9 ms)."""
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes < 2 * HUGE_PAGE:
        return torch.empty(shape, dtype=dtype)
    return HugePageArena({"": nbytes}).tensor("", shape, dtype)


class HugePageArena:
    """Room for a group of tensors (one decoder layer's weights converted at load) in one anonymous mapping
    whose 2 MB-aligned interior is advised for transparent huge pages before anything touches it. Why:
    `empty_on_huge_pages` reaches only tensors of 4 MB and more, and a small model's layers are made of
    1-3.5 MB matrices (SmolLM2 in fp32): its decode step streamed them through 4 KB pages (2 threads,
    batch-1 decode, A/B in one process, median of 14: 38.0 -> 39.9 tok/s). Each tensor gets its own
    storage over its bytes (torch.frombuffer), so nothing sees shared storage (safetensors, torch.save);
    the mapping goes away when the last of its tensors does (a layer quantized at load frees its arena).
    The edge pages stay 4 KB pages: no 2 MB page holds bytes beyond the tensors'."""

    ALIGN = 64

    def __init__(self, nbytes: dict[str, int]):
        self.offsets: dict[str, int] = {}
        total = 0
        for name, n in nbytes.items():
            self.offsets[name] = total
            total += -(-n // self.ALIGN) * self.ALIGN
        self.nbytes = dict(nbytes)
        self._start = 0
        if sys.platform != "linux" or not hasattr(mmap, "MADV_HUGEPAGE"):
            self._map: mmap.mmap | bytearray = bytearray(max(total, 1))  # no THP to ask for: plain memory
            return
        # private: a shared anonymous mapping is shmem, which THP leaves alone by default
        self._map = mmap.mmap(-1, max(total, 1) + HUGE_PAGE,  # the slack aligns the start; never touched
                              flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        view = ctypes.c_char.from_buffer(self._map)
        base = ctypes.addressof(view)
        del view  # (an export would keep the mapping open forever)
        self._start = -base % HUGE_PAGE
        end = (base + self._start + total) // HUGE_PAGE * HUGE_PAGE
        if end > base + self._start:
            try:
                self._map.madvise(mmap.MADV_HUGEPAGE, self._start, end - base - self._start)
            except OSError:
                pass  # a kernel without THP: plain pages

    def tensor(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """The empty tensor for `name` (its bytes must match what the arena was made for)."""
        n = math.prod(shape)
        if n * dtype.itemsize != self.nbytes[name]:
            raise ValueError(f"HugePageArena: {name} {shape} {dtype} is not the size it was given")
        if n == 0:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(self._map, dtype=dtype, count=n, offset=self._start + self.offsets[name]).view(shape)
