"""Evening out the row counts of a dataset's .hdf5 files (generative_data_prep's balancing rule)."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def balance_hdf5_files(paths: list[Path]) -> None:
    """Give every file total // n rows (the first total % n files one more), moving tail rows in order.

    Files above their share keep their first rows and send the rest to a pool (in file order); files below
    take rows from the front of the pool, appended at their end. This is the original's rule exactly.
    """
    import h5py

    if not paths:
        return
    sizes = []
    for p in paths:
        with h5py.File(p, "r") as f:
            sizes.append(f["input_ids"].shape[0])
    total = sum(sizes)
    avg, rem = divmod(total, len(paths))
    targets = []
    for _ in paths:
        targets.append(avg + (1 if rem > 0 else 0))
        rem -= 1 if rem > 0 else 0
    pool: dict[str, list[np.ndarray]] = {}
    for p, size, target in zip(paths, sizes, targets):
        if size <= target:
            continue
        with h5py.File(p, "r+") as f:
            for name in f.keys():
                ds = f[name]
                pool.setdefault(name, []).append(ds[target:])
                ds.resize((target, ds.shape[1]))
    if not pool:
        return
    arrays = {name: np.concatenate(parts) for name, parts in pool.items()}
    used = 0
    for p, size, target in zip(paths, sizes, targets):
        if size >= target:
            continue
        need = target - size
        with h5py.File(p, "r+") as f:
            for name, arr in arrays.items():
                ds = f[name]
                ds.resize((target, ds.shape[1]))
                ds[size:] = arr[used:used + need]
        used += need


def hdf5_rows(path: Path) -> int:
    import h5py

    with h5py.File(path, "r") as f:
        return int(f["input_ids"].shape[0])
