"""`llamazoo serve` over HTTP on a tiny random model: the openai client's answers equal `llamazoo generate`,
32 concurrent streams (some sampling, some leaving early) equal their solo runs and leave the server idle,
bad requests get OpenAI-shaped 4xx errors naming the field, auth and queue limits, metrics. (SIGTERM with
a stream in flight: tests/test_serve_tp.py, on the `llamazoo serve` command itself.)"""
from __future__ import annotations

import asyncio
import gc
import json
import time
import weakref

import httpx
import openai
import pytest

from llamazoo.cli import main
from serve_helpers import running_server, stream_in_flight, tiny_chat_folder, url_from_log

pytestmark = pytest.mark.usefixtures("one_thread")
MODEL = "tiny"
WORDS = ("the llama walked over the green hills of the andes carrying wool and stories from the valley "
         "to the market where people traded silver bells for warm blankets at dawn").split()


@pytest.fixture(scope="module")
def folder(tmp_path_factory, default_model_dir):
    return tiny_chat_folder(tmp_path_factory.mktemp("serve") / MODEL, default_model_dir)


@pytest.fixture(scope="module")
def server(folder):
    with running_server(folder, "serve.max_concurrent=8", "serve.prefill_chunk=16", "serve.max_queue=64") as s:
        yield s


def generate_records(folder, tmp_path, capsys, *extra):
    code = main(["generate", f"checkpoint.model_name_or_path={folder}", "generation.output_format=jsonl",
                 f"generation.output_dir={tmp_path / 'gen'}", "generation.threads=1", *extra])
    out = capsys.readouterr().out
    assert code == 0
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def test_openai_client_equals_generate_streamed_and_not(server, folder, tmp_path, capsys):
    url, state = server
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused")
    prompts = ["Once upon a time", "The llama said"]
    ref = generate_records(folder, tmp_path, capsys, f"generation.prompts={json.dumps(prompts)}",
                           "generation.max_new_tokens=12")
    chat_ref = generate_records(folder, tmp_path, capsys, 'generation.prompts=["Hi there"]', "generation.chat=true",
                                "generation.max_new_tokens=12")[0]
    sampled_ref = generate_records(folder, tmp_path, capsys, 'generation.prompts=["Hi there"]', "generation.chat=true",
                                   "generation.max_new_tokens=12", "generation.do_sample=true",
                                   "generation.temperature=0.7", "generation.top_k=50", "generation.seed=7")[0]
    tok = state.tokenizer
    for rec in ref:
        r = client.completions.create(model=MODEL, prompt=rec["prompt"], max_tokens=12, logprobs=0)
        c = r.choices[0]
        assert c.text == rec["completion"] and c.logprobs.tokens == [tok.decode([t]) for t in rec["token_ids"]]
        assert r.usage.prompt_tokens == len(rec["prompt_token_ids"]) and r.usage.completion_tokens == 12
        assert r.usage.total_tokens == r.usage.prompt_tokens + 12 and c.finish_reason == "length"
        chunks = list(client.completions.create(model=MODEL, prompt=rec["prompt"], max_tokens=12, stream=True,
                                                stream_options={"include_usage": True}))
        assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == rec["completion"]
        assert chunks[-1].usage.completion_tokens == 12 and chunks[-2].choices[0].finish_reason == "length"
    messages = [{"role": "user", "content": "Hi there"}]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, logprobs=True, top_logprobs=2)
    c = r.choices[0]
    assert c.message.content == chat_ref["completion"] and c.message.role == "assistant"
    assert [x.token for x in c.logprobs.content] == [tok.decode([t]) for t in chat_ref["token_ids"]]
    assert all(x.top_logprobs[0].logprob == x.logprob and len(x.top_logprobs) == 2 for x in c.logprobs.content)
    assert r.usage.prompt_tokens == len(chat_ref["prompt_token_ids"]) and r.usage.completion_tokens == len(chat_ref["token_ids"])
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == chat_ref["completion"]
    assert chunks[-1].choices[0].finish_reason == chat_ref["stop_reason"].replace("eos", "stop")
    # seeded sampling: generate's tokens for the same seed and sampling keys
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0.7, seed=7,
                                       extra_body={"top_k": 50})
    assert r.choices[0].message.content == sampled_ref["completion"] != chat_ref["completion"]


