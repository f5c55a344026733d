"""Packing units into rows of exactly max_seq_length tokens, and writing the rows to an .hdf5 file.

The rules are generative_data_prep's (../shared/docs/hdf5-format.md): `full` streams tokens across rows;
`greedy::X` closes the current row when a unit does not fit (even when that unit is then dropped);
`single::X` gives every unit its own row. X says what happens to a unit longer than a row. Then a row
without completion tokens is dropped unless --keep_prompt_only_sequences. Rows are built as numpy blocks
so the per-token work stays out of Python loops.

Both rules report what they take in the metrics: tokens as the original does, and turns (pairs with a
prompt, each one run of type-0 tokens) of which no prompt token is left, so no turn vanishes unreported.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

import numpy as np

from llamazoo.data.articles import COMPLETION, PADDING, PROMPT, SEP, Unit
from llamazoo.data.metrics import Metrics

STYLES = ("full", "greedy", "single")
OVERFLOWS = ("drop", "truncate_left", "truncate_right")
PACKING_CHOICES = ("full",) + tuple(f"{s}::{o}" for s in ("greedy", "single") for o in OVERFLOWS)


@dataclass(frozen=True)
class PackingConfig:
    """`full`, or `greedy::X` / `single::X` with X in drop, truncate_left, truncate_right."""

    style: str = "full"
    overflow: Optional[str] = None

    @classmethod
    def parse(cls, text: str) -> "PackingConfig":
        style, _, overflow = str(text).partition("::")
        if str(text) not in PACKING_CHOICES:
            raise ValueError(f"--input_packing_config must be one of {', '.join(PACKING_CHOICES)}, got {text!r}")
        return cls(style, overflow or None)

    def __str__(self) -> str:
        return self.style if self.overflow is None else f"{self.style}::{self.overflow}"


def _runs_inside(types: list[int], lo: int, hi: int) -> int:
    """Runs of prompt tokens lying wholly in types[lo:hi]."""
    n, i = 0, lo
    while i < hi:
        if types[i] == PROMPT and (i == 0 or types[i - 1] != PROMPT):
            j = i
            while j < len(types) and types[j] == PROMPT:
                j += 1
            n += j <= hi
            i = j
        else:
            i += 1
    return n


class Packer:
    """Stateful packer: `add` units, `finish` at the end of the file, `take` the completed rows.

    Counts into `metrics`: turns, tokens and turns dropped by the overflow rule and by the prompt-only
    rule (rows without completion tokens, and the pairs with empty completions the builder left out).
    """

    FLUSH_ROWS = 256

    def __init__(self, max_seq_length: int, pad_id: int, config: PackingConfig, categories: bool = False,
                 keep_prompt_only: bool = True, metrics: Optional[Metrics] = None):
        if max_seq_length < 1:
            raise ValueError(f"--max_seq_length must be at least 1, got {max_seq_length}")
        self.L = max_seq_length
        self.pad = pad_id
        self.cfg = config
        self.categories = categories
        self.keep_prompt_only = keep_prompt_only
        self.metrics = metrics if metrics is not None else Metrics()
        self._finished = False
        # `full` only: a prompt run that continues past the rows taken so far: has a token of it been kept?
        self._open_prompt: Optional[bool] = None
        self._ids: list[int] = []
        self._types: list[int] = []
        self._cats: list[int] = []
        self._rows: list[tuple[list[int], list[int], list[int]]] = []
        self._blocks: list[tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]] = []

    # -- rows ---------------------------------------------------------------------------------
    def _emit(self, ids: list[int], types: list[int], cats: list[int]) -> None:
        n = self.L - len(ids)
        self._rows.append((ids + [self.pad] * n, types + [PADDING] * n, cats + [-1] * n))
        if len(self._rows) >= self.FLUSH_ROWS:
            self._flush_rows()

    def _flush_rows(self) -> None:
        if not self._rows:
            return
        ids = np.array([r[0] for r in self._rows], dtype=np.int32)
        types = np.array([r[1] for r in self._rows], dtype=np.int32)
        cats = np.array([r[2] for r in self._rows], dtype=np.int32) if self.categories else None
        self._blocks.append((ids, types, cats))
        self._rows = []

    def _flush_full(self, final: bool) -> None:
        k = len(self._ids) // self.L
        if k:
            n = k * self.L
            cats = np.array(self._cats[:n], dtype=np.int32).reshape(k, self.L) if self.categories else None
            self._blocks.append((np.array(self._ids[:n], dtype=np.int32).reshape(k, self.L),
                                 np.array(self._types[:n], dtype=np.int32).reshape(k, self.L), cats))
            del self._ids[:n], self._types[:n], self._cats[:n]
        if final and self._ids:
            self._emit(self._ids, self._types, self._cats)
            self._ids, self._types, self._cats = [], [], []

    @property
    def tokens_dropped(self) -> int:
        return self.metrics.tokens_dropped_from_packing

    def _fit(self, u: Unit) -> Unit:
        """Apply the overflow rule to a unit that starts an empty row."""
        over = len(u) - self.L
        if over <= 0:
            return u
        m = self.metrics
        if self.cfg.overflow == "drop":
            m.tokens_dropped_from_packing += len(u)
            m.turns_dropped_from_packing += u.turns
            return Unit()
        m.tokens_dropped_from_packing += over
        if self.cfg.overflow == "truncate_left":
            lost = _runs_inside(u.types, 0, over)
            kept = Unit(u.ids[over:], u.types[over:], u.cats[over:], turns=u.turns - lost)
        else:
            lost = _runs_inside(u.types, self.L, len(u))
            kept = Unit(u.ids[:self.L], u.types[:self.L], u.cats[:self.L], turns=u.turns - lost)
        m.turns_dropped_from_packing += lost
        return kept

    def _drop_prompt_only_rows(self, ids: np.ndarray, types: np.ndarray, cats: Optional[np.ndarray]
                               ) -> tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]:
        """The prompt-only rule: rows without a completion token go; so do the turns whose every prompt
        token was in them (with `full` packing a prompt run can go on across rows, and over takes)."""
        keep = (types == COMPLETION).any(axis=1)
        prompt = types == PROMPT
        m = self.metrics
        if self.cfg.style != "full":  # rows are independent: a run never crosses a row
            start = prompt.copy()
            start[:, 1:] &= ~prompt[:, :-1]
            m.turns_dropped_from_all_prompt += int(start[~keep].sum())
        elif len(types):
            t = prompt.ravel()
            start = t.copy()
            start[1:] &= ~t[:-1]
            carry, self._open_prompt = self._open_prompt, None
            continues = carry is not None and bool(t[0])
            if carry is not None and not continues:
                m.turns_dropped_from_all_prompt += not carry
            start[0] &= not continues
            run = np.cumsum(start)  # 1.. for runs that start here; 0 for the one continuing from before
            kept_any = np.bincount(run[t], weights=np.repeat(keep, self.L)[t], minlength=int(run[-1]) + 1) > 0
            present = np.ones(len(kept_any), dtype=bool)
            present[0] = continues
            kept_any[0] |= bool(carry)
            if t[-1]:  # the last run goes on in the next rows
                self._open_prompt = bool(kept_any[run[-1]])
                present[run[-1]] = False
            m.turns_dropped_from_all_prompt += int((present & ~kept_any).sum())
        if self._finished and self._open_prompt is not None:
            m.turns_dropped_from_all_prompt += not self._open_prompt
            self._open_prompt = None
        if keep.all():
            return ids, types, cats
        m.tokens_dropped_from_all_prompt += int((~keep).sum()) * self.L
        return ids[keep], types[keep], (cats[keep] if cats is not None else None)

    # -- public -------------------------------------------------------------------------------
    def add(self, units: Iterable[Unit]) -> None:
        style = self.cfg.style
        m = self.metrics
        for u in units:
            if u.skipped_turns or u.skipped_tokens:
                m.turns += u.skipped_turns
                m.turns_dropped_from_all_prompt += u.skipped_turns
                m.tokens_dropped_from_all_prompt += u.skipped_tokens
            m.turns += u.turns
            if style == "full":
                self._ids += u.ids
                self._types += u.types
                self._cats += u.cats
                if len(self._ids) >= self.L * self.FLUSH_ROWS:
                    self._flush_full(False)
            elif style == "greedy":
                if len(self._ids) + len(u) <= self.L:
                    self._ids += u.ids
                    self._types += u.types
                    self._cats += u.cats
                    continue
                if self._ids:
                    self._emit(self._ids, self._types, self._cats)
                u = self._fit(u)
                self._ids, self._types, self._cats = list(u.ids), list(u.types), list(u.cats)
            else:  # single
                u = self._fit(u)
                if len(u):
                    self._emit(list(u.ids), list(u.types), list(u.cats))

    def finish(self) -> None:
        self._finished = True
        if self.cfg.style == "full":
            self._flush_full(True)
        elif self._ids:
            self._emit(self._ids, self._types, self._cats)
            self._ids, self._types, self._cats = [], [], []
        self._flush_rows()

    def take(self) -> tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]:
        """The rows completed so far, as (input_ids, token_type_ids, category_ids or None), without the
        prompt-only rows unless keep_prompt_only."""
        if self.cfg.style == "full":
            self._flush_full(False)
        self._flush_rows()
        blocks, self._blocks = self._blocks, []
        if not blocks:
            empty = np.zeros((0, self.L), dtype=np.int32)
            ids, types, cats = empty, empty.copy(), (empty.copy() if self.categories else None)
        else:
            ids = np.concatenate([b[0] for b in blocks])
            types = np.concatenate([b[1] for b in blocks])
            cats = np.concatenate([b[2] for b in blocks]) if self.categories else None
        if self.keep_prompt_only:
            return ids, types, cats
        return self._drop_prompt_only_rows(ids, types, cats)


class Hdf5RowWriter:
    """Appends rows to an .hdf5 file in the original's layout and counts them in the metrics.

    Datasets `input_ids`, `token_type_ids` (and `category_ids`): int32, (rows, L), resizable along axis 0,
    gzip-compressed and chunked. They exist even when a file gets no rows, so every file can be read.
    """

    def __init__(self, path: str | Path, max_seq_length: int, categories: bool, metrics: Metrics):
        import h5py

        self.L = max_seq_length
        self.metrics = metrics
        self.file = h5py.File(path, "w")
        chunk_rows = max(1, min(1024, (1 << 20) // (4 * max_seq_length)))
        names = ["input_ids", "token_type_ids"] + (["category_ids"] if categories else [])
        self.datasets = [self.file.create_dataset(n, shape=(0, max_seq_length), maxshape=(None, max_seq_length),
                                                  dtype="i4", chunks=(chunk_rows, max_seq_length),
                                                  compression="gzip") for n in names]

    def write(self, ids: np.ndarray, types: np.ndarray, cats: Optional[np.ndarray]) -> None:
        if not len(ids):
            return
        m = self.metrics
        counts = np.bincount(types.ravel(), minlength=4)
        m.sequences += len(ids)
        m.output_tokens += ids.size
        m.prompt_tokens += int(counts[PROMPT])
        m.completion_tokens += int(counts[COMPLETION] + counts[SEP])
        m.padding_tokens += int(counts[PADDING])
        arrays = [ids, types] + ([cats] if cats is not None else [])
        start = self.datasets[0].shape[0]
        for ds, arr in zip(self.datasets, arrays):
            ds.resize((start + len(arr), self.L))
            ds[start:] = arr

    def close(self) -> None:
        self.file.close()
