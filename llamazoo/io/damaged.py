"""Files that are there but cannot be read as their format: truncated by a full disk or an interrupted copy,
overwritten, corrupt. Each format's reader runs its library calls inside `reading(path, format)`, which turns
whatever the library raises (SafetensorError, pickle, zip, struct, HDF5 errors...) into one `DamagedFileError`,
a ValueError that the CLI prints as one line:

    /path/model.safetensors: damaged or truncated safetensors file (Error while deserializing header: ...)

Missing files and permission problems pass through unchanged: they already name the file and say what is wrong.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

PASS_THROUGH = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


def reason_of(error: BaseException) -> str:
    """The first line of an error's message (its type name when it has none), at most 200 characters."""
    message = error.args[0] if isinstance(error, KeyError) and error.args else error  # str(KeyError) quotes it
    text = str(message).strip().splitlines()
    line = text[0].strip() if text else type(error).__name__
    return line if len(line) <= 200 else line[:197] + "..."


class DamagedFileError(ValueError):
    """`{path}: damaged or truncated {format} file ({reason})`."""

    def __init__(self, path: str | os.PathLike, fmt: str, reason: str | BaseException):
        self.path = Path(path)
        self.reason = reason_of(reason) if isinstance(reason, BaseException) else reason
        super().__init__(f"{self.path}: damaged or truncated {fmt} file ({self.reason})")


@contextmanager
def reading(path: str | os.PathLike, fmt: str) -> Iterator[None]:
    """Library errors raised inside the block become a DamagedFileError naming `path`. Keep the block to the
    library's reading calls: a ValueError of our own raised inside would be reported as damage too."""
    try:
        yield
    except (DamagedFileError, *PASS_THROUGH):
        raise
    except Exception as e:  # MemoryError included: a corrupt header can ask for any size
        raise DamagedFileError(path, fmt, e) from None


def open_hdf5(path: str | os.PathLike) -> Any:
    """h5py.File(path, "r"); a damaged or truncated file is one DamagedFileError (HDF5 checks the file's
    length against its superblock here). Read its datasets inside `reading(path, "HDF5")` too: a corrupt
    compressed chunk only fails when read."""
    import h5py

    with reading(path, "HDF5"):
        return h5py.File(path, "r")
