"""`llamazoo prepare`: jsonl/txt -> shuffled, split, tokenized, packed, balanced .hdf5 files + metadata.

Stages: (1) read the input once as bytes and deal its lines to train/dev/test splits (round robin, a seeded
in-memory shuffle, or a seeded two-pass shuffle with bounded memory for inputs larger than RAM); (2) tokenize
and pack every train/dev split in a worker process, writing one .hdf5 each; (3) balance the row counts;
(4) write metadata.yaml, the tokenizer, logs and checksums. Everything is written into a hidden temporary
folder beside the output and renamed at the end, so an interrupted run never leaves a dataset that looks
complete (and the next run to the same place removes what a killed one left). The format and its rules are
in ../shared/docs/hdf5-format.md.

This module holds the options and the two entry points; the stages live in their own modules:
inputs.py (input files, lines, origins), splits.py (split counts and dealing the lines), tokenize_pool.py
(the tokenizing workers), balance.py (row counts), output.py (output check, checksums, bad-line log);
temporary names and renames are llamazoo.io.atomic's.
"""
from __future__ import annotations

import functools
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from llamazoo.data.articles import ArticleBuilder, ArticleOptions, InputFormatError
from llamazoo.data.balance import balance_hdf5_files, hdf5_rows
from llamazoo.data.inputs import Origins, input_files
from llamazoo.data.metrics import METADATA_KEYS, Metrics
from llamazoo.data.output import check_output_dir, write_checksums, write_failed_lines
from llamazoo.data.packing import PackingConfig
from llamazoo.data.splits import SHUFFLES, SplitWriters, deal, split_counts, split_layout
from llamazoo.data.tokenize_pool import TokenizeTask, default_workers, run_tasks
from llamazoo.io.atomic import remove_path, replace_path, temp_path_beside

LOG = logging.getLogger("llamazoo.prepare")


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

    tmp = temp_path_beside(target)
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
            total = deal(opt.shuffle, files, origins, writers, n, opt.seed, opt.shuffle_memory_mb, work)
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
            write_failed_lines(tmp / "json_load_failed_lines.log", errors, origins)
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
        remove_path(tmp)
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
    tmp = temp_path_beside(target)
    task = TokenizeTask(str(src), str(tmp), "single", None)
    bar = _make_bar(0, opt.progress)
    try:
        (result,) = run_tasks([task], 1, (tok.hf, article_options, packing, opt.max_seq_length, files[0].suffix,
                                          opt.ignore_input_format_error, None), on_progress=_progress_cb(bar))
        replace_path(tmp, target)
    except BaseException:
        remove_path(tmp)
        raise
    finally:
        bar.close()
    if result.errors:
        write_failed_lines(target.parent / "json_load_failed_lines.log", result.errors, None)
    out(result.metrics.table(f"{target.name} metrics"))
    return result.metrics
