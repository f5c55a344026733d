"""`llamazoo generate` / `llamazoo chat` end to end: default run, outputs, report arithmetic, clear errors."""
from __future__ import annotations

import io
import json
import shutil

import pytest

from conftest import hf_tiny_model
from llamazoo.cli import main
from llamazoo.generation.engine import RowResult
from llamazoo.generation.report import Report, aggregate_metrics, row_metrics


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, default_model_dir):
    """A tiny random Llama with SmolLM2's tokenizer and chat template (vocab 49152, 2 layers)."""
    out = tmp_path_factory.mktemp("tiny_chat")
    hf_tiny_model(vocab_size=49152, max_position_embeddings=128, eos_token_id=2).save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(default_model_dir / name, out / name)
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0], "do_sample": False}))
    return out


def run_cli(argv, capsys):
    code = main(argv)
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def test_default_command_completes_once_upon_a_time(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(["generate"], capsys)
    assert code == 0, err
    assert out.startswith("Once upon a time")
    completion = out.split("\n")[0]
    assert len(completion) > len("Once upon a time") + 20
    for label in ("Time to first token", "Latency per token excluding the first", "Latency per token overall",
                  "Total latency", "Tokens/second excluding the first", "Tokens/second overall",
                  "Prompt tokens/second"):
        assert label in out
    summary = (tmp_path / "generate_output" / "summary.txt").read_text()
    assert "Total latency" in summary and "generated tokens: 20" in summary
    assert (tmp_path / "generate_output" / "completions.txt").read_text().startswith(completion)


def test_compile_true_gives_eager_tokens_and_reports_which_decode_step_ran(tiny_folder, tmp_path, capsys):
    prompts = json.dumps(["Hello there", "A much longer prompt about llamas", "x"])
    common = [f"checkpoint.model_name_or_path={tiny_folder}", "generation.max_new_tokens=8",
              f"generation.output_dir={tmp_path / 'o'}", "generation.output_format=jsonl",
              f"generation.prompts={prompts}"]
    runs = {}
    for extra in ([], ["generation.compile=true"], ["generation.compile=true", "generation.batch_size=2"]):
        code, out, err = run_cli(["generate", *common, *extra], capsys)
        assert code == 0, err
        runs[" ".join(extra)] = ([json.loads(line)["token_ids"] for line in out.splitlines()], err)
    tokens = {k: v[0] for k, v in runs.items()}
    assert tokens["generation.compile=true"] == tokens[""]
    assert tokens["generation.compile=true generation.batch_size=2"] == tokens[""]
    assert "decode_step: eager" in runs[""][1]
    assert "decode_step: compiled" in runs["generation.compile=true"][1]
    assert "compile_warmup_s" in runs["generation.compile=true"][1]
    assert "decode_step: compiled at batch 1, else eager" in runs["generation.compile=true generation.batch_size=2"][1]


def test_compile_auto_compiles_long_batch_1_runs_only_and_gives_eager_tokens(tiny_folder, tmp_path, capsys,
                                                                             monkeypatch):
    """generation.compile=auto (the default): eager for short runs and batches; a long batch-1 run (the
    threshold lowered here, the tiny model has 128 positions) compiles, with the weights held once, and
    gives the tokens of compile=false. (auto compiles where llamazoo's decode stack cannot run: made so here.)"""
    import llamazoo.generation.engine as engine_module

    monkeypatch.setattr(engine_module, "AUTO_COMPILE_MIN_TOKENS", 24)
    monkeypatch.setattr(engine_module, "decode_stack_fits", lambda model: False)
    packed = []
    real_engine = engine_module.Engine

    def engine_spy(*args, **kwargs):
        e = real_engine(*args, **kwargs)
        packed.append(e.packed)
        return e

    monkeypatch.setattr("llamazoo.generation.app.Engine", engine_spy)
    common = [f"checkpoint.model_name_or_path={tiny_folder}", f"generation.output_dir={tmp_path / 'o'}",
              "generation.output_format=jsonl", 'generation.prompts=["Hello there", "x"]']
    runs = {}
    for extra in (["generation.max_new_tokens=12"], ["generation.max_new_tokens=12", "generation.compile=false"],
                  ["generation.max_new_tokens=12", "generation.batch_size=2"]):
        code, out, err = run_cli(["generate", *common, *extra], capsys)
        assert code == 0, err
        runs[" ".join(extra)] = ([json.loads(line)["token_ids"] for line in out.splitlines()], err)
    auto, off, batched = runs.values()
    assert "compile: auto: compiled (batch 1, 24 tokens to decode)" in auto[1] and "decode_step: compiled" in auto[1]
    assert "compile: false" in off[1] and "decode_step: eager" in off[1]
    assert "compile: auto: eager (batch > 1" in batched[1]
    assert auto[0] == off[0] == batched[0]
    assert packed == [False, True, True]  # compiled by auto: no packed copies beside the plain weights
    code, out, err = run_cli(["generate", *common, "generation.max_new_tokens=11"], capsys)
    assert "compile: auto: eager (22 tokens to decode, under 24: a compile would not pay)" in err


def test_jsonl_batches_match_single_runs(tiny_folder, tmp_path, capsys):
    prompts = ["Hello there", "A much longer prompt about llamas and alpacas", "x"]
    common = [f"checkpoint.model_name_or_path={tiny_folder}", "generation.max_new_tokens=12",
              f"generation.output_dir={tmp_path / 'o'}", "generation.output_format=jsonl"]
    code, out, err = run_cli(["generate", *common, f"generation.prompts={json.dumps(prompts)}",
                              "generation.batch_size=2"], capsys)
    assert code == 0, err
    recs = [json.loads(line) for line in out.splitlines()]
    assert [r["prompt"] for r in recs] == prompts
    assert set(recs[0]) >= {"prompt", "completion", "token_ids", "stop_reason", "timings"}
    assert "Total latency" in err  # the report goes to stderr so stdout stays jsonl
    assert (tmp_path / "o" / "completions.jsonl").read_text().splitlines() == out.splitlines()
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["aggregate"]["prompts"] == 3 and summary["aggregate"]["batches"] == 2
    for i, p in enumerate(prompts):
        code, out1, _ = run_cli(["generate", *common, f"generation.prompts={json.dumps([p])}"], capsys)
        assert json.loads(out1)["token_ids"] == recs[i]["token_ids"]


def test_several_eos_ids_from_generation_config(tiny_folder, tmp_path, capsys):
    common = [f"checkpoint.model_name_or_path={tiny_folder}", "generation.max_new_tokens=20",
              "generation.output_dir=null", "generation.output_format=jsonl"]
    _, out, _ = run_cli(["generate", *common, "generation.eos_token_ids=[]"], capsys)
    free = json.loads(out)["token_ids"]
    eos = [free[4], free[9]]
    _, out, _ = run_cli(["generate", *common, f"generation.eos_token_ids={eos}"], capsys)
    rec = json.loads(out)
    cut = next(i for i, t in enumerate(free) if t in eos)
    assert rec["token_ids"] == free[:cut + 1] and rec["stop_reason"] == "eos"


def test_chat_template_and_system(tiny_folder, capsys):
    from llamazoo.config import GenerateConfig, load_config
    from llamazoo.generation.app import encode_prompts, load

    cfg = load_config(GenerateConfig, None, [f"checkpoint.model_name_or_path={tiny_folder}",
                                             "generation.chat=true", "generation.system=Be brief."])
    tok = load(cfg).tokenizer
    ids = encode_prompts(cfg.generation, tok, 128)[0]
    assert tok.decode(ids) == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nOnce upon a time"
                               "<|im_end|>\n<|im_start|>assistant\n")


