"""Helpers for the `llamazoo serve` tests: a tiny random model with SmolLM2's tokenizer and chat template,
and the server running in-process (uvicorn in a thread, on a free loopback port)."""
from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Iterator

from conftest import hf_tiny_model


def tiny_chat_folder(out: Path, default_model_dir: Path, **overrides) -> Path:
    """A tiny random Llama (vocab 49152, 2 layers, 512 positions) with SmolLM2's tokenizer, chat template
    and EOS ids [2, 0]."""
    cfg = dict(vocab_size=49152, max_position_embeddings=512, eos_token_id=2, num_key_value_heads=2)
    hf_tiny_model(**{**cfg, **overrides}).save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(default_model_dir / name, out / name)
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0], "do_sample": False}))
    return out


def serve_config(folder: Path, *overrides: str):
    from llamazoo.config import ServeConfig, load_config

    return load_config(ServeConfig, None, [f"checkpoint.model_name_or_path={folder}", "model.device=cpu",
                                           "generation.threads=1", *overrides])


@contextlib.contextmanager
def running_server(folder: Path, *overrides: str) -> Iterator[tuple[str, object]]:
    """(base URL, ServerState) of a server on 127.0.0.1 with a free port, stopped afterwards."""
    from llamazoo.serving.server import ServerThread, build_state

    state = build_state(serve_config(folder, *overrides))
    with ServerThread(state) as url:
        yield url, state


def url_from_log(proc: subprocess.Popen, lines: list[str], timeout: float = 180) -> str:
    """The base URL that a `llamazoo serve` process logs when it listens (its stderr lines go to `lines`)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        assert line, "".join(lines)
        lines.append(line)
        if " at http://" in line:
            return line.split(" at ")[1].split()[0]
    raise AssertionError("no URL logged:\n" + "".join(lines))


def stream_in_flight(url: str, model: str, max_tokens: int) -> tuple[threading.Thread, dict]:
    """A streaming completion (prompt "Hello", EOS ignored) in a thread, returned once the server runs it;
    result["lines"] gets the stream's non-empty lines when it ends."""
    import httpx

    result: dict = {}

    def run() -> None:
        with httpx.stream("POST", url + "/v1/completions", timeout=120, json={
                "model": model, "prompt": "Hello", "max_tokens": max_tokens, "stream": True, "ignore_eos": True}) as r:
            result["lines"] = [line for line in r.iter_lines() if line]

    t = threading.Thread(target=run)
    t.start()
    deadline = time.monotonic() + 60
    while httpx.get(url + "/health").json()["running"] == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    return t, result
