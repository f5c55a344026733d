"""Reading a packed HDF5 dataset back for people: shapes, token-type counts and rows decoded with spans marked.

A row is shown as its runs of one token type: `<prompt>...</prompt>`, `<completion>...</completion>`,
`<sep>...</sep>` (an article separator, type 3) and `<pad xN/>` for N padding tokens, so a wrong space,
a missing EOS or a split article is visible at a glance.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from llamazoo.io.damaged import open_hdf5, reading
from llamazoo.io.yamlfile import read_yaml_mapping

TYPE_NAMES = {0: "prompt", 1: "completion", 2: "padding", 3: "sep"}
COLORS = {0: "\033[36m", 1: "\033[32m", 2: "\033[90m", 3: "\033[35m"}
RESET = "\033[0m"


def dataset_files(path: str | Path) -> list[Path]:
    """The .hdf5 files of a dataset folder (train then dev, by index) or the one file given."""
    p = Path(path)
    if p.is_file():
        return [p]
    if not p.is_dir():
        raise FileNotFoundError(f"{p}: no such file or folder")
    files = list(p.glob("*.hdf5"))
    if not files:
        raise FileNotFoundError(f"{p}: no .hdf5 files in this folder")

    def key(f: Path) -> tuple:
        m = re.match(r"(train|dev)_(\d+)_of_(\d+)$", f.stem)
        return (0 if m and m[1] == "train" else 1, int(m[2]) if m else 0, f.name)
    return sorted(files, key=key)


def spans(types: np.ndarray) -> list[tuple[int, int, int]]:
    """(type, start, end) runs of equal token type in a row."""
    out = []
    start = 0
    for i in range(1, len(types) + 1):
        if i == len(types) or types[i] != types[start]:
            out.append((int(types[start]), start, i))
            start = i
    return out


def render_row(ids: np.ndarray, types: np.ndarray, decode: Optional[Any], color: bool = False) -> str:
    """One row as text with its token-type runs marked."""
    parts = []
    for t, a, b in spans(types):
        if t == 2:
            body = f"<pad x{b - a}/>"
        else:
            text = decode(ids[a:b].tolist()) if decode is not None else " ".join(map(str, ids[a:b]))
            body = f"<{TYPE_NAMES.get(t, t)}>{text}</{TYPE_NAMES.get(t, t)}>"
        parts.append(f"{COLORS.get(t, '')}{body}{RESET}" if color else body)
    return "".join(parts)


def file_summary(path: Path) -> tuple[str, Any]:
    with open_hdf5(path) as f:
        with reading(path, "HDF5"):
            missing = [key for key in ("input_ids", "token_type_ids") if key not in f]
        if missing:
            raise ValueError(f"{path}: no {missing[0]!r} dataset; expected input_ids and token_type_ids")
        with reading(path, "HDF5"):
            ids = f["input_ids"]
            types = f["token_type_ids"][:]
        counts = np.bincount(types.ravel(), minlength=4) if types.size else np.zeros(4, dtype=int)
        extra = ", category_ids" if "category_ids" in f else ""
        text = (f"{path.name}: {ids.shape[0]} rows x {ids.shape[1]} tokens ({ids.dtype}{extra}); "
                + ", ".join(f"{TYPE_NAMES[i]} {int(counts[i])}" for i in range(4)))
        return text, ids.shape


def _load_decoder(path: Path, tokenizer: Optional[str]) -> Optional[Any]:
    from llamazoo.io.tokenizer import has_tokenizer, load_tokenizer_from_folder

    folder = Path(tokenizer) if tokenizer else (path if path.is_dir() else path.parent) / "tokenizer"
    if tokenizer is None and not (folder.is_dir() and has_tokenizer(folder)):
        return None
    tok = load_tokenizer_from_folder(folder)
    return tok.decode


def inspect_dataset(path: str | Path, rows: int = 2, start: int = 0, files: int = 1,
                    tokenizer: Optional[str] = None, color: bool = False) -> str:
    """A report on a dataset folder or one .hdf5 file (see the module docstring)."""
    p = Path(path)
    found = dataset_files(p)
    decode = _load_decoder(p, tokenizer)
    out = []
    meta = p / "metadata.yaml" if p.is_dir() else None
    if meta is not None and meta.is_file():
        m = read_yaml_mapping(meta)
        out.append(f"metadata: max_seq_length {m.get('max_seq_length')}, vocab_size {m.get('vocab_size')}, "
                   f"{m.get('number_of_training_files')} train / {m.get('number_of_dev_files')} dev / "
                   f"{m.get('number_of_test_files')} test files")
    if decode is None:
        out.append("(no tokenizer/ folder: rows shown as token ids; pass --tokenizer to decode)")
    for f in found:
        out.append(file_summary(f)[0])
    for f in found[:max(files, 0)]:
        with open_hdf5(f) as h, reading(f, "HDF5"):
            n = h["input_ids"].shape[0]
            picked = [(r, h["input_ids"][r], h["token_type_ids"][r]) for r in range(start, min(start + rows, n))]
        for r, ids, types in picked:
            out.append(f"\n--- {f.name} row {r} ---")
            out.append(render_row(ids, types, decode, color))
    return "\n".join(out)


def decode_rows(path: str | Path, decode: Any, rows: Sequence[int]) -> list[str]:
    """Rows of one .hdf5 file rendered with their spans marked (for tests and scripts)."""
    with open_hdf5(path) as h, reading(path, "HDF5"):
        picked = [(h["input_ids"][r], h["token_type_ids"][r]) for r in rows]
    return [render_row(ids, types, decode) for ids, types in picked]
