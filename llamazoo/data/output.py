"""The files of a prepared dataset folder besides the .hdf5s: the output check, checksums, bad lines."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from llamazoo.data.articles import InputFormatError
from llamazoo.data.inputs import Origins


def check_output_dir(out: Path, overwrite: bool) -> None:
    """--output_path must be a folder, empty unless --overwrite_output_path."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out}: --output_path exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out}: --output_path exists and is not empty; pass --overwrite_output_path "
                              "to replace it")


def write_checksums(folder: Path) -> None:
    """sha256/files_metadata.json: sha256, size and modified time of every file in the folder."""
    import hashlib

    entries = {}
    for p in sorted(folder.rglob("*")):
        if not p.is_file() or p.relative_to(folder).parts[0] == "sha256":
            continue
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        st = p.stat()
        entries[str(p.relative_to(folder))] = {"sha256": h.hexdigest(), "size": st.st_size,
                                              "modified_time": st.st_mtime}
    (folder / "sha256").mkdir(exist_ok=True)
    (folder / "sha256" / "files_metadata.json").write_text(json.dumps(entries, indent=2) + "\n")


def write_failed_lines(path: Path, errors: list[InputFormatError], origins: Optional[Origins]) -> None:
    """json_load_failed_lines.log: one "file:line: reason: text" line per skipped input line, in input order."""
    if origins is not None:
        errors = sorted(errors, key=lambda e: origins.sort_key(e.where))
    with open(path, "w", encoding="utf-8") as f:
        for e in errors:
            line = e.line.rstrip("\n")
            f.write(f"{e.where}: {e.reason}: {line[:500]}\n")