def test_n_choices_stop_strings_and_prefix_reuse(server):
    url, _ = server
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused")
    prompt = " ".join(WORDS[:12])
    both = client.completions.create(model=MODEL, prompt=prompt, max_tokens=10, n=2, temperature=1.0, seed=5)
    one = [client.completions.create(model=MODEL, prompt=prompt, max_tokens=10, temperature=1.0, seed=s)
           for s in (5, 6)]
    assert [c.text for c in both.choices] == [o.choices[0].text for o in one]  # choice i draws with seed + i
    assert both.choices[0].text != both.choices[1].text and both.usage.completion_tokens == 20
    full = client.completions.create(model=MODEL, prompt=prompt, max_tokens=20).choices[0].text
    stop = full[len(full) // 2:len(full) // 2 + 3]
    cut = client.completions.create(model=MODEL, prompt=prompt, max_tokens=20, stop=[stop, "\x00never"])
    assert cut.choices[0].text == full[:full.index(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model=MODEL, prompt=prompt, max_tokens=20, stop=stop, stream=True)
    assert "".join(ch.choices[0].text for ch in streamed) == cut.choices[0].text
    # a second chat turn reuses the first turn's whole prompt chunks
    history = [{"role": "system", "content": " ".join(WORDS)}, {"role": "user", "content": "Tell me more."}]
    first = client.chat.completions.create(model=MODEL, messages=history, max_tokens=5)
    history += [{"role": "assistant", "content": first.choices[0].message.content},
                {"role": "user", "content": "And then?"}]
    second = client.chat.completions.create(model=MODEL, messages=history, max_tokens=5)
    assert second.usage.prompt_tokens_details.cached_tokens >= 32
    assert second.usage.prompt_tokens_details.cached_tokens % 16 == 0


def test_32_concurrent_streams_equal_their_solo_runs(server, monkeypatch):
    url, state = server
    sched = state.scheduler
    seqs: list = []
    submit = sched.submit

    def recording_submit(batch):
        seqs.extend(batch)
        submit(batch)

    monkeypatch.setattr(sched, "submit", recording_submit)

    def request(i: int) -> dict:
        body = {"model": MODEL, "max_tokens": 6 + (i * 7) % 20, "stream": True}
        text = " ".join(WORDS[(i * 5) % len(WORDS):] + WORDS[:1 + (i * 11) % 40])  # 2..~70 tokens
        if i % 4 == 3:
            body.update(temperature=0.9, top_p=0.95, seed=1000 + i)
        if i % 8 == 5:
            body["max_tokens"] = 300  # leaves after 3 chunks
        if i % 2:
            body["messages"] = [{"role": "user", "content": text}]
        else:
            body["prompt"] = text
        return body

    async def stream(client: httpx.AsyncClient, body: dict, leave_after: int | None = None) -> dict:
        path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
        text, finish, n = "", None, 0
        async with client.stream("POST", url + path, json=body) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                choice = json.loads(line[6:])["choices"][0]
                text += choice.get("text") or (choice.get("delta") or {}).get("content") or ""
                finish = choice["finish_reason"] or finish
                n += 1
                if leave_after is not None and n >= leave_after:
                    return {"left": True}
        return {"text": text, "finish": finish}

    async def run_all(bodies, leave) -> list[dict]:
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=64)) as client:
            return await asyncio.gather(*(stream(client, b, 3 if i in leave else None) for i, b in enumerate(bodies)))

    bodies = [request(i) for i in range(32)]
    leave = {i for i in range(32) if i % 8 == 5}
    together = asyncio.run(run_all(bodies, leave))
    assert len(seqs) == 32
    solo = [asyncio.run(run_all([b], set()))[0] if i not in leave else None for i, b in enumerate(bodies)]
    for i in range(32):
        if i in leave:
            assert together[i] == {"left": True}
        else:
            assert together[i] == solo[i], i
            assert together[i]["finish"] in ("stop", "length")
    deadline = time.monotonic() + 10
    while (sched.running or sched.waiting) and time.monotonic() < deadline:
        time.sleep(0.05)
    gone = [s for s in seqs[:32] if s.prompt_ids and s.max_tokens == 300]
    assert len(gone) == len(leave) and all(s.cancelled and len(s.tokens) < 300 for s in gone)
    assert not sched.running and not sched.waiting and sched.decoding == 0 and all(r is None for r in sched.rows)
    assert sched.slots.length <= 512 and sched.slots.rows == 8
    refs = [weakref.ref(s) for s in seqs]
    seqs.clear()
    gone.clear()
    gc.collect()
    assert all(r() is None for r in refs)  # the server holds on to no finished or cancelled sequence
    assert httpx.get(url + "/health").json()["running"] == 0


