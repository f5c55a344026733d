"""Helpers for the `llamazoo serve` tests: a tiny random model with SmolLM2's tokenizer and chat template,
and the server running in-process (uvicorn in a thread, on a free loopback port)."""
from __future__ import annotations

import contextlib
import json
import shutil
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
