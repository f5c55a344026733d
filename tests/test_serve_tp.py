"""`torchrun --nproc_per_node 2 -m llamazoo serve ... parallel.tensor_parallel=2`: rank 0 serves, both ranks
decode their shard; concurrent requests give the one-process greedy tokens; SIGTERM to rank 0 lets the stream
in flight finish, then ends the world with status 0; one access-log line per request."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading

import httpx
import psutil
import pytest

from llamazoo.cli import main
from serve_helpers import stream_in_flight, tiny_chat_folder, url_from_log
from test_distributed_parallel import free_port, torchrun_env

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPTS = ["The llama is", "A much longer prompt about alpacas, their wool and the markets of the Andes"]


def test_tensor_parallel_serving_gives_one_process_tokens(tmp_path, default_model_dir, capsys):
    folder = tiny_chat_folder(tmp_path / "tiny", default_model_dir)
    common = [f"checkpoint.model_name_or_path={folder}", "model.device=cpu", "model.dtype=float32"]
    assert main(["generate", *common, f"generation.prompts={json.dumps(PROMPTS)}", "generation.max_new_tokens=16",
                 "generation.output_format=jsonl", f"generation.output_dir={tmp_path / 'gen'}"]) == 0
    ref = [json.loads(line)["completion"] for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "llamazoo", "serve", *common, "parallel.tensor_parallel=2",
           "serve.port=0", "serve.max_concurrent=4", "serve.prefill_chunk=16"]
    proc = subprocess.Popen(cmd, env=torchrun_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    try:
        url = url_from_log(proc, lines)
        got: dict[int, str] = {}

        def ask(i: int) -> None:
            r = httpx.post(url + "/v1/completions", timeout=120,
                           json={"model": "tiny", "prompt": PROMPTS[i], "max_tokens": 16})
            got[i] = r.json()["choices"][0]["text"]

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert [got[0], got[1]] == ref
        # SIGTERM to rank 0 with a stream in flight (torchrun's own SIGTERM handler ends with status 1
        # whatever the workers do): it stops accepting, lets the stream finish, tells rank 1 to stop, both
        # exit 0, so torchrun does too
        t, result = stream_in_flight(url, "tiny", 150)
        workers = psutil.Process(proc.pid).children(recursive=True)
        rank0 = [w for w in workers if w.environ().get("RANK") == "0" and "llamazoo" in " ".join(w.cmdline())]
        assert len(rank0) == 1
        rank0[0].send_signal(signal.SIGTERM)
        assert t.is_alive()  # the stream was in flight
        t.join(120)
        assert proc.wait(60) == 0, "".join(lines) + proc.stderr.read()
        assert result["lines"][-1] == "data: [DONE]"
        assert json.loads(result["lines"][-2][6:])["choices"][0]["finish_reason"] == "length"
        with pytest.raises(httpx.ConnectError):
            httpx.get(url + "/health")
        log = "".join(lines) + proc.stderr.read()
        assert log.count('"POST /v1/completions" 200') == 3 and "prompt=1 cached=0 completion=150" in log
    finally:
        if proc.poll() is None:
            proc.kill()