def test_chat_command_reads_stdin(tiny_folder, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("Hi\n/system Talk like a pirate.\nHello again\n/bogus\n/exit\nnot read\n"))
    code, out, err = run_cli(["chat", f"checkpoint.model_name_or_path={tiny_folder}",
                              "generation.max_new_tokens=5"], capsys)
    assert code == 0, err
    assert "(system message set; conversation reset)" in out and "unknown command /bogus" in out


def test_chat_session_keeps_history_and_drops_old_turns(tiny_folder):
    from llamazoo.generation.chat import ChatSession
    from llamazoo.generation.engine import Engine
    from llamazoo.generation.sampling import SamplingParams
    from llamazoo.io.hf import load_model
    from llamazoo.io.tokenizer import load_tokenizer

    engine = Engine(load_model(tiny_folder), load_tokenizer(tiny_folder), max_seq_length=128)
    s = ChatSession(engine, SamplingParams(), 8, [2], system="S")
    s.reply("first")
    assert [m["role"] for m in s.history] == ["user", "assistant"]
    s.reply("second " * 45)
    s.reply("third " * 45)  # no longer fits with the first turns: they go, the system message stays
    assert s.history[0]["content"].startswith(("second", "third")) and s.messages()[0]["content"] == "S"
    assert s.command("/reset") and s.history == []
    assert s.command("/exit") is None


