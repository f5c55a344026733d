"""`llamazoo prepare`: jsonl/txt -> shuffled, split, tokenized, packed, balanced .hdf5 files + metadata.

Stages: (1) read the input once as bytes and deal its lines to train/dev/test splits (round robin, a seeded
in-memory shuffle, or a seeded two-pass shuffle with bounded memory for inputs larger than RAM); (2) tokenize
and pack every train/dev split in a worker process, writing one .hdf5 each; (3) balance the row counts;
(4) write metadata.yaml, the tokenizer, logs and checksums. Everything is written into a hidden temporary
folder beside the output and renamed at the end, so an interrupted run never leaves a dataset that looks
complete. The format and its rules are in ../shared/docs/hdf5-format.md.
"""
from __future__ import annotations

import functools
import json
import logging
import math
import multiprocessing as mp
import os
import shutil
import sys
import time
from array import array
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np

from llamazoo.data.articles import ArticleBuilder, ArticleOptions, InputFormatError
from llamazoo.data.metrics import METADATA_KEYS, Metrics
from llamazoo.data.packing import Hdf5RowWriter, Packer, PackingConfig

LOG = logging.getLogger("llamazoo.prepare")
EXTENSIONS = (".jsonl", ".txt")
SHUFFLES = ("False", "on_RAM", "large_file")
BATCH_LINES = 512
GB = 1024 ** 3


@dataclass
class PrepareOptions:
    """Every flag of `llamazoo prepare` (generative_data_prep's names and meanings, plus `seed`)."""

    input_path: str
    output_path: str
    pretrained_tokenizer: str = "default"
    max_seq_length: int = 2048
    input_packing_config: str = "full"
    packing_boundary: str = "jsonl"
    attention_boundary: str = "jsonl"
    prompt_keyword: str = "prompt"
    completion_keyword: str = "completion"
    apply_chat_template: bool = False
    prompt_prefix: Optional[str] = None
    prompt_postfix: Optional[str] = None
    disable_space_separator: bool = False
    keep_prompt_only_sequences: bool = False
    categories_path: Optional[str] = None
    shuffle: str = "False"
    seed: int = 0
    shuffle_memory_mb: Optional[float] = None
    num_training_splits: Optional[int] = None
    dev_ratio: Optional[float] = None
    test_ratio: Optional[float] = None
    num_dev_splits: Optional[int] = None
    num_test_splits: Optional[int] = None
    do_not_balance_hdf5: bool = False
    keep_split_jsonls: bool = False
    num_workers: Optional[int] = None
    ignore_input_format_error: bool = False
    overwrite_output_path: bool = False
    progress: Optional[bool] = None   # None: a progress bar only on a terminal

    def article_options(self, category_to_id: Optional[dict[str, int]]) -> ArticleOptions:
        return ArticleOptions(self.prompt_keyword, self.completion_keyword, self.disable_space_separator,
                              self.keep_prompt_only_sequences, self.prompt_prefix, self.prompt_postfix,
                              self.packing_boundary, self.attention_boundary, self.apply_chat_template,
                              category_to_id)


@dataclass
class PrepareResult:
    output_path: Path
    train: Metrics
    dev: Metrics
    metadata: dict[str, Any]
    failed_lines: int = 0
    files: list[Path] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------
# input
# ----------------------------------------------------------------------------------------------
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


# ----------------------------------------------------------------------------------------------
# splits
# ----------------------------------------------------------------------------------------------
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


# ----------------------------------------------------------------------------------------------
# tokenize + pack one split (runs in worker processes)
# ----------------------------------------------------------------------------------------------
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
    packer = Packer(w["L"], w["pad"], w["packing"], categories)
    index = np.fromfile(task.idx_path, dtype=np.int64) if task.idx_path else None
    origins: Optional[Origins] = w["origins"]

    def where(i: int) -> str:
        if index is None or origins is None:
            return f"{task.source}:{i + 1}"
        return origins.where(int(index[i]))

    writer = Hdf5RowWriter(task.output, w["L"], categories, opts.keep_prompt_only_sequences, metrics)
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
    metrics.tokens_dropped_from_packing = packer.tokens_dropped
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
                             initializer=_init_worker, initargs=(*init_args, counters)) as pool:
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


# ----------------------------------------------------------------------------------------------
# balance
# ----------------------------------------------------------------------------------------------
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