BAD = [
    # (path, body or raw bytes, status, param)
    ("/v1/chat/completions", b"{not json", 400, None),
    ("/v1/chat/completions", b"[1, 2]", 400, None),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}]}, 400, "model"),
    ("/v1/chat/completions", {"model": "gpt-4", "messages": [{"role": "user", "content": "a"}]}, 404, "model"),
    ("/v1/chat/completions", {"model": MODEL}, 400, "messages"),
    ("/v1/chat/completions", {"model": MODEL, "messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "robot", "content": "a"}]}, 400, "messages[0].role"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     400, "messages[0].content"),
    ("/v1/completions", {"model": MODEL}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": ""}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": [1, "a"]}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": [[5, 999999]]}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": "a", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "a", "max_tokens": "ten"}, 400, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "a", "max_tokens": 100000}, 400, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "word " * 600}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": "a", "temperature": 3}, 400, "temperature"),
    ("/v1/completions", {"model": MODEL, "prompt": "a", "temperature": "hot"}, 400, "temperature"),
    ("/v1/completions", {"model": MODEL, "prompt": "a", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"model": MODEL, "prompt": "a", "top_k": -5}, 400, "top_k"),
    ("/v1/completions", {"model": MODEL, "prompt": "a", "min_p": 1.5}, 400, "min_p"),
    ("/v1/completions", {"model": MODEL, "prompt": "a", "repetition_penalty": 0}, 400, "repetition_penalty"),
    ("/v1/completions", {"model": MODEL, "prompt": "a", "n": 0}, 400, "n"),
    ("/v1/completions", {"model": MODEL, "prompt": "a", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ("/v1/completions", {"model": MODEL, "prompt": "a", "stop": [1]}, 400, "stop"),
    ("/v1/completions", {"model": MODEL, "prompt": "a", "seed": 1.5}, 400, "seed"),
    ("/v1/completions", {"model": MODEL, "prompt": "a", "stream": "yes"}, 400, "stream"),
    ("/v1/completions", {"model": MODEL, "prompt": "a", "logprobs": 50}, 400, "logprobs"),
    ("/v1/completions", {"model": MODEL, "prompt": "a", "presence_penalty": 0.5}, 400, "presence_penalty"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "a"}], "top_logprobs": 2}, 400, None),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "a"}], "tools": [{"type": "function"}]},
     400, "tools"),
    ("/v1/nowhere", {}, 404, None),
]


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server):
    url, _ = server
    with httpx.Client(base_url=url, timeout=30) as client:
        for path, body, status, param in BAD:
            r = client.post(path, content=body) if isinstance(body, bytes) else client.post(path, json=body)
            assert r.status_code == status, (body, r.text)
            err = r.json()["error"]
            assert set(err) == {"message", "type", "param", "code"} and err["message"], r.text
            assert err["param"] == param, (body, err)
            if param:
                assert param.split("[")[0].split(".")[0] in err["message"]
        r = client.get("/v1/completions")
        assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"
        # curl -d sends form-encoded: still read as JSON
        r = client.post("/v1/completions", content=json.dumps({"model": MODEL, "prompt": "a", "max_tokens": 2}),
                        headers={"content-type": "application/x-www-form-urlencoded"})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
        assert client.get("/health").json()["status"] == "ok"
    assert len(BAD) + 1 >= 20


