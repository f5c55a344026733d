"""Tokenize and pack each split into one .hdf5 file, in a pool of worker processes (or in this process
for one worker). Progress (lines, tokens) flows back through shared counters. Workers end with the main
process: one killed with SIGKILL leaves no worker behind."""
from __future__ import annotations

import multiprocessing as mp
import os
import sys
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np

from llamazoo.data.articles import ArticleBuilder, ArticleOptions, InputFormatError
from llamazoo.data.inputs import Origins, read_lines
from llamazoo.data.metrics import Metrics
from llamazoo.data.packing import Hdf5RowWriter, Packer, PackingConfig
from llamazoo.io.lifetime import end_with_parent

BATCH_LINES = 512


@dataclass
class TokenizeTask:
    source: str                   # lines to tokenize
    output: str                   # .hdf5 to write
    kind: str                     # train | dev | single
    idx_path: Optional[str]       # global line indexes of the lines (None: numbered 1.. in `source`)


@dataclass
class TokenizeResult:
    task: TokenizeTask
    metrics: Metrics
    errors: list[InputFormatError]


_WORKER: dict[str, Any] = {}


def _init_worker(hf: Any, article_options: ArticleOptions, packing: PackingConfig, max_seq_length: int,
                 ext: str, ignore_errors: bool, origins: Optional[Origins], counters: Any) -> None:
    if not callable(counters):  # one process per core already: no extra tokenizer threads
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORKER.update(builder=ArticleBuilder(hf, article_options), options=article_options, packing=packing,
                   L=max_seq_length, kind="txt" if ext == ".txt" else "jsonl", ignore=ignore_errors,
                   origins=origins, counters=counters,
                   pad=hf.pad_token_id if hf.pad_token_id is not None else hf.eos_token_id)


def _init_pool_worker(parent_pid: int, *args: Any) -> None:
    """A pool worker: first tied to the main process's life, then set up like the in-process worker."""
    end_with_parent(parent_pid)  # the pool starts its workers from the thread waiting on them
    _init_worker(*args)


def _count(counters: Any, lines: int, tokens: int) -> None:
    if counters is None:
        return
    if callable(counters):
        counters(lines, tokens)
        return
    with counters[0].get_lock():
        counters[0].value += lines
    with counters[1].get_lock():
        counters[1].value += tokens


def _decode(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputFormatError(where, f"not UTF-8 text (byte 0x{raw[e.start]:02x} at byte {e.start + 1} "
                                      "of the line)", raw.decode("utf-8", "replace")) from None


def tokenize_split(task: TokenizeTask) -> TokenizeResult:
    """Tokenize, pack and write one split; returns its metrics and (when ignoring them) its bad lines."""
    w = _WORKER
    builder: ArticleBuilder = w["builder"]
    opts: ArticleOptions = w["options"]
    metrics = Metrics()
    errors: list[InputFormatError] = [] if w["ignore"] else None  # type: ignore[assignment]
    categories = opts.category_to_id is not None
    packer = Packer(w["L"], w["pad"], w["packing"], categories, opts.keep_prompt_only_sequences, metrics)
    index = np.fromfile(task.idx_path, dtype=np.int64) if task.idx_path else None
    origins: Optional[Origins] = w["origins"]

    def where(i: int) -> str:
        if index is None or origins is None:
            return f"{task.source}:{i + 1}"
        return origins.where(int(index[i]))

    writer = Hdf5RowWriter(task.output, w["L"], categories, metrics)
    lines: list[str] = []
    wheres: list[str] = []

    def flush() -> None:
        bad_before = len(errors) if errors is not None else 0
        units, n_tokens = builder.build(lines, wheres, w["kind"], errors)
        bad = (len(errors) - bad_before) if errors is not None else 0
        metrics.input_tokens += n_tokens
        metrics.articles += len(lines) - bad
        for u in units:
            packer.add(u)
        writer.write(*packer.take())
        _count(w["counters"], len(lines), n_tokens)
        lines.clear()
        wheres.clear()

    try:
        for i, raw in enumerate(read_lines(task.source)):
            if not raw.strip():
                continue
            try:
                text = _decode(raw, where(i))
            except InputFormatError as e:
                if errors is None:
                    raise
                errors.append(e)
                continue
            lines.append(text)
            wheres.append(where(i))
            if len(lines) >= BATCH_LINES:
                flush()
        if lines:
            flush()
        packer.finish()
        writer.write(*packer.take())
    finally:
        writer.close()
    return TokenizeResult(task, metrics, errors or [])


def run_tasks(tasks: list[TokenizeTask], num_workers: int, init_args: tuple,
              on_progress: Optional[Callable[[int, int], None]] = None,
              bar: Any = None) -> list[TokenizeResult]:
    """Run tokenize_split over tasks: in this process for one worker, else in a pool of processes."""
    if num_workers <= 1 or len(tasks) <= 1:
        _init_worker(*init_args, on_progress)
        try:
            return [tokenize_split(t) for t in tasks]
        finally:
            _WORKER.clear()
    ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    counters = (ctx.Value("q", 0), ctx.Value("q", 0))
    results: dict[int, TokenizeResult] = {}
    seen = [0, 0]
    with ProcessPoolExecutor(max_workers=min(num_workers, len(tasks)), mp_context=ctx,
                             initializer=_init_pool_worker,
                             initargs=(os.getpid(), *init_args, counters)) as pool:
        futures = {pool.submit(tokenize_split, t): i for i, t in enumerate(tasks)}
        pending = set(futures)
        try:
            while pending:
                done, pending = wait(pending, timeout=0.25, return_when=FIRST_EXCEPTION)
                if on_progress is not None:
                    lines, tokens = counters[0].value, counters[1].value
                    on_progress(lines - seen[0], tokens - seen[1])
                    seen[:] = [lines, tokens]
                for f in done:
                    results[futures[f]] = f.result()  # raises the worker's error
        except BaseException:
            for f in pending:
                f.cancel()
            raise
    return [results[i] for i in range(len(tasks))]


def default_workers() -> int:
    """All the cores this process may use."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1

