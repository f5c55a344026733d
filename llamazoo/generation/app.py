"""The generation app: a validated `GenerateConfig` -> model + tokenizer -> engine -> outputs and report.

Checks that need the tokenizer (empty prompts, prompt length, batch size) happen before any generation,
so a bad prompt list fails in seconds with a message naming the prompt and the key to change.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TextIO

import torch

from llamazoo.config import GenerateConfig, GenerationSection
from llamazoo.generation.chat import encode_chat
from llamazoo.generation.engine import Engine, RowResult, auto_compile
from llamazoo.generation.packed import BATCHED_HINT
from llamazoo.generation.report import Report, row_metrics
from llamazoo.generation.sampling import SamplingParams


@dataclass
class Loaded:
    model: Any
    tokenizer: Any
    folder: Path | None
    load_s: float


CpuTimes = dict[int, tuple[int, int]]  # cpu -> (busy ticks, all ticks)


def cpu_times(path: str = "/proc/stat") -> CpuTimes | None:
    """(busy, all) clock ticks of each CPU this process may run on, from /proc/stat (Linux; None
    elsewhere). Busy counts steal time: a core the host gives to someone else is not ours either."""
    import os

    try:
        mine = os.sched_getaffinity(0)
        out = {}
        with open(path) as f:
            for line in f:
                name, *ticks = line.split()
                if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in mine:
                    user, nice, system, idle, iowait, irq, softirq, steal = (int(t) for t in ticks[:8])
                    busy = user + nice + system + irq + softirq + steal
                    out[int(name[3:])] = (busy, busy + idle + iowait)
        return out or None
    except (OSError, ValueError, AttributeError):
        return None


def busy_cores(window_s: float = 0.1, read: Callable[[], CpuTimes | None] | None = None) -> float | None:
    """How many of this process's cores other work keeps busy now: their busy share over a short window
    (we sleep through it), times the cores. None where /proc/stat cannot be read."""
    read = read or cpu_times
    before = read()
    if before is None:
        return None
    time.sleep(window_s)
    after = read() or {}
    busy = total = 0
    for cpu, (b0, t0) in before.items():
        if cpu in after:
            busy += after[cpu][0] - b0
            total += after[cpu][1] - t0
    return busy / total * len(before) if total > 0 else 0.0


def pick_threads(requested: int | None) -> int:
    """CPU threads for torch: as asked, else the cores that other work leaves idle now (at least 1). A
    parallel region waits for its slowest thread, so on a busy machine a thread that is not scheduled
    stalls every matmul: there one thread runs several times faster than two. Measured over 0.1 s, not
    from the load average: its 1-minute mean still counts a job that ended seconds ago, so a second
    `llamazoo generate` started right after a first one ran on half the cores (SmolLM2 compiled decode:
    ~20 instead of ~40 tokens/s)."""
    import os

    if requested:
        return requested
    cores = torch.get_num_threads()
    busy = busy_cores()
    if busy is None:
        try:
            busy = os.getloadavg()[0]
        except OSError:
            busy = 0
    return max(1, min(cores, cores - round(busy)))


def load(cfg: GenerateConfig, model_loader: Callable[..., Any] | None = None) -> Loaded:
    """Model and tokenizer as the config says (weights from checkpoint.model_name_or_path or the default).

    model_loader replaces `llamazoo.io.hf.load_model` (same arguments), e.g. to load tensor-parallel shards."""
    from llamazoo.io.default import resolve_checkpoint
    from llamazoo.io.hf import load_model
    from llamazoo.io.tokenizer import load_tokenizer

    if cfg.model.torch_device() == "cpu":
        torch.set_num_threads(pick_threads(cfg.generation.threads))
    if cfg.checkpoint.config_name:
        raise ValueError("checkpoint.config_name (random weights) cannot generate text; set "
                         "checkpoint.model_name_or_path to a checkpoint folder (or leave it unset for the default)")
    name = cfg.checkpoint.model_name_or_path or "default"
    t0 = time.perf_counter()
    folder = Path(resolve_checkpoint(name))
    model = (model_loader or load_model)(str(folder), dtype=cfg.model.dtype, device=cfg.model.torch_device(),
                       opts=cfg.model.precision_options())
    if cfg.checkpoint.adapter:
        apply_adapter(model, cfg.checkpoint.adapter, sharded=model_loader is not None)
    if cfg.model.quantize != "none":
        if model_loader is not None:
            raise ValueError("model.quantize with a tensor-parallel model: write a quantized folder first "
                             "(llamazoo convert --quantize) and run it in one process")
        from llamazoo.io.mapped import release_pages
        from llamazoo.model.quantize import quantize_model

        quantize_model(model, cfg.model.quantize, cfg.model.quantize_group_size, release=release_pages)
    tokenizer = load_tokenizer(str(folder))
    return Loaded(model, tokenizer, folder if folder.is_dir() else None, time.perf_counter() - t0)


def apply_adapter(model, folder: str, sharded: bool = False) -> None:
    """checkpoint.adapter: a LoRA adapter merged into the weights at load (W + alpha/r * B A, computed in
    fp32 and rounded once to the model's dtype). Merged, it costs nothing per token and every fast path
    (packed CPU projections, the compiled decode) applies unchanged; unmerged it would add two thin
    matmuls to every projection of every step and turn those paths off."""
    from llamazoo.io.adapter import load_adapter

    if sharded:
        raise ValueError("checkpoint.adapter with a tensor-parallel model: merge the adapter into a HF folder "
                         "first (llamazoo merge --base B --adapter A --output DIR) and generate from that folder")
    load_adapter(model, folder, merge=True)


def default_eos_ids(model, tokenizer, folder: Path | None) -> list[int]:
    """generation_config.json's eos_token_id, else config.json's, else the tokenizer's (ints or lists)."""
    candidates: list[Any] = []
    gen_file = folder / "generation_config.json" if folder else None
    if gen_file and gen_file.is_file():
        candidates.append(json.loads(gen_file.read_text()).get("eos_token_id"))
    candidates += [model.config.eos_token_id, tokenizer.eos_token_id]
    for c in candidates:
        if c is None:
            continue
        ids = [int(c)] if isinstance(c, int) else [int(x) for x in c]
        if ids:
            return ids
    return []


def encode_prompts(gen: GenerationSection, tokenizer, max_seq_length: int) -> list[list[int]]:
    """Prompt texts -> token ids (through the chat template if generation.chat), with the input checks."""
    if gen.batch_size > len(gen.prompts):
        raise ValueError(f"generation.batch_size={gen.batch_size} but there are only {len(gen.prompts)} "
                         f"prompt(s); the rule is 1 <= batch_size <= number of prompts (the last batch may "
                         f"be smaller)")
    if gen.max_new_tokens >= max_seq_length:
        raise ValueError(f"generation.max_new_tokens={gen.max_new_tokens} leaves no room for a prompt in "
                         f"model.max_seq_length={max_seq_length}")
    if gen.system is not None and not gen.chat:
        raise ValueError("generation.system is set but generation.chat is false; set generation.chat=true "
                         "to apply the chat template with a system message")
    budget = max_seq_length - gen.max_new_tokens
    out = []
    for i, text in enumerate(gen.prompts):
        if not text:
            raise ValueError(f"generation.prompts[{i}] is empty; every prompt needs some text")
        if gen.chat:
            messages = ([{"role": "system", "content": gen.system}] if gen.system else []) + \
                       [{"role": "user", "content": text}]
            ids = encode_chat(tokenizer, messages)
        else:
            ids = tokenizer.encode(text)
        if not ids:
            raise ValueError(f"generation.prompts[{i}] encodes to no tokens")
        if len(ids) > budget:
            if gen.truncate_prompt == "left":
                ids = ids[-budget:]
            else:
                raise ValueError(
                    f"generation.prompts[{i}] has {len(ids)} tokens; with generation.max_new_tokens="
                    f"{gen.max_new_tokens} it must have at most {budget} (model.max_seq_length={max_seq_length}). "
                    f"Shorten it, lower max_new_tokens, raise model.max_seq_length, or set "
                    f"generation.truncate_prompt=left to keep its last {budget} tokens")
        out.append(ids)
    return out


def sampling_params(gen: GenerationSection) -> SamplingParams:
    return SamplingParams(do_sample=gen.do_sample, temperature=gen.temperature, top_k=gen.top_k,
                          top_p=gen.top_p, min_p=gen.min_p, repetition_penalty=gen.repetition_penalty)


def compile_settings(setting: bool | str, model, batch: int, decode_tokens: int) -> tuple[dict[str, bool], bool | str]:
    """`Engine` keyword arguments for generation.compile, and what the report says. auto compiles where
    `auto_compile` says it pays, with the weights held once (no packed copies) and eager decoding if the
    compile fails; true / false as set."""
    if setting != "auto":
        return {"compile": bool(setting)}, bool(setting)
    on, why = auto_compile(model, batch, decode_tokens)
    return {"compile": on, "pack": not on, "compile_fallback": True}, f"auto: {'compiled' if on else 'eager'} ({why})"


def decode_step_kind(engine: Engine, n_prompts: int, batch_size: int) -> str:
    compiled = {engine.uses_compiled_step(min(batch_size, n_prompts - i)) for i in range(0, n_prompts, batch_size)}
    eager = "eager (decode stack kernel)" if "decode_stack" in engine.model.__dict__ else "eager"
    return "compiled" if compiled == {True} else eager if compiled == {False} else f"compiled at batch 1, else {eager}"


def run_generation(cfg: GenerateConfig, out: TextIO | None = None, err: TextIO | None = None,
                   model_loader: Callable[..., Any] | None = None) -> list[RowResult]:
    """The whole `llamazoo generate`: text mode streams completions to `out` (stdout) and then prints the
    report; jsonl mode prints one record per prompt to `out` and the report to `err` (stderr)."""
    out, err = out or sys.stdout, err or sys.stderr
    gen = cfg.generation
    loaded = load(cfg, model_loader)
    model, tok = loaded.model, loaded.tokenizer
    max_seq_length = cfg.model.max_seq_length or model.config.max_position_embeddings
    prompt_ids = encode_prompts(gen, tok, max_seq_length)
    eos = gen.eos_token_ids if gen.eos_token_ids is not None else default_eos_ids(model, tok, loaded.folder)
    params = sampling_params(gen)
    batch = min(gen.batch_size, len(prompt_ids))
    hint = 1 if batch == 1 else BATCHED_HINT
    compile_kwargs, compile_why = compile_settings(gen.compile, model, batch, len(prompt_ids) * gen.max_new_tokens)
    engine = Engine(model, tok, max_seq_length=max_seq_length, pack_batch_hint=hint, **compile_kwargs)
    compile_s = None
    if engine.uses_compiled_step(batch):
        first = prompt_ids[:gen.batch_size]
        compile_s = engine.warmup(len(first), max(len(p) for p in first), gen.max_new_tokens)

    text_mode = gen.output_format == "text"
    stream = text_mode and gen.stream and gen.batch_size == 1
    records: list[dict[str, Any]] = []

    def on_text(i: int, piece: str) -> None:
        out.write(piece)
        out.flush()

    def on_row_start(i: int) -> None:
        if stream:
            out.write(("\n" if i else "") + gen.prompts[i])
            out.flush()

    def on_row_done(i: int, r: RowResult) -> None:
        rec = {"index": i, "prompt": gen.prompts[i], "completion": r.text, "prompt_token_ids": r.prompt_ids,
               "token_ids": r.token_ids, "stop_reason": r.stop_reason, "timings": row_metrics(r)}
        records.append(rec)
        if stream:
            out.write("\n")
        elif text_mode:
            out.write(("\n" if i else "") + gen.prompts[i] + r.text + "\n")
        else:
            out.write(json.dumps(rec, ensure_ascii=False) + "\n")
        out.flush()

    rows = engine.generate(prompt_ids, gen.max_new_tokens, gen.batch_size, params, eos, gen.stop, gen.seed,
                           on_text=on_text if stream else None, on_row_done=on_row_done,
                           on_row_start=on_row_start)
    if compile_kwargs["compile"] and not engine.compile:  # auto, and the compile failed (a warning said why)
        compile_why = f"{compile_why}; the compile failed, decoded eagerly"
    header = {
        "model": cfg.checkpoint.model_name_or_path or "default (SmolLM2-135M-Instruct)",
        **({"adapter": f"{cfg.checkpoint.adapter} (merged)"} if cfg.checkpoint.adapter else {}),
        "dtype": str(model.lm_head.weight.dtype).removeprefix("torch."),
        "device": str(model.lm_head.weight.device),
        "threads": torch.get_num_threads(),
        "batch_size": gen.batch_size,
        "max_new_tokens": gen.max_new_tokens,
        "decoding": "sampling" if gen.do_sample else "greedy",
        "compile": compile_why,
        # compile=true on CPU compiles batch-1 decode only (at batch > 1 the eager step is faster)
        "decode_step": decode_step_kind(engine, len(prompt_ids), gen.batch_size),
        "load_s": round(loaded.load_s, 3),
    }
    if compile_s is not None:
        header["compile_warmup_s"] = round(compile_s, 3)
    report = Report(rows, header)
    text = report.format_text()
    (out if text_mode else err).write("\n" + text)
    if gen.output_dir:
        from llamazoo.io.atomic import write_text

        d = Path(gen.output_dir)
        write_text(d / "summary.txt", text)
        write_text(d / "summary.json", json.dumps(report.to_dict(), indent=2) + "\n")
        if text_mode:
            write_text(d / "completions.txt", "".join(f"{r['prompt']}{r['completion']}\n\n" for r in records))
        else:
            write_text(d / "completions.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        (out if text_mode else err).write(f"wrote {d / 'summary.txt'}\n")
    return rows


CHAT_MAX_NEW_TOKENS = 512


def run_chat(cfg: GenerateConfig, stdin: TextIO | None = None, out: TextIO | None = None) -> None:
    """The whole `llamazoo chat`. Uses generation.{system, sampling keys, stop, eos_token_ids, seed,
    compile}; max_new_tokens defaults to 512 per answer here unless set."""
    stdin, out = stdin or sys.stdin, out or sys.stdout
    from llamazoo.generation.chat import ChatSession, chat_loop

    gen = cfg.generation
    loaded = load(cfg)
    model, tok = loaded.model, loaded.tokenizer
    if not tok.chat_template:
        raise ValueError(f"{loaded.folder}: the tokenizer has no chat template, so `llamazoo chat` cannot "
                         f"format a conversation; use `llamazoo generate` for plain completion")
    max_new = gen.max_new_tokens if "max_new_tokens" in gen.model_fields_set else CHAT_MAX_NEW_TOKENS
    max_seq_length = cfg.model.max_seq_length or model.config.max_position_embeddings
    max_new = min(max_new, max_seq_length // 2)
    eos = gen.eos_token_ids if gen.eos_token_ids is not None else default_eos_ids(model, tok, loaded.folder)
    compile_kwargs, _ = compile_settings(gen.compile, model, 1, max_new)
    if gen.compile == "auto" and compile_kwargs["compile"]:
        print(f"llamazoo chat: generation.compile=auto compiles the decode step (answers of up to {max_new} "
              f"tokens); the first answer waits for it (~2-10 s, cached on disk; generation.compile=false "
              f"skips it)", file=sys.stderr)
    engine = Engine(model, tok, max_seq_length=max_seq_length, **compile_kwargs)
    session = ChatSession(engine, sampling_params(gen), max_new, eos, gen.stop, gen.system, gen.seed)
    chat_loop(session, stdin, out, interactive=stdin.isatty())