@pytest.mark.parametrize("override, message", [
    ('generation.prompts=["ok", ""]', r"generation.prompts\[1\] is empty"),
    ("generation.prompts=[]", "generation.prompts"),
    ("generation.batch_size=3", "batch_size=3 but there are only 1 prompt"),
    ("model.max_seq_length=24", r"prompts\[0\] has \d+ tokens.*at most 4.*truncate_prompt=left"),
    ("generation.max_new_tokens=200", "leaves no room"),
    ("generation.temprature=0.5", "unknown key 'generation.temprature'"),
    ("generation.top_p=1.5", "generation.top_p"),
    ("generation.system=hi", "generation.chat=true"),
    ("checkpoint.config_name=llama2-7b", "cannot generate text"),
])
def test_bad_input_is_one_clear_line(tiny_folder, capsys, override, message):
    prompt = 'generation.prompts=["' + "word " * 30 + '"]'
    argv = ["generate", f"checkpoint.model_name_or_path={tiny_folder}", "generation.max_new_tokens=20",
            "generation.output_dir=null"]
    argv += [prompt] if "max_seq_length" in override else []
    code, out, err = run_cli(argv + [override], capsys)
    assert code == 1
    assert err.startswith("llamazoo generate: error:") and len(err.strip().splitlines()) == 1
    import re

    assert re.search(message, err), err


def test_truncate_left_keeps_the_last_tokens(tiny_folder, capsys):
    prompt = 'generation.prompts=["' + "word " * 30 + 'end"]'
    code, out, err = run_cli(["generate", f"checkpoint.model_name_or_path={tiny_folder}", prompt,
                              "generation.max_new_tokens=20", "model.max_seq_length=24",
                              "generation.truncate_prompt=left", "generation.output_dir=null",
                              "generation.output_format=jsonl"], capsys)
    assert code == 0, err
    rec = json.loads(out)
    assert len(rec["prompt_token_ids"]) == 4 and len(rec["token_ids"]) == 20


