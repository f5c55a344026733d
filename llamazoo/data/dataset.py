"""Reading a prepared HDF5 folder (ours or generative_data_prep's) for training.

`PreparedDataset` checks the folder (metadata.yaml, file counts, max_seq_length) and gives random
access to rows of the train or dev split across all its files without loading them into memory.
`BatchSampler` decides which rows each step uses: a seeded permutation per epoch, split into global
batches and then into per-rank shares, with a tiny state (epoch, batches done) so that a resumed
run continues with exactly the next batch.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from llamazoo.io.damaged import open_hdf5, reading
from llamazoo.io.yamlfile import read_yaml_mapping

SPLIT_FILE = re.compile(r"^(train|dev)_(\d+)_of_(\d+)\.hdf5$")


def read_metadata(folder: Path) -> dict[str, Any]:
    meta_file = folder / "metadata.yaml"
    if not meta_file.is_file():
        raise FileNotFoundError(f"training.dataset: {folder} has no metadata.yaml; expected a folder written by "
                                "`llamazoo prepare` or generative_data_prep")
    return read_yaml_mapping(meta_file)


def split_files(folder: Path, split: str) -> list[Path]:
    """The `{split}_{i}_of_{N}.hdf5` files, matched on the file name (never the whole path)."""
    found = []
    for p in folder.iterdir():
        m = SPLIT_FILE.match(p.name)
        if m and m.group(1) == split:
            found.append((int(m.group(2)), int(m.group(3)), p))
    found.sort()
    if found:
        n = found[0][1]
        indices = [i for i, _, _ in found]
        if any(total != n for _, total, _ in found) or indices != list(range(1, n + 1)):
            raise ValueError(f"training.dataset: {folder} has an incomplete or mixed set of {split} files "
                             f"({', '.join(p.name for _, _, p in found[:5])}...); expected {split}_1_of_N ... {split}_N_of_N")
    return [p for _, _, p in found]


class HDF5Rows:
    """Rows (input_ids, token_type_ids) of several HDF5 files as one indexable collection."""

    def __init__(self, files: list[Path], max_seq_length: int):
        self.files = files
        self._handles: list[Any] = []
        counts = []
        for f in files:
            h = open_hdf5(f)
            with reading(f, "HDF5"):
                missing = [key for key in ("input_ids", "token_type_ids") if key not in h]
            if missing:
                raise ValueError(f"{f}: no {missing[0]!r} dataset; expected input_ids and token_type_ids")
            with reading(f, "HDF5"):
                ids, types = h["input_ids"], h["token_type_ids"]
            if ids.ndim != 2 or ids.shape != types.shape:
                raise ValueError(f"{f}: input_ids {ids.shape} and token_type_ids {types.shape} must be equal 2-D shapes")
            if ids.shape[0] and ids.shape[1] != max_seq_length:
                raise ValueError(f"{f}: rows have {ids.shape[1]} tokens but model.max_seq_length is {max_seq_length}")
            self._handles.append(h)
            counts.append(ids.shape[0])
        self.counts = counts
        self.offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.max_seq_length = max_seq_length

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def read(self, indices: list[int] | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows at global indices, in the given order: (input_ids, token_type_ids), int64 [n, L]."""
        indices = np.asarray(indices, dtype=np.int64)
        n = len(indices)
        ids = np.empty((n, self.max_seq_length), dtype=np.int64)
        types = np.empty((n, self.max_seq_length), dtype=np.int64)
        file_of = np.searchsorted(self.offsets, indices, side="right") - 1
        for f in np.unique(file_of):
            sel = np.nonzero(file_of == f)[0]
            local = indices[sel] - self.offsets[f]
            order = np.argsort(local, kind="stable")
            uniq, inverse = np.unique(local[order], return_inverse=True)  # h5py wants increasing, unique
            h = self._handles[f]
            with reading(self.files[f], "HDF5"):  # a corrupt compressed chunk fails only here
                got_ids = h["input_ids"][uniq.tolist()]
                got_types = h["token_type_ids"][uniq.tolist()]
            ids[sel[order]] = got_ids[inverse]
            types[sel[order]] = got_types[inverse]
        return torch.from_numpy(ids), torch.from_numpy(types)

    def close(self) -> None:
        for h in self._handles:
            try:
                h.close()
            except Exception:
                pass
        self._handles = []