# ----------------------------------------------------------------------------------------------
# output folder helpers
# ----------------------------------------------------------------------------------------------
def check_output_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out}: --output_path exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out}: --output_path exists and is not empty; pass --overwrite_output_path "
                              "to replace it")


def temp_dir_beside(target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.incomplete-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()
    return tmp


def replace_path(tmp: Path, target: Path) -> None:
    """Move the finished `tmp` to `target`, replacing what is there (a folder or a file)."""
    old = None
    if target.exists():
        old = target.parent / f".{target.name}.old-{os.getpid()}"
        target.rename(old)
    tmp.rename(target)
    if old is not None:
        shutil.rmtree(old) if old.is_dir() else old.unlink()


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


def load_categories(path: Optional[str]) -> Optional[dict[str, int]]:
    """--categories_path: a .json file with a list of category names; ids are their positions."""
    if path is None:
        return None
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such file (--categories_path)")
    if p.suffix != ".json":
        raise ValueError(f"{p}: --categories_path must be a .json file holding a list of category names")
    try:
        names = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{p}:{e.lineno}: --categories_path is not valid JSON ({e.msg})") from None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"{p}: --categories_path must hold a JSON list of category names (strings)")
    if len(set(names)) != len(names):
        raise ValueError(f"{p}: --categories_path lists a category twice")
    return {n: i for i, n in enumerate(names)}


@functools.lru_cache(maxsize=4)
def load_tokenizer_and_type(name: str) -> tuple[Any, str, Any]:
    """(Tokenizer, tokenizer_model_type for metadata.yaml, model config or None); cached per process."""
    from llamazoo.io.default import resolve_checkpoint
    from llamazoo.io.tokenizer import load_tokenizer_from_folder

    folder = resolve_checkpoint(name, need_weights=False)
    tok = load_tokenizer_from_folder(folder)
    config = None
    if (Path(folder) / "config.json").is_file():
        try:
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(folder)
        except Exception:  # a config transformers cannot read only loses the model type
            config = None
    model_type = str(type(config)) if config is not None else str(type(tok.hf))
    return tok, model_type, config


def _make_bar(total: int, enabled: Optional[bool]) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, unit=" lines", desc="tokenizing", disable=(None if enabled is None else not enabled),
                dynamic_ncols=True, smoothing=0.1)


def _progress_cb(bar: Any) -> Callable[[int, int], None]:
    state = {"tokens": 0, "t0": time.perf_counter()}

    def cb(lines: int, tokens: int) -> None:
        state["tokens"] += tokens
        dt = max(time.perf_counter() - state["t0"], 1e-9)
        bar.update(lines)
        bar.set_postfix_str(f"{state['tokens'] / dt:,.0f} tokens/s", refresh=False)
    return cb


def _setup_log(path: Path) -> logging.Handler:
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    LOG.addHandler(handler)
    LOG.setLevel(logging.INFO)
    LOG.propagate = False
    return handler


def _write_failed_lines(path: Path, errors: list[InputFormatError], origins: Optional[Origins]) -> None:
    if origins is not None:
        errors = sorted(errors, key=lambda e: origins.sort_key(e.where))
    with open(path, "w", encoding="utf-8") as f:
        for e in errors:
            line = e.line.rstrip("\n")
            f.write(f"{e.where}: {e.reason}: {line[:500]}\n")


