"""The lm-evaluation-harness backend against lm_eval's own `hf` backend on local tasks written here: multiple
choice and rolling log-likelihood on a tiny random Llama (per-sample log-likelihoods within 1e-4, the same
greedy flags and accuracies), generate_until with stop sequences on SmolLM2 (the same texts); and the
`llamazoo eval harness` / `llamazoo eval lm_eval` command lines."""
from __future__ import annotations

import functools
import json
import random
import shutil
from pathlib import Path

import pytest
from conftest import hf_tiny_model

from llamazoo.cli import main

WORDS = ("river mountain village market garden morning evening story question answer people water light house "
         "road friend teacher student book paper window table bridge harbor lantern orchard").split()


def write_tasks(folder: Path, seed: int = 0) -> Path:
    """Three task YAMLs over local jsonl (dataset_path: json): local_mc (4 choices; two questions share a
    context, one choice repeats), local_rolling (documents longer than the tiny model's 64 positions),
    local_gen (stops at a newline or a full stop, 10 tokens at most)."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)

    def words(lo: int, hi: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))

    mc = [{"question": words(3, 18), "choices": [words(1, 6) for _ in range(4)], "answer": rng.randrange(4)}
          for _ in range(10)]
    mc.append(dict(mc[0], answer=(mc[0]["answer"] + 1) % 4))  # the same context again
    mc[1]["choices"][2] = mc[1]["choices"][0]  # the same continuation twice
    docs = [{"text": words(2, 100)} for _ in range(5)] + [{"text": ""}]
    gen = [{"prompt": p, "answer": a} for p, a in (
        ("The capital of France is", " Paris"), ("One, two, three, four,", " five"),
        ("Q: What color is the sky on a clear day?\nA:", " Blue"), ("def add(a, b):\n    return", " a + b"))]
    files = {"mc": mc, "docs": docs, "gen": gen}
    for name, rows in files.items():
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    def head(task: str, data: str) -> str:
        return (f"task: {task}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {folder / data}\n"
                f"  cache_dir: {folder / 'hf_datasets'}\ntest_split: test\n")

    (folder / "mc.yaml").write_text(head("local_mc", "mc.jsonl") + (
        'output_type: multiple_choice\ndoc_to_text: "Question: {{question}}\\nAnswer:"\n'
        'doc_to_choice: "{{choices}}"\ndoc_to_target: "{{answer}}"\nmetric_list:\n  - metric: acc\n'))
    (folder / "rolling.yaml").write_text(head("local_rolling", "docs.jsonl") + (
        'output_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: "{{text}}"\n'
        "metric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n"))
    (folder / "gen.yaml").write_text(head("local_gen", "gen.jsonl") + (
        'output_type: generate_until\ndoc_to_text: "{{prompt}}"\ndoc_to_target: "{{answer}}"\n'
        'generation_kwargs:\n  until: ["\\n", "."]\n  max_gen_toks: 10\n  do_sample: false\n'
        "metric_list:\n  - metric: exact_match\n"))
    return folder


@pytest.fixture(scope="module")
def tasks(tmp_path_factory) -> Path:
    return write_tasks(tmp_path_factory.mktemp("lm_eval_tasks"))


@pytest.fixture(scope="module")
def tiny_sp(tmp_path_factory, tokenizers) -> Path:
    """A tiny random Llama (64 positions) with the SentencePiece tokenizer (a BOS on every text)."""
    out = tmp_path_factory.mktemp("harness_tiny")
    hf_tiny_model(vocab_size=1000, max_position_embeddings=64).save_pretrained(out)
    shutil.copy(tokenizers("sentencepiece") / "tokenizer.model", out / "tokenizer.model")
    # said explicitly, so that lm_eval's hf backend (plain AutoTokenizer) adds the BOS that llamazoo's
    # tokenizer loader adds by Llama-2's convention to a folder without a tokenizer_config.json
    (out / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": True, "add_eos_token": False}))
    return out


def evaluate(backend, folder: Path, tasks: Path, names: list[str], batch_size: int) -> dict:
    """lm_eval.simple_evaluate of a registered backend name (or a built model) on the local tasks."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    import llamazoo.evaluation.harness  # noqa: F401  registers "llamazoo"

    return lm_eval.simple_evaluate(model=backend, model_args=f"pretrained={folder},dtype=float32",
                                   tasks=names, batch_size=batch_size, device="cpu", log_samples=True,
                                   task_manager=TaskManager(include_path=str(tasks), include_defaults=False))


@pytest.fixture(scope="module")
def smollm2(default_model_dir):
    from llamazoo.evaluation.harness import LlamazooLM

    return LlamazooLM(pretrained=str(default_model_dir), dtype="float32", device="cpu", batch_size=2)


def samples(results: dict, task: str) -> list[dict]:
    return sorted(results["samples"][task], key=lambda s: s["doc_id"])


