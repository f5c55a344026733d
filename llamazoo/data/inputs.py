"""The input of `llamazoo prepare`: which files, their lines as bytes, and where each line came from.

Lines are read as bytes (decoded only by the tokenizing workers, so a bad byte is reported with its
file and line) and split like Python's text mode. `Origins` turns a global line index over all the
input files back into "file:line" for error messages.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import numpy as np

EXTENSIONS = (".jsonl", ".txt")


def input_files(input_path: str | os.PathLike) -> list[Path]:
    """The input files: one .jsonl/.txt file, or a folder's .jsonl files (else its .txt files), by name."""
    p = Path(input_path)
    if p.is_dir():
        for ext in EXTENSIONS:
            found = sorted(f for f in p.iterdir() if f.is_file() and f.suffix == ext)
            if found:
                return found
        raise FileNotFoundError(f"{p}: no .jsonl or .txt files in this folder (--input_path)")
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such file (--input_path)")
    if p.suffix not in EXTENSIONS:
        raise ValueError(f"{p}: --input_path must be a .jsonl or .txt file or a folder of them")
    return [p]


def read_lines(path: str | os.PathLike) -> Iterator[bytes]:
    """Lines as bytes, split like Python's text mode (\\n, \\r\\n and \\r end a line; ends become \\n)."""
    with open(path, "rb") as f:
        for raw in f:
            if b"\r" not in raw:
                yield raw
                continue
            text = raw.replace(b"\r\n", b"\n")
            parts = text.split(b"\r")
            for part in parts[:-1]:
                yield part + b"\n"
            if parts[-1]:
                yield parts[-1]


class Origins:
    """Maps a global line index (over all input files) back to "file:line" for error messages."""

    def __init__(self, files: list[Path]):
        self.files = [str(f) for f in files]
        self.starts: list[int] = []

    def add_file_start(self, start: int) -> None:
        self.starts.append(start)

    def where(self, index: int) -> str:
        k = int(np.searchsorted(self.starts, index, side="right")) - 1
        return f"{self.files[k]}:{index - self.starts[k] + 1}"

    def sort_key(self, where: str) -> tuple[int, int]:
        path, _, line = where.rpartition(":")
        return (self.files.index(path) if path in self.files else len(self.files), int(line or 0))


def iter_all_lines(files: list[Path], origins: Origins) -> Iterator[bytes]:
    n = 0
    for f in files:
        origins.add_file_start(n)
        for line in read_lines(f):
            n += 1
            yield line