def test_models_health_and_metrics(server):
    url, _ = server
    with httpx.Client(base_url=url) as client:
        models = client.get("/v1/models").json()
        assert [m["id"] for m in models["data"]] == [MODEL] and models["data"][0]["max_model_len"] == 512
        before = client.get("/metrics").text
        client.post("/v1/completions", json={"model": MODEL, "prompt": "Hello", "max_tokens": 4})
        text = client.get("/metrics").text
        assert client.get("/").text.count(MODEL) >= 2
    def value(metrics: str, name: str) -> float:
        return sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines() if line.startswith(name + " ")
                   or line.startswith(name + "{"))

    assert value(text, "llamazoo_generation_tokens_total") - value(before, "llamazoo_generation_tokens_total") == 4
    assert value(text, "llamazoo_time_to_first_token_seconds_count") >= 1
    assert value(text, "llamazoo_inter_token_latency_seconds_count") >= 3
    assert 'llamazoo_requests_total{endpoint="/v1/completions",status="200"}' in text
    for name in ("llamazoo_queue_depth", "llamazoo_running_sequences", "llamazoo_prompt_tokens_total",
                 'llamazoo_time_to_first_token_seconds_bucket{le="+Inf"}'):
        assert name in text


def test_api_key_and_full_queue(folder):
    with running_server(folder, "serve.api_key=s3cret", "serve.max_concurrent=1", "serve.max_queue=0") as (url, _):
        body = {"model": MODEL, "prompt": "Hello", "max_tokens": 3}
        assert httpx.post(url + "/v1/completions", json=body).status_code == 401
        r = httpx.post(url + "/v1/completions", json=body, headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        client = openai.OpenAI(base_url=url + "/v1", api_key="s3cret")
        assert client.completions.create(**body).usage.completion_tokens == 3
        assert httpx.get(url + "/health").status_code == 200  # no key needed
        with httpx.Client(base_url=url, headers={"Authorization": "Bearer s3cret"}, timeout=60) as c:
            long_body = {**body, "max_tokens": 400, "stream": True, "ignore_eos": True}
            with c.stream("POST", "/v1/completions", json=long_body) as long:
                stream_lines = long.iter_lines()  # kept: a dropped line iterator closes the stream
                next(stream_lines)
                r = c.post("/v1/completions", json=body)
                assert r.status_code == 429 and r.headers["retry-after"] == "1"
                assert r.json()["error"]["code"] == "rate_limit_exceeded"
                rest = [line for line in stream_lines if line.startswith("data: ")]
                assert rest[-1] == "data: [DONE]"
                assert json.loads(rest[-2][6:])["choices"][0]["finish_reason"] == "length"  # unharmed
        assert client.completions.create(**body).usage.completion_tokens == 3


def test_a_taken_port_is_one_clear_error(capsys):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        assert main(["serve", f"serve.port={port}"]) == 1
    err = capsys.readouterr().err
    assert err.strip() == (f"llamazoo serve: error: serve.host=127.0.0.1 serve.port={port}: cannot listen there "
                           f"(Address already in use); choose another serve.host or serve.port (serve.port=0 picks "
                           f"a free one)")


def test_serve_command_sigterm_lets_the_stream_finish_and_exits_0(folder):
    """The command itself, one process: HTTP in a thread, decode steps in the main thread; SIGTERM with a
    stream in flight: no new connections, the stream runs to its end, exit status 0."""
    import signal
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "llamazoo", "serve", f"checkpoint.model_name_or_path={folder}", "model.device=cpu",
           "generation.threads=1", "serve.port=0", "serve.shutdown_timeout=60"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    try:
        url = url_from_log(proc, lines)
        t, result = stream_in_flight(url, MODEL, 200)
        proc.send_signal(signal.SIGTERM)
        assert t.is_alive()  # the stream was in flight
        t.join(120)
        assert proc.wait(60) == 0, "".join(lines) + proc.stderr.read()
        assert result["lines"][-1] == "data: [DONE]"
        texts = [json.loads(line[6:])["choices"][0] for line in result["lines"][:-1]]
        assert texts[-1]["finish_reason"] == "length"
        with pytest.raises(httpx.ConnectError):
            httpx.get(url + "/health")
        log = "".join(lines) + proc.stderr.read()
        assert "prompt=1 cached=0 completion=200" in log and log.rstrip().endswith("INFO stopped")
    finally:
        if proc.poll() is None:
            proc.kill()
