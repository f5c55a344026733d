"""Dealing the input lines to train/dev/test split files: how many of each, and in which order.

Three ways, by --shuffle: round robin (line i to split i % n), a seeded shuffle in memory (on_RAM), and
a seeded two-pass shuffle with bounded memory for inputs larger than RAM (large_file). Train and dev
splits also record every line's global index in a side file, so errors name the input file and line.
"""
from __future__ import annotations

import logging
import math
import os
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from llamazoo.data.inputs import Origins, iter_all_lines

LOG = logging.getLogger("llamazoo.prepare")
SHUFFLES = ("False", "on_RAM", "large_file")
GB = 1024 ** 3


def split_counts(input_bytes: int, num_training_splits: Optional[int], num_dev_splits: Optional[int],
                 num_test_splits: Optional[int], dev_ratio: Optional[float],
                 test_ratio: Optional[float]) -> tuple[int, int, int]:
    """(train, dev, test) file counts, by the original's rules."""
    given = [x is not None for x in (num_training_splits, num_dev_splits, num_test_splits)]
    if all(given):
        if dev_ratio is not None or test_ratio is not None:
            raise ValueError("--dev_ratio/--test_ratio cannot be combined with --num_dev_splits and "
                             "--num_test_splits; give the split counts or the ratios")
        train, dev, test = num_training_splits, num_dev_splits, num_test_splits
    else:
        if num_dev_splits is not None or num_test_splits is not None:
            raise ValueError("--num_dev_splits and --num_test_splits must be given together with "
                             "--num_training_splits (all three), or use --dev_ratio/--test_ratio")
        dev_r = dev_ratio or 0.0
        test_r = test_ratio or 0.0
        if not (0 <= dev_r < 1 and 0 <= test_r < 1 and dev_r + test_r < 1):
            raise ValueError(f"--dev_ratio ({dev_r}) and --test_ratio ({test_r}) must be in [0, 1) "
                             "and sum to less than 1")
        if num_training_splits is None:
            gb = input_bytes / GB
            train = 32 if gb < 10 else 128 if gb < 100 else 256
        else:
            train = num_training_splits
        n = int(train / (1 - dev_r - test_r))
        test = int(n * test_r)
        dev = n - test - train
    if train < 1:
        raise ValueError(f"--num_training_splits must be at least 1, got {train}")
    if dev < 0 or test < 0:
        raise ValueError(f"split counts must not be negative: dev {dev}, test {test}")
    return train, dev, test


@dataclass
class Split:
    kind: str      # train | dev | test
    index: int     # 1-based within its kind
    count: int     # files of its kind

    @property
    def name(self) -> str:
        return f"{self.kind}_{self.index}_of_{self.count}"


def split_layout(train: int, dev: int, test: int) -> list[Split]:
    """Split i of the dealt input: the first `train` are train, then test, then dev (the original's order)."""
    return ([Split("train", i + 1, train) for i in range(train)] + [Split("test", i + 1, test) for i in range(test)]
            + [Split("dev", i + 1, dev) for i in range(dev)])


class SplitWriters:
    """Open split files; train/dev lines also record their global line index in a side file."""

    def __init__(self, splits: list[Split], ext: str, split_dir: Path, test_dir: Path, work_dir: Path):
        self.paths, self.idx_paths, self.files, self.idx = [], [], [], []
        for s in splits:
            target = (test_dir if s.kind == "test" else split_dir) / f"{s.name}{ext}"
            target.parent.mkdir(parents=True, exist_ok=True)
            self.paths.append(target)
            self.files.append(open(target, "wb", buffering=1 << 16))
            self.idx_paths.append(None if s.kind == "test" else work_dir / f"{s.name}.idx")
            self.idx.append(None if s.kind == "test" else array("q"))
        self.counts = [0] * len(splits)
        self.open_line = [False] * len(splits)   # last line written had no newline (an input's last line)

    def write(self, split: int, line: bytes, index: int) -> None:
        if self.open_line[split]:
            self.files[split].write(b"\n")   # keep the two lines apart
        self.open_line[split] = not line.endswith(b"\n")
        self.files[split].write(line)
        self.counts[split] += 1
        buf = self.idx[split]
        if buf is not None:
            buf.append(index)
            if len(buf) >= 65536:
                self._flush_idx(split)

    def _flush_idx(self, split: int) -> None:
        with open(self.idx_paths[split], "ab") as f:
            self.idx[split].tofile(f)
        self.idx[split] = array("q")

    def close(self) -> None:
        for i, f in enumerate(self.files):
            f.close()
            if self.idx[i] is not None:
                self._flush_idx(i)


