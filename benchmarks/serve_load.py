"""Load test for any OpenAI-compatible server: N concurrent clients, each streaming one completion of
--tokens tokens (EOS ignored) for its own prompt, over HTTP.

Per N: aggregate output tokens/s (all completion tokens / wall time from the first request to the last
token), time to first token p50/p99 (request sent -> first text chunk), inter-token latency p50 (gaps
between a stream's text chunks, all streams pooled). A warm-up request runs first and is not counted.

    # a server that is already running (llamazoo serve, llama-server, vLLM, ...)
    python benchmarks/serve_load.py --url http://127.0.0.1:8000 [--model NAME] [--clients 1,8,32]
    # or start one, measure, stop it: llamazoo serve on the default model, or llama.cpp's llama-server
    python benchmarks/serve_load.py --launch llamazoo --dtype bfloat16 --threads 2
    python benchmarks/serve_load.py --launch llama-server --gguf smollm2-bf16.gguf --threads 2
    #   (llama-server from ../shared/bench/llamacpp.sh build; -t THREADS -np MAX(clients), continuous batching)

Prints a markdown table (and --json FILE); the 1-minute load average is printed with every row, since
other work on the machine moves these numbers.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

TOPICS = ["a lighthouse keeper", "the first snow of winter", "a robot learning to paint", "a market in Marrakesh",
          "a lost umbrella", "two rival bakers", "a comet seen from a farm", "the last train of the night",
          "a library that never closes", "a llama crossing the Andes", "a chess game by mail", "an old radio",
          "a garden on a rooftop", "a violin maker", "a storm at sea", "a mountain hut", "a forgotten recipe",
          "a street musician", "a map with a missing island", "a clockmaker's apprentice", "a desert well",
          "a kite festival", "a bridge being built", "a museum at night", "a fisherman's dog", "a tea plantation",
          "a letter from the future", "an astronaut's first day", "a school play", "a beekeeper", "a night bus",
          "a city under fog", "a river ferry", "a secret staircase"]


def prompt_for(i: int) -> str:
    return f"Story {i + 1}. Write a long, detailed story about {TOPICS[i % len(TOPICS)]}, told in the first person.\n\n"


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    return v[min(len(v) - 1, max(0, round(q / 100 * (len(v) - 1))))]


async def one_stream(client: httpx.AsyncClient, url: str, model: str, prompt: str, tokens: int) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": tokens, "stream": True, "temperature": 0,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first, stamps, usage, chunks = None, [], None, 0
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            msg = json.loads(data)
            if msg.get("usage"):
                usage = msg["usage"]
            for c in msg.get("choices") or []:
                if c.get("text"):
                    now = time.perf_counter()
                    first = first if first is not None else now
                    stamps.append(now)
                    chunks += 1
    n = (usage or {}).get("completion_tokens") or chunks
    return {"ttft": (first - t0) if first else None, "gaps": [b - a for a, b in zip(stamps, stamps[1:])],
            "tokens": n, "end": stamps[-1] if stamps else time.perf_counter(), "start": t0}


async def run_level(url: str, model: str, clients: int, tokens: int) -> dict:
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(1800.0), limits=limits) as client:
        t0 = time.perf_counter()
        results = await asyncio.gather(*(one_stream(client, url, model, prompt_for(i), tokens)
                                         for i in range(clients)))
    wall = max(r["end"] for r in results) - t0
    ttfts = [r["ttft"] for r in results if r["ttft"] is not None]
    gaps = [g for r in results for g in r["gaps"]]
    total = sum(r["tokens"] for r in results)
    return {"clients": clients, "tokens": total, "wall_s": wall, "tokens_per_s": total / wall,
            "ttft_p50_s": pct(ttfts, 50), "ttft_p99_s": pct(ttfts, 99), "itl_p50_ms": 1000 * pct(gaps, 50),
            "load_avg_1m": os.getloadavg()[0]}


def model_id(url: str) -> str:
    r = httpx.get(url + "/v1/models", timeout=30)
    r.raise_for_status()
    return r.json()["data"][0]["id"]


def launch(args, max_clients: int) -> tuple[subprocess.Popen, str]:
    """Starts the server to measure on a free loopback port; returns (process, base URL) once it answers."""
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    env = {**os.environ}
    if args.launch == "llamazoo":
        cmd = [sys.executable, "-m", "llamazoo", "serve", f"serve.port={port}", f"model.dtype={args.dtype}",
               f"serve.max_concurrent={max_clients}", f"generation.threads={args.threads}", "serve.log_every_s=60"]
        if args.checkpoint:
            cmd.append(f"checkpoint.model_name_or_path={args.checkpoint}")
        cmd += args.extra
    else:
        exe = args.llama_server or shutil.which("llama-server") or str(
            Path.home() / ".cache/llamazoo-bench/llama.cpp/src/build/bin/llama-server")
        if not Path(exe).exists() or not args.gguf:
            raise SystemExit("--launch llama-server needs --gguf FILE and llama-server (--llama-server PATH; "
                             "../shared/bench/llamacpp.sh build)")
        cmd = [exe, "-m", args.gguf, "-t", str(args.threads), "-np", str(max_clients), "-cb",
               "-c", str(max_clients * args.ctx_per_slot), "--host", "127.0.0.1", "--port", str(port),
               "--no-webui", *args.extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{cmd[0]} exited ({proc.returncode}): {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit("the server did not come up within 10 minutes")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", help="base URL of a running OpenAI-compatible server")
    ap.add_argument("--model", help="model id (default: the first of /v1/models)")
    ap.add_argument("--launch", choices=["llamazoo", "llama-server"], help="start this server for the run")
    ap.add_argument("--dtype", default="bfloat16", help="llamazoo: model.dtype")
    ap.add_argument("--checkpoint", help="llamazoo: checkpoint.model_name_or_path (default model if unset)")
    ap.add_argument("--gguf", help="llama-server: the GGUF file")
    ap.add_argument("--llama-server", help="llama-server binary")
    ap.add_argument("--ctx-per-slot", type=int, default=512, help="llama-server: context per parallel slot")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--clients", default="1,8,32")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--label", help="name of the server in the table")
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("extra", nargs="*", help="extra arguments for the launched server")
    args = ap.parse_args()
    levels = [int(c) for c in args.clients.split(",")]
    proc = None
    if args.launch:
        proc, url = launch(args, max(levels))
    elif args.url:
        url = args.url.rstrip("/")
        url = re.sub(r"/v1$", "", url)
    else:
        ap.error("give --url or --launch")
    label = args.label or (f"{args.launch} {args.dtype if args.launch == 'llamazoo' else Path(args.gguf).name}"
                           if args.launch else url)
    rows = []
    try:
        model = args.model or model_id(url)
        asyncio.run(run_level(url, model, 1, 8))  # warm-up
        for n in levels:
            row = {"server": label, **asyncio.run(run_level(url, model, n, args.tokens))}
            rows.append(row)
            print(f"{label}: {n} clients: {row['tokens_per_s']:.1f} tok/s, TTFT p50 {row['ttft_p50_s']:.2f}s "
                  f"p99 {row['ttft_p99_s']:.2f}s, ITL p50 {row['itl_p50_ms']:.0f} ms (load {row['load_avg_1m']:.1f})",
                  flush=True)
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
    print("\n| server | clients | tokens/s | TTFT p50 (s) | TTFT p99 (s) | ITL p50 (ms) | load avg |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['server']} | {r['clients']} | {r['tokens_per_s']:.1f} | {r['ttft_p50_s']:.2f} | "
              f"{r['ttft_p99_s']:.2f} | {r['itl_p50_ms']:.0f} | {r['load_avg_1m']:.1f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