class PreparedDataset:
    """A prepared folder: metadata checked, train rows for training, dev rows for evaluation."""

    def __init__(self, folder: str | Path, max_seq_length: int | None):
        folder = Path(folder)
        if not folder.exists():
            raise FileNotFoundError(f"training.dataset: {folder} does not exist; expected a folder written by "
                                    "`llamazoo prepare` or generative_data_prep")
        if not folder.is_dir():
            raise NotADirectoryError(f"training.dataset: {folder} is not a folder")
        self.folder = folder
        self.metadata = read_metadata(folder)
        meta_len = self.metadata.get("max_seq_length")
        if meta_len is None:
            raise ValueError(f"{folder / 'metadata.yaml'}: no max_seq_length")
        if max_seq_length is not None and int(meta_len) != int(max_seq_length):
            raise ValueError(f"model.max_seq_length is {max_seq_length} but the dataset {folder} was prepared with "
                             f"max_seq_length {meta_len} (metadata.yaml); they must be equal")
        self.max_seq_length = int(meta_len)
        self.train_files = split_files(folder, "train")
        self.dev_files = split_files(folder, "dev")
        if not self.train_files:
            raise FileNotFoundError(f"training.dataset: {folder} has no train_*_of_*.hdf5 files")
        expected = self.metadata.get("number_of_training_files")
        if expected is not None and int(expected) != len(self.train_files):
            raise ValueError(f"{folder}: metadata.yaml says number_of_training_files {expected} but "
                             f"{len(self.train_files)} train files are present")
        self.train = HDF5Rows(self.train_files, self.max_seq_length)
        if len(self.train) == 0:
            raise ValueError(f"training.dataset: the train files in {folder} hold no rows")
        self.dev = HDF5Rows(self.dev_files, self.max_seq_length) if self.dev_files else None

    @property
    def tokenizer_dir(self) -> Path | None:
        p = self.folder / "tokenizer"
        return p if p.is_dir() else None

    def close(self) -> None:
        self.train.close()
        if self.dev is not None:
            self.dev.close()


@dataclass
class SamplerState:
    seed: int
    epoch: int = 0
    batch_in_epoch: int = 0  # global batches of this epoch already handed out


class BatchSampler:
    """Seeded epoch permutations cut into global batches of `batch_size * world_size` rows.

    Rank r takes rows [r*b, (r+1)*b) of each global batch. The last batch of an epoch is kept
    (nothing is dropped); when an epoch's row count is not divisible by world_size, the
    permutation is topped up from its own start so every rank gets the same number of rows.
    The order of rows depends only on the seed and the epoch, so a resumed run (same batch size and
    world size) continues with exactly the next batch.
    """

    def __init__(self, num_rows: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        if batch_size < 1:
            raise ValueError(f"training.batch_size must be >= 1 (got {batch_size})")
        self.num_rows, self.batch_size, self.rank, self.world_size = num_rows, batch_size, rank, world_size
        self.global_batch = batch_size * world_size
        self.state = SamplerState(seed=seed)

    @property
    def batches_per_epoch(self) -> int:
        return -(-self.num_rows // self.global_batch)

    def epoch_order(self, epoch: int) -> np.ndarray:
        g = torch.Generator().manual_seed(self.state.seed * 100_003 + epoch)
        perm = torch.randperm(self.num_rows, generator=g).numpy()
        extra = (-len(perm)) % self.world_size
        return np.concatenate([perm, perm[:extra]]) if extra else perm

    def rows_for(self, epoch: int, batch: int) -> np.ndarray:
        """This rank's rows of one global batch."""
        order = self.epoch_order(epoch)
        chunk = order[batch * self.global_batch:(batch + 1) * self.global_batch]
        per_rank = len(chunk) // self.world_size
        return chunk[self.rank * per_rank:(self.rank + 1) * per_rank]

    def next(self) -> tuple[int, int, np.ndarray]:
        """(epoch, batch index, rows) of the next batch; advances the state."""
        s = self.state
        if s.batch_in_epoch >= self.batches_per_epoch:
            s.epoch, s.batch_in_epoch = s.epoch + 1, 0
        rows = self.rows_for(s.epoch, s.batch_in_epoch)
        out = (s.epoch, s.batch_in_epoch, rows)
        s.batch_in_epoch += 1
        return out

    def state_dict(self) -> dict[str, Any]:
        return {**asdict(self.state), "num_rows": self.num_rows, "global_batch": self.global_batch}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        if d.get("num_rows") != self.num_rows or d.get("global_batch") != self.global_batch:
            raise ValueError(f"cannot resume: the checkpoint was taken with {d.get('num_rows')} train rows and a global "
                             f"batch of {d.get('global_batch')}, this run has {self.num_rows} rows and "
                             f"{self.global_batch} (training.batch_size x data-parallel size)")
        self.state = SamplerState(seed=d["seed"], epoch=d["epoch"], batch_in_epoch=d["batch_in_epoch"])


def eval_batches(rows: HDF5Rows, batch_size: int, rank: int = 0,
                 world_size: int = 1) -> Iterator[tuple[np.ndarray, int]]:
    """(row indices, number of real rows) per dev batch; each rank takes a strided share and every
    row is used once. All ranks get the same number of full batches (short ones are filled with row
    0, to be ignored) so that collective operations inside the model stay in step."""
    mine = np.arange(rank, len(rows), world_size)
    per_rank = -(-len(rows) // world_size)
    for i in range(0, per_rank, batch_size):
        chunk = mine[i:i + batch_size]
        n = len(chunk)
        size = min(batch_size, per_rank - i)
        if n < size:
            chunk = np.concatenate([chunk, np.zeros(size - n, dtype=chunk.dtype)])
        yield chunk, n


__all__ = ["PreparedDataset", "HDF5Rows", "BatchSampler", "SamplerState", "eval_batches", "read_metadata",
           "split_files"]