def deal(shuffle: str, files: list[Path], origins: Origins, writers: SplitWriters, n: int, seed: int,
         shuffle_memory_mb: Optional[float], work_dir: Path) -> int:
    """Deals every input line to the n splits as --shuffle says; returns the number of lines."""
    if shuffle == "False":
        LOG.warning("--shuffle=False: lines are dealt to the splits in turn, without shuffling")
        return deal_round_robin(files, origins, writers, n)
    if shuffle == "on_RAM":
        input_bytes = sum(f.stat().st_size for f in files)
        if input_bytes * 2 > _available_memory():
            raise ValueError(f"--shuffle=on_RAM needs about {2 * input_bytes / 2**30:.1f} GB of free "
                             "memory for this input; use --shuffle=large_file")
        return deal_on_ram(files, origins, writers, n, seed)
    budget = shuffle_memory_mb * 2**20 if shuffle_memory_mb else _available_memory() // 4
    return deal_large_file(files, origins, writers, n, seed, int(budget), work_dir)


def _available_memory() -> int:
    import psutil

    return int(psutil.virtual_memory().available)


def _chunk_bounds(total: int, n: int) -> list[int]:
    """Start offsets of n contiguous chunks of `total` items, sized like numpy.array_split."""
    base, extra = divmod(total, n)
    bounds = [0]
    for i in range(n):
        bounds.append(bounds[-1] + base + (1 if i < extra else 0))
    return bounds


def deal_round_robin(files: list[Path], origins: Origins, writers: SplitWriters, n: int) -> int:
    i = -1
    for i, line in enumerate(iter_all_lines(files, origins)):
        writers.write(i % n, line, i)
    return i + 1


def deal_on_ram(files: list[Path], origins: Origins, writers: SplitWriters, n: int, seed: int) -> int:
    lines = list(iter_all_lines(files, origins))
    order = np.random.default_rng(seed).permutation(len(lines))
    bounds = _chunk_bounds(len(lines), n)
    for s in range(n):
        for j in order[bounds[s]:bounds[s + 1]]:
            writers.write(s, lines[j], int(j))
    return len(lines)


def deal_large_file(files: list[Path], origins: Origins, writers: SplitWriters, n: int, seed: int,
                    budget_bytes: int, work_dir: Path) -> int:
    """A seeded shuffle in two passes with memory bounded by `budget_bytes`.

    Pass 1 sends every line to one of K bucket files chosen at random; pass 2 loads one bucket at a time,
    shuffles it in memory and deals it to the splits in order. Random buckets followed by a random order
    inside each bucket is a uniformly random permutation, and only one bucket is ever in memory.
    """
    total_bytes = sum(f.stat().st_size for f in files)
    # a bucket in memory costs its bytes plus ~100 bytes of Python objects per line; aim for 1/4 budget
    k = max(1, math.ceil(total_bytes * 4 / max(budget_bytes, 1 << 20)))
    if k > 1000:  # one open file per bucket
        raise ValueError(f"--shuffle_memory_mb {budget_bytes / 2**20:.0f} is too small for "
                         f"{total_bytes / 2**20:.0f} MB of input; give at least "
                         f"{math.ceil(total_bytes * 4 / 1000 / 2**20)} MB")
    rng = np.random.default_rng(seed)
    bucket_dir = work_dir / "buckets"
    bucket_dir.mkdir(parents=True, exist_ok=True)
    outs = [open(bucket_dir / f"{b}.lines", "wb", buffering=1 << 16) for b in range(k)]
    idx_outs = [open(bucket_dir / f"{b}.idx", "wb", buffering=1 << 16) for b in range(k)]
    idxs = [array("q") for _ in range(k)]
    choice = rng.integers(0, k, size=65536)
    total = 0
    try:
        for i, line in enumerate(iter_all_lines(files, origins)):
            j = i % 65536
            if j == 0 and i:
                choice = rng.integers(0, k, size=65536)
            b = int(choice[j])
            outs[b].write(line if line.endswith(b"\n") else line + b"\n")
            idxs[b].append(i)
            if len(idxs[b]) >= 8192:  # line indexes go to disk too, so pass 1 holds O(K) memory
                idxs[b].tofile(idx_outs[b])
                idxs[b] = array("q")
            total = i + 1
        for b in range(k):
            idxs[b].tofile(idx_outs[b])
    finally:
        for f in outs + idx_outs:
            f.close()
    del idxs
    if total == 0:
        return 0
    last_index = total - 1  # its line may lack a final newline; restore that on the way out
    bounds = _chunk_bounds(total, n)
    s, pos = 0, 0
    while s < n and bounds[s + 1] == bounds[s]:
        s += 1
    for b in range(k):
        lines = (bucket_dir / f"{b}.lines").read_bytes().split(b"\n")[:-1]
        index = np.fromfile(bucket_dir / f"{b}.idx", dtype=np.int64)
        for j in rng.permutation(len(lines)):
            line = lines[j] + b"\n"
            gi = int(index[j])
            if gi == last_index and not _ends_with_newline(files[-1]):
                line = line[:-1]
            writers.write(s, line, gi)
            pos += 1
            while s < n and pos >= bounds[s + 1]:
                s += 1
        del lines, index
        (bucket_dir / f"{b}.lines").unlink()
        (bucket_dir / f"{b}.idx").unlink()
    return total


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        if f.tell() == 0:
            return True
        f.seek(-1, os.SEEK_END)
        return f.read(1) in (b"\n", b"\r")