# ----------------------------------------------------------------------------------------------
# the two entry points
# ----------------------------------------------------------------------------------------------
def prepare(opt: PrepareOptions, out: Callable[[str], None] = print) -> PrepareResult:
    """The full pipeline into the folder `opt.output_path` (see the module docstring)."""
    if opt.shuffle not in SHUFFLES:
        raise ValueError(f"--shuffle must be one of {', '.join(SHUFFLES)}, got {opt.shuffle!r}")
    packing = PackingConfig.parse(opt.input_packing_config)
    if opt.max_seq_length < 1:
        raise ValueError(f"--max_seq_length must be at least 1, got {opt.max_seq_length}")
    files = input_files(opt.input_path)
    ext = files[0].suffix
    input_bytes = sum(f.stat().st_size for f in files)
    train_n, dev_n, test_n = split_counts(input_bytes, opt.num_training_splits, opt.num_dev_splits,
                                          opt.num_test_splits, opt.dev_ratio, opt.test_ratio)
    n = train_n + dev_n + test_n
    category_to_id = load_categories(opt.categories_path)
    target = Path(opt.output_path)
    check_output_dir(target, opt.overwrite_output_path)
    tok, model_type, config = load_tokenizer_and_type(opt.pretrained_tokenizer)
    article_options = opt.article_options(category_to_id)
    ArticleBuilder(tok.hf, article_options)  # checks the boundaries and the chat template before any work
    num_workers = opt.num_workers if opt.num_workers is not None else default_workers()
    if num_workers < 1:
        raise ValueError(f"--num_workers must be at least 1, got {num_workers}")

    tmp = temp_dir_beside(target)
    tmp.mkdir()
    handler = _setup_log(tmp / "logs.log")
    t_start = time.perf_counter()
    try:
        LOG.info("llamazoo prepare: %s", json.dumps({k: v for k, v in vars(opt).items()}, default=str))
        LOG.info("input: %d file(s), %.2f MB; splits: %d train, %d dev, %d test", len(files),
                 input_bytes / 2**20, train_n, dev_n, test_n)
        if input_bytes == 0:
            raise ValueError(f"{opt.input_path}: the input is empty (--input_path)")
        work = tmp / ".work"
        work.mkdir()
        split_dir = (tmp / "splits") if opt.keep_split_jsonls else (work / "splits")
        layout = split_layout(train_n, dev_n, test_n)
        writers = SplitWriters(layout, ext, split_dir, tmp / "test_files", work)
        origins = Origins(files)
        t0 = time.perf_counter()
        try:
            if opt.shuffle == "False":
                LOG.warning("--shuffle=False: lines are dealt to the splits in turn, without shuffling")
                total = deal_round_robin(files, origins, writers, n)
            elif opt.shuffle == "on_RAM":
                if input_bytes * 2 > _available_memory():
                    raise ValueError(f"--shuffle=on_RAM needs about {2 * input_bytes / 2**30:.1f} GB of free "
                                     "memory for this input; use --shuffle=large_file")
                total = deal_on_ram(files, origins, writers, n, opt.seed)
            else:
                budget = (opt.shuffle_memory_mb * 2**20 if opt.shuffle_memory_mb
                          else _available_memory() // 4)
                total = deal_large_file(files, origins, writers, n, opt.seed, int(budget), work)
        finally:
            writers.close()
        LOG.info("dealt %d lines to %d splits in %.2fs (shuffle=%s, seed=%d)", total, n,
                 time.perf_counter() - t0, opt.shuffle, opt.seed)
        if total == 0:
            raise ValueError(f"{opt.input_path}: the input has no lines (--input_path)")
        if total < n:
            raise ValueError(f"{opt.input_path}: {total} lines are fewer than the {n} splits asked for "
                             f"({train_n} train + {dev_n} dev + {test_n} test); lower --num_training_splits "
                             "(or the dev/test splits) or add lines")
        tasks = [TokenizeTask(str(writers.paths[i]), str(tmp / f"{s.name}.hdf5"), s.kind,
                              str(writers.idx_paths[i])) for i, s in enumerate(layout) if s.kind != "test"]
        bar = _make_bar(sum(c for c, s in zip(writers.counts, layout) if s.kind != "test"), opt.progress)
        t0 = time.perf_counter()
        try:
            results = run_tasks(tasks, num_workers, (tok.hf, article_options, packing, opt.max_seq_length, ext,
                                                     opt.ignore_input_format_error, origins),
                                on_progress=_progress_cb(bar))
        finally:
            bar.close()
        LOG.info("tokenized %d splits with %d worker(s) in %.2fs", len(tasks), num_workers,
                 time.perf_counter() - t0)
        train_m, dev_m = Metrics(), Metrics()
        errors: list[InputFormatError] = []
        for r in results:
            (train_m if r.task.kind == "train" else dev_m).__iadd__(r.metrics)
            errors += r.errors
        if errors:
            _write_failed_lines(tmp / "json_load_failed_lines.log", errors, origins)
            LOG.warning("skipped %d bad input lines (--ignore_input_format_error); listed in "
                        "json_load_failed_lines.log", len(errors))
        train_files = [Path(t.output) for t in tasks if t.kind == "train"]
        dev_files = [Path(t.output) for t in tasks if t.kind == "dev"]
        if opt.do_not_balance_hdf5:
            LOG.warning("--do_not_balance_hdf5: files keep unequal row counts")
        else:
            balance_hdf5_files(train_files)
            balance_hdf5_files(dev_files)
        metadata: dict[str, Any] = {
            "max_seq_length": opt.max_seq_length,
            "token_type_ids": True,
            "vocab_size": int(tok.hf.vocab_size),
            "tokenizer_model_type": model_type,
            "number_of_training_files": train_n,
            "number_of_dev_files": dev_n,
            "number_of_test_files": test_n,
            "max_batch_size_train": min(hdf5_rows(p) for p in train_files),
            "max_batch_size_dev": min(hdf5_rows(p) for p in dev_files) if dev_files else None,
        }
        for prefix, m, present in (("train", train_m, True), ("dev", dev_m, bool(dev_files))):
            if present:
                metadata.update({f"{prefix}_{k}": getattr(m, k) for k in METADATA_KEYS})
        import yaml

        (tmp / "metadata.yaml").write_text(yaml.safe_dump(metadata, default_flow_style=False, sort_keys=True))
        tok.save(tmp / "tokenizer")
        if config is not None:
            config.to_json_file(str(tmp / "tokenizer" / "config.json"))
        if category_to_id is not None:
            (tmp / "category_to_id.json").write_text(json.dumps(category_to_id))
        shutil.rmtree(work)
        for title, m in (("train", train_m), ("dev", dev_m)):
            if title == "dev" and not dev_files:
                continue
            table = m.table(f"{title} metrics")
            out(table)
            LOG.info("%s metrics\n%s", title, table)
        LOG.info("done in %.2fs; dataset at %s", time.perf_counter() - t_start, target)
        handler.close()
        LOG.removeHandler(handler)
        write_checksums(tmp)
        replace_path(tmp, target)
    except BaseException:
        handler.close()
        LOG.removeHandler(handler)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    written = sorted(p for p in target.rglob("*") if p.is_file())
    return PrepareResult(target, train_m, dev_m, metadata, len(errors), written)


def prepare_single_file(opt: PrepareOptions, out: Callable[[str], None] = print) -> Metrics:
    """The original's `data_prep`: one .jsonl/.txt file -> one .hdf5 file, no split, shuffle or balance.

    Bad lines skipped with --ignore_input_format_error are listed in json_load_failed_lines.log beside it.
    """
    packing = PackingConfig.parse(opt.input_packing_config)
    if opt.max_seq_length < 1:
        raise ValueError(f"--max_seq_length must be at least 1, got {opt.max_seq_length}")
    src = Path(opt.input_path)
    if src.is_dir():
        raise IsADirectoryError(f"{src}: single-file mode takes one .jsonl or .txt file (--input_path)")
    files = input_files(src)
    target = Path(opt.output_path)
    if target.suffix != ".hdf5":
        raise ValueError(f"{target}: in single-file mode --output_path must name an .hdf5 file")
    if target.exists() and not opt.overwrite_output_path:
        raise FileExistsError(f"{target}: --output_path exists; pass --overwrite_output_path to replace it")
    if files[0].stat().st_size == 0:
        raise ValueError(f"{src}: the input is empty (--input_path)")
    category_to_id = load_categories(opt.categories_path)
    tok, _, _ = load_tokenizer_and_type(opt.pretrained_tokenizer)
    article_options = opt.article_options(category_to_id)
    ArticleBuilder(tok.hf, article_options)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.incomplete-{os.getpid()}"
    task = TokenizeTask(str(src), str(tmp), "single", None)
    bar = _make_bar(0, opt.progress)
    try:
        (result,) = run_tasks([task], 1, (tok.hf, article_options, packing, opt.max_seq_length, files[0].suffix,
                                          opt.ignore_input_format_error, None), on_progress=_progress_cb(bar))
        replace_path(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        bar.close()
    if result.errors:
        _write_failed_lines(target.parent / "json_load_failed_lines.log", result.errors, None)
    out(result.metrics.table(f"{target.name} metrics"))
    return result.metrics


def default_workers() -> int:
    """All the cores this process may use."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _available_memory() -> int:
    import psutil

    return int(psutil.virtual_memory().available)