def test_report_arithmetic():
    a = RowResult([1, 2, 3, 4], token_ids=[5] * 5, time_to_first_token=0.5, total_time=2.5)
    b = RowResult([1, 2], token_ids=[5] * 3, time_to_first_token=0.5, total_time=1.5)
    c = RowResult([1], token_ids=[5] * 4, time_to_first_token=0.2, total_time=1.2, batch_id=1)
    m = row_metrics(a)
    assert m["total_latency_s"] == 2.5  # not multiplied by the batch size
    assert m["latency_per_token_excl_first_ms"] == pytest.approx(500) and m["latency_per_token_ms"] == 500
    assert m["tokens_per_s"] == 2 and m["tokens_per_s_excl_first"] == pytest.approx(2)
    assert m["prompt_tokens_per_s"] == 8
    agg = aggregate_metrics([a, b, c])
    assert agg["total_latency_s"] == pytest.approx(2.5 + 1.2)  # batches run one after the other
    assert agg["tokens_per_s"] == pytest.approx(12 / 3.7)
    assert agg["tokens_per_s_excl_first"] == pytest.approx((12 - 3) / (3.7 - 0.7))
    assert agg["prompt_tokens_per_s"] == pytest.approx(7 / 0.7)
    assert agg["time_to_first_token_s"] == pytest.approx(1.2 / 3)
    text = Report([a, b, c], {"model": "m"}).format_text()
    assert "Total latency: 3.7000 s" in text and "row" in text
    one = RowResult([1], token_ids=[7], time_to_first_token=0.1, total_time=0.1)
    assert "Latency per token excluding the first: n/a" in Report([one], {}).format_text()


def test_ctrl_c_ends_the_answer_not_the_session(tiny_folder):
    from llamazoo.generation.chat import ChatSession
    from llamazoo.generation.engine import Engine
    from llamazoo.generation.sampling import SamplingParams
    from llamazoo.io.hf import load_model
    from llamazoo.io.tokenizer import load_tokenizer

    engine = Engine(load_model(tiny_folder), load_tokenizer(tiny_folder), max_seq_length=128)
    s = ChatSession(engine, SamplingParams(), 30, [])
    pieces = []

    def impatient(text: str) -> None:
        pieces.append(text)
        if len(pieces) == 3:
            raise KeyboardInterrupt

    row = s.reply("tell me a story", impatient)
    assert row.stop_reason == "interrupted" and row.num_tokens < 30
    assert s.history[-1] == {"role": "assistant", "content": row.text}
    assert s.reply("go on").stop_reason == "length"  # the session goes on


def test_a_single_prompt_string_is_accepted():
    from llamazoo.config import GenerateConfig, load_config

    cfg = load_config(GenerateConfig, None, ["generation.prompts=Hello there", "generation.stop=END"])
    assert cfg.generation.prompts == ["Hello there"] and cfg.generation.stop == ["END"]


def test_threads_follow_the_cpus_use_now_not_the_load_average(monkeypatch):
    """A run started right after another one (whose work still fills the 1-minute load average) gets
    every core; cores that other work keeps busy now are left to it."""
    import os

    import torch

    from llamazoo.generation import app

    cores = torch.get_num_threads()
    monkeypatch.setattr(os, "getloadavg", lambda: (float(cores), float(cores), float(cores)))
    ticks = iter([{0: (100, 1000), 1: (500, 1000)}, {0: (100, 1010), 1: (500, 1010)}])  # both idle
    monkeypatch.setattr(app, "cpu_times", lambda: next(ticks))
    assert app.pick_threads(None) == cores
    ticks = iter([{0: (100, 1000), 1: (500, 1000)}, {0: (110, 1010), 1: (502, 1010)}])  # one busy, one 20%
    assert app.busy_cores(0.0) == pytest.approx(1.2)
    monkeypatch.setattr(app, "busy_cores", lambda: 1.2)
    assert app.pick_threads(None) == max(1, cores - 1)
    assert app.pick_threads(3) == 3
    monkeypatch.setattr(app, "busy_cores", lambda: None)  # no /proc/stat: the load average it is
    assert app.pick_threads(None) == 1


def test_busy_cores_sees_a_process_spinning_now(tmp_path):
    import subprocess
    import sys

    from llamazoo.generation.app import busy_cores, cpu_times

    assert cpu_times(str(tmp_path / "missing")) is None
    spinner = subprocess.Popen([sys.executable, "-c", "import time\nt = time.time()\nwhile time.time() < t + 30: pass"])
    try:
        import time

        time.sleep(0.3)  # started and spinning
        assert busy_cores(0.3) >= 0.7
    finally:
        spinner.kill()
        spinner.wait()
