"""`llamazoo eval perplexity`: the mean negative log-likelihood per token of held-out text or prepared data.

Text (.txt: one document; .jsonl: one per line) is tokenized document by document with the tokenizer's
defaults (a BOS where it adds one) and cut into windows of max_seq_length tokens starting every stride
tokens, as in transformers' perplexity guide: every token after a document's first is scored exactly
once, by the first window that holds it with some context before it (the first window scores all its
tokens but the first, each later one its last tokens beyond the previous window's end). A prepared HDF5
folder (or one .hdf5 file) is scored row by row with the training loss's rules and weights
(llamazoo.data.masks, llamazoo.training.evaluate). Under torchrun each process scores a strided share of
the windows (rows) and the sums are added up.
"""
from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from llamazoo.config import EvalConfig, GenerateConfig, GenerationSection
from llamazoo.evaluation.scoring import Group, score_groups

TEXT_SUFFIXES = (".txt", ".jsonl")


# -- documents -----------------------------------------------------------------------------------------
def read_documents(path: Path) -> list[str]:
    """A .txt file is one document; a .jsonl file has one per line: its `text`, or `prompt` + `completion`."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise FileNotFoundError(f"eval.input: cannot read {path}: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise ValueError(f"{path}:{line}: not UTF-8 text") from None
    if path.suffix == ".txt":
        return [text] if text else []
    docs = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not JSON ({e.msg}); expected one object per line") from None
        if isinstance(obj, dict) and isinstance(obj.get("text"), str):
            docs.append(obj["text"])
        elif isinstance(obj, dict) and isinstance(obj.get("prompt"), str) and isinstance(obj.get("completion"), str):
            docs.append(obj["prompt"] + obj["completion"])
        else:
            raise ValueError(f"{path}:{n}: expected a JSON object with a \"text\" string, or \"prompt\" and "
                             f"\"completion\" strings")
    return docs


def windows(n_tokens: int, max_len: int, stride: int) -> list[tuple[int, int, int]]:
    """(start, end, first scored) token indices of a document's windows: windows start every `stride`
    tokens, hold at most `max_len`, and score [first scored, end), the tokens no earlier window scored
    (the first window: all but the document's first token)."""
    out = []
    start, prev_end = 0, 0
    while n_tokens > 1:
        end = min(start + max_len, n_tokens)
        out.append((start, end, max(prev_end, start + 1)))
        prev_end = end
        if end == n_tokens:
            break
        start += stride
    return out


def window_groups(docs: list[list[int]], max_len: int, stride: int) -> list[Group]:
    """Each window as a group: the tokens before its first scored one are context, the rest one continuation."""
    groups = []
    for ids in docs:
        for start, end, first in windows(len(ids), max_len, stride):
            groups.append(Group(ids[start:first], [ids[first:end]]))
    return groups


# -- the command ---------------------------------------------------------------------------------------
@dataclass
class Sums:
    nll: float = 0.0
    tokens: float = 0.0
    units: int = 0  # windows or rows scored
    input_tokens: int = 0  # tokens through the model


def _world(cfg: EvalConfig):
    from llamazoo.distributed.mesh import init_parallel

    if cfg.parallel.tensor_parallel != 1:
        raise ValueError("llamazoo eval runs whole models: parallel.tensor_parallel must be 1 (under torchrun "
                         "every process scores a share of the data)")
    return init_parallel(1, cfg.model.torch_device())


def load_for_eval(cfg: EvalConfig):
    """Model and tokenizer exactly as `llamazoo generate` loads them (any checkpoint it accepts)."""
    from llamazoo.generation.app import load

    gen_cfg = GenerateConfig(checkpoint=cfg.checkpoint, model=cfg.model,
                             generation=GenerationSection(threads=cfg.eval.threads))
    return load(gen_cfg)


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="seq", disable=not enabled or not sys.stderr.isatty(), leave=False)