def test_loglikelihood_and_rolling_equal_the_hf_backend(tiny_sp, tasks, one_thread):
    ours = evaluate("llamazoo", tiny_sp, tasks, ["local_mc", "local_rolling"], batch_size=3)
    ref = evaluate("hf", tiny_sp, tasks, ["local_mc", "local_rolling"], batch_size=3)
    for task in ("local_mc", "local_rolling"):
        a, b = samples(ours, task), samples(ref, task)
        assert len(a) == len(b) == (11 if task == "local_mc" else 6)
        for x, y in zip(a, b):
            assert len(x["resps"]) == len(y["resps"])
            for rx, ry in zip(x["resps"], y["resps"]):
                vx, vy = (rx[0][0], ry[0][0]) if task == "local_mc" else (rx[0], ry[0])
                assert abs(vx - vy) <= 1e-4 * max(1.0, abs(vy))
                if task == "local_mc":
                    assert rx[0][1] == ry[0][1]
    assert ours["results"]["local_mc"]["acc,none"] == ref["results"]["local_mc"]["acc,none"]
    from llamazoo.io.tokenizer import load_tokenizer

    docs = [json.loads(line)["text"] for line in (tasks / "docs.jsonl").read_text().splitlines()]
    assert max(len(load_tokenizer(tiny_sp).encode(d)) for d in docs) > 64  # several rolling windows


def test_generate_until_equals_the_hf_backend(smollm2, default_model_dir, tasks, one_thread):
    ours = evaluate(smollm2, default_model_dir, tasks, ["local_gen"], batch_size=2)
    ref = evaluate("hf", default_model_dir, tasks, ["local_gen"], batch_size=2)
    got = [s["resps"][0][0] for s in samples(ours, "local_gen")]
    assert got == [s["resps"][0][0] for s in samples(ref, "local_gen")]
    assert all("\n" not in g and "." not in g for g in got) and any(g.strip() for g in got)
    assert ours["results"]["local_gen"]["exact_match,none"] == ref["results"]["local_gen"]["exact_match,none"]


def test_chat_template_is_the_tokenizers(smollm2, default_model_dir):
    from llamazoo.io.tokenizer import load_tokenizer

    lm = smollm2
    history = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a color."}]
    want = load_tokenizer(default_model_dir).apply_chat_template(history)
    assert lm.apply_chat_template(history) == want and want.endswith("<|im_start|>assistant\n")
    prefilled = lm.apply_chat_template([*history, {"role": "assistant", "content": "Blue"}], False)
    assert prefilled.endswith("Blue")


def test_model_args_errors():
    from llamazoo.evaluation.harness import LlamazooLM

    with pytest.raises(ValueError, match="unknown trust_remote_code; known: pretrained"):
        LlamazooLM.create_from_arg_string("pretrained=default,trust_remote_code=True")
    with pytest.raises(ValueError, match="batch_size='auto'; give a number"):
        LlamazooLM.create_from_arg_string("pretrained=default,batch_size=auto")


@pytest.fixture
def local_tasks_only(monkeypatch):
    """lm_eval's TaskManager without its ~200 built-in task folders (indexing them takes tens of seconds);
    the tests' tasks are local."""
    import lm_eval.tasks

    monkeypatch.setattr(lm_eval.tasks, "TaskManager",
                        functools.partial(lm_eval.tasks.TaskManager, include_defaults=False))


def test_eval_harness_command(tiny_sp, tasks, tmp_path, capsys, one_thread, local_tasks_only):
    out = tmp_path / "results.json"
    assert main(["eval", "harness", "--tasks", "local_mc", "--include_path", str(tasks), "--limit", "4",
                 f"checkpoint.model_name_or_path={tiny_sp}", "model.dtype=float32", "eval.batch_size=4",
                 f"eval.output={out}"]) == 0
    assert "local_mc" in capsys.readouterr().out  # lm_eval's table
    res = json.loads(out.read_text())
    assert res["results"]["local_mc"]["sample_len"] == 4 and res["config"]["model"] == "llamazoo"
    assert main(["eval", "harness", "--tasks", "nope", "--include_path", str(tasks)]) == 1
    assert "llamazoo eval: error: --tasks: unknown task 'nope'" in capsys.readouterr().err


def test_lm_eval_command_line_has_the_model(tiny_sp, tasks, tmp_path, capsys, one_thread, local_tasks_only):
    """`llamazoo eval lm_eval ...` is lm_eval's command line (its defaults: --device cuda:0, --batch_size 1)
    with --model llamazoo; model_args win over its --batch_size."""
    assert main(["eval", "lm_eval", "--model", "llamazoo", "--model_args",
                 f"pretrained={tiny_sp},dtype=float32,batch_size=4", "--tasks", "local_mc",
                 "--include_path", str(tasks), "--limit", "3", "--output_path", str(tmp_path)]) == 0
    assert "llamazoo" in capsys.readouterr().out
    written = list(tmp_path.rglob("results_*.json"))
    assert len(written) == 1
    res = json.loads(written[0].read_text())
    assert res["results"]["local_mc"]["sample_len"] == 3 and res["config"]["batch_size"] in (1, "1")
