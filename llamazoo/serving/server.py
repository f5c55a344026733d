"""`llamazoo serve`: config -> model, tokenizer, engine, scheduler -> the HTTP API on uvicorn.

The model is loaded as `llamazoo generate` loads it (same keys, same EOS ids, same chat encoding), so a
greedy request gives generate's tokens. SIGTERM (or Ctrl-C): stop accepting connections, give streams in
flight serve.shutdown_timeout seconds, cut what is left, exit 0.
"""
from __future__ import annotations

import contextlib
import logging
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

log = logging.getLogger("llamazoo.serve")


def served_name(cfg) -> str:
    name = cfg.serve.served_model_name or cfg.checkpoint.model_name_or_path
    from llamazoo.io.default import DEFAULT_ALIASES, default_model_dir

    if not name or name in DEFAULT_ALIASES:
        return cfg.serve.served_model_name or default_model_dir().name
    return cfg.serve.served_model_name or Path(name).name or name


def build_state(cfg, model_loader: Callable[..., Any] | None = None, slot_cache: Callable[..., Any] | None = None):
    """Loads the model and builds the scheduler and the API's state (nothing runs yet). model_loader and
    slot_cache replace `load_model` and `SlotCache` (tensor-parallel serving, see
    llamazoo.distributed.generation_hooks.parallel_serving)."""
    from llamazoo.generation.app import default_eos_ids, load
    from llamazoo.generation.engine import Engine
    from llamazoo.generation.packed import BATCHED_HINT
    from llamazoo.serving.api import ServerState
    from llamazoo.serving.scheduler import Scheduler

    gen = cfg.generation
    if gen.compile is True:
        log.warning("generation.compile is not used by serve (it compiles batch-1 decode; serve decodes batches)")
    loaded = load(cfg, model_loader)
    model, tok = loaded.model, loaded.tokenizer
    max_seq_length = cfg.model.max_seq_length or model.config.max_position_embeddings
    eos = gen.eos_token_ids if gen.eos_token_ids is not None else default_eos_ids(model, tok, loaded.folder)
    # batched decoding: a tied head's packed copy costs its bytes once more (SmolLM2 fp32: 113 MB, less than
    # the KV cache of 32 rows) and saves ~40% of its matmul time
    engine = Engine(model, tok, max_seq_length=max_seq_length, pack_batch_hint=BATCHED_HINT, pack_tied_head=True)
    s = cfg.serve
    sched = Scheduler(engine, eos, max_concurrent=s.max_concurrent, max_queue=s.max_queue,
                      prefill_chunk=s.prefill_chunk, max_seq_length=max_seq_length, log_every_s=s.log_every_s,
                      prefill_tokens=s.prefill_tokens_per_step,
                      batch_invariant=s.batch_invariant, **({"slot_cache": slot_cache} if slot_cache else {}))
    state = ServerState(
        scheduler=sched, tokenizer=tok, model_name=served_name(cfg), max_seq_length=max_seq_length, defaults=gen,
        default_max_tokens=gen.max_new_tokens if "max_new_tokens" in gen.model_fields_set else None,
        default_seed=gen.seed if "seed" in gen.model_fields_set else None, api_key=s.api_key)
    m = state.metrics

    def on_token(seq, gap: float) -> None:
        m.generation_tokens.inc()
        (m.ttft if len(seq.tokens) == 1 else m.itl).observe(gap)

    sched.on_token = on_token
    log.info("loaded %s (%s, %s, %d threads) in %.1fs; %s; KV cache rows: %d, grows to %d tokens each",
             state.model_name, str(model.lm_head.weight.dtype).removeprefix("torch."), engine.device,
             _threads(), loaded.load_s, "packed CPU weights" if engine.packed else "plain weights",
             sched.slots.rows, max_seq_length)
    return state


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def bind(host: str, port: int) -> socket.socket:
    """The listening socket (port 0: any free port); a clear error when the address is taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ValueError(f"serve.host={host} serve.port={port}: cannot listen there ({e.strerror}); choose "
                         f"another serve.host or serve.port (serve.port=0 picks a free one)") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def _uvicorn_server(app, shutdown_timeout: float | None):
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server, ending with exit status 0 on SIGTERM/SIGINT (uvicorn re-raises the signal
        after its graceful shutdown, which would end the process with the signal's status)."""

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            old = {s: signal.signal(s, self.handle_exit) for s in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for s, h in old.items():
                    signal.signal(s, h)

    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                            timeout_graceful_shutdown=shutdown_timeout, timeout_keep_alive=5)
    return Server(config)


def setup_logging() -> None:
    logger = logging.getLogger("llamazoo.serve")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def run_server(cfg, model_loader: Callable[..., Any] | None = None, slot_cache: Callable[..., Any] | None = None) -> int:
    """The whole `llamazoo serve`, until SIGTERM/SIGINT."""
    from llamazoo.serving.api import build_app

    setup_logging()
    sock = bind(cfg.serve.host, cfg.serve.port)
    state = build_state(cfg, model_loader, slot_cache)
    server = _uvicorn_server(build_app(state), cfg.serve.shutdown_timeout)
    host, port = sock.getsockname()[:2]
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
    log.info("serving %s at %s (chat page %s/ , API %s/v1); max_concurrent=%d max_queue=%d%s",
             state.model_name, url, url, url, cfg.serve.max_concurrent, cfg.serve.max_queue,
             ", API key required" if cfg.serve.api_key else "")
    # HTTP in a thread, the decode steps here: the thread that loaded the model runs it (see Scheduler.run)
    failed: list[BaseException] = []

    def serve_http() -> None:
        try:
            server.run(sockets=[sock])
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            failed.append(e)

    http = threading.Thread(target=serve_http, name="llamazoo-http", daemon=True)
    old = {s: signal.signal(s, server.handle_exit) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        http.start()
        # in-flight streams keep decoding during uvicorn's graceful shutdown, until its thread ends
        state.scheduler.run(until=lambda: not http.is_alive())
        http.join()
        if failed and not (isinstance(failed[0], SystemExit) and not failed[0].code):
            log.error("the HTTP server stopped: %s: %s", type(failed[0]).__name__, failed[0])
            return 1
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        state.scheduler.stop()
        sock.close()
        close = getattr(state.scheduler.slots, "close", None)
        if close is not None:  # tensor parallel: the other ranks stop following
            close()
    log.info("stopped")
    return 0


class ServerThread:
    """The API on uvicorn in a background thread (tests, notebooks): `with ServerThread(state) as url:`."""

    def __init__(self, state, host: str = "127.0.0.1", port: int = 0):
        from llamazoo.serving.api import build_app

        self.state = state
        self.sock = bind(host, port)
        self.server = _uvicorn_server(build_app(state), 5.0)
        self.url = f"http://{host}:{self.sock.getsockname()[1]}"
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> str:
        self.state.scheduler.start()
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the server thread did not start")
            time.sleep(0.02)
        return self.url

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.state.scheduler.stop()
        self.sock.close()