def score_text(model, tokenizer, texts: list[str], path: Path, cfg: EvalConfig, ctx,
               show_progress: bool) -> tuple[Sums, dict[str, Any]]:
    """Sums over all processes; this one scores windows rank, rank + world, ..."""
    ev = cfg.eval
    max_len = ev.max_seq_length or model.config.max_position_embeddings
    stride = ev.stride if ev.stride is not None else max(1, max_len // 2)
    if stride >= max_len:
        raise ValueError(f"eval.stride={stride} must be smaller than eval.max_seq_length={max_len}: a window "
                         f"starting at a token must hold context before the tokens it scores")
    docs = [tokenizer.encode(t) for t in texts]
    groups = window_groups(docs, max_len, stride)
    if not groups:
        raise ValueError(f"eval.input: {path} has no document of two or more tokens; nothing to score")
    mine = groups[ctx.dp_rank::ctx.dp_size]
    nll = 0.0
    with _progress(len(mine), show_progress) as bar:
        for scores, g in zip(score_groups(model, mine, ev.batch_size, bar.update), mine):
            nll -= scores[0].logprob
    sums = Sums(nll=ctx.all_reduce_sum(nll), tokens=sum(len(g.continuations[0]) for g in groups),
                units=len(groups), input_tokens=sum(g.row_length for g in groups))
    return sums, {"documents": len(docs), "max_seq_length": max_len, "stride": stride}


def _prepared_rows(path: Path, split: str):
    """HDF5Rows of a prepared folder's split (auto: dev if any, else train) or of one .hdf5 file."""
    from llamazoo.data.dataset import HDF5Rows, read_metadata, split_files
    from llamazoo.io.damaged import open_hdf5, reading

    if path.is_file():
        with reading(path, "HDF5"):
            h = open_hdf5(path)
            shape = h["input_ids"].shape if "input_ids" in h else None
            h.close()
        if shape is None or len(shape) != 2:
            raise ValueError(f"{path}: expected an input_ids dataset of [rows, max_seq_length]")
        return HDF5Rows([path], int(shape[1])), "file"
    if not (path / "metadata.yaml").is_file():
        raise FileNotFoundError(f"eval.input: {path} is a folder without metadata.yaml; expected a folder written "
                                f"by `llamazoo prepare` (or generative_data_prep), a .txt, .jsonl or .hdf5 file")
    meta = read_metadata(path)
    if meta.get("max_seq_length") is None:
        raise ValueError(f"{path / 'metadata.yaml'}: no max_seq_length")
    dev, train = split_files(path, "dev"), split_files(path, "train")
    chosen = split if split != "auto" else ("dev" if dev else "train")
    files = dev if chosen == "dev" else train
    if not files:
        raise FileNotFoundError(f"eval.input: {path} has no {chosen}_*_of_*.hdf5 files (eval.split={split})")
    return HDF5Rows(files, int(meta["max_seq_length"])), chosen


def score_prepared(model, rows, split: str, cfg: EvalConfig, ctx) -> tuple[Sums, dict[str, Any]]:
    from llamazoo.config import TrainingSection
    from llamazoo.training.evaluate import dev_loss
    from llamazoo.training.step import DataParallel

    ev = cfg.eval
    try:
        t = TrainingSection(batch_size=ev.batch_size, prompt_loss_weight=ev.prompt_loss_weight)
        dp = DataParallel(rank=ctx.dp_rank, size=ctx.dp_size,
                          group=ctx.dp_mesh.get_group() if ctx.mesh is not None else None)
        loss, weight = dev_loss(model, rows, t, ctx.device, dp)  # summed over the processes
        n = len(rows)
    finally:
        rows.close()
    return Sums(nll=loss * weight, tokens=weight, units=n), \
        {"split": split, "rows": n, "max_seq_length": rows.max_seq_length, "prompt_loss_weight": ev.prompt_loss_weight}


def write_json(data: dict[str, Any], target: str | Path) -> None:
    from llamazoo.io.atomic import write_text

    write_text(target, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def run_perplexity(cfg: EvalConfig, out: TextIO | None = None, progress: bool = True) -> dict[str, Any]:
    """The whole `llamazoo eval perplexity`: returns (and on rank 0 prints and writes) the results."""
    out = out or sys.stdout
    if not cfg.eval.input:
        raise ValueError("eval.input is required: a .txt or .jsonl file, a prepared HDF5 folder or a .hdf5 file")
    path = Path(cfg.eval.input)
    if not path.exists():
        raise FileNotFoundError(f"eval.input: {path} does not exist")
    text = path.is_file() and path.suffix in TEXT_SUFFIXES
    if path.is_file() and not text and path.suffix != ".hdf5":
        raise ValueError(f"eval.input: {path} must be a .txt, .jsonl or .hdf5 file or a prepared HDF5 folder")
    ev = cfg.eval
    texts, rows, split = None, None, ""
    if text:
        texts = read_documents(path)  # bad input fails before the model loads
    else:
        if ev.stride is not None:
            raise ValueError("eval.stride applies to text input; prepared rows are scored whole")
        rows, split = _prepared_rows(path, ev.split)
        if ev.max_seq_length is not None and ev.max_seq_length != rows.max_seq_length:
            rows.close()
            raise ValueError(f"eval.max_seq_length={ev.max_seq_length} but the rows of {path} hold "
                             f"{rows.max_seq_length} tokens; leave it unset for prepared data")
    ctx = _world(cfg)
    loaded = load_for_eval(cfg)
    model = loaded.model
    if text:  # fused, prepacked CPU projections (no-op elsewhere); the training loss path of
        from llamazoo.generation.packed import SCORING_HINT, pack_for_inference  # prepared rows read plain weights

        pack_for_inference(model, batch_hint=SCORING_HINT)
    ctx.barrier()
    t0 = time.perf_counter()
    if text:
        sums, info = score_text(model, loaded.tokenizer, texts, path, cfg, ctx, ctx.is_main and progress)
    else:
        sums, info = score_prepared(model, rows, split, cfg, ctx)
    seconds = time.perf_counter() - t0
    nll = sums.nll / sums.tokens if sums.tokens else float("nan")
    tokens = int(sums.tokens) if float(sums.tokens).is_integer() else sums.tokens
    result: dict[str, Any] = {
        "input": str(path),
        "model": cfg.checkpoint.model_name_or_path or "default",
        "dtype": str(model.lm_head.weight.dtype).removeprefix("torch."),
        "device": str(model.lm_head.weight.device),
        **info,
        "tokens": tokens,
        "nll": nll,
        "perplexity": math.exp(nll) if nll < 700 else float("inf"),
        "seconds": round(seconds, 3),
        "tokens_per_second": sums.tokens / seconds if seconds > 0 else None,
        "batch_size": cfg.eval.batch_size,
        "world_size": ctx.dp_size,
    }
    if text:
        result.update(windows=sums.units, input_tokens=sums.input_tokens)
    if ctx.is_main:
        out.write(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
        out.flush()
        if cfg.eval.output:
            write_json(result, cfg.eval.output)
    return result
