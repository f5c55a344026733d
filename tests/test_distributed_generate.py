"""`torchrun --nproc_per_node 2 -m llamazoo generate ... parallel.tensor_parallel=2` gives the same greedy
tokens as one process, with the KV cache sharded by heads; only rank 0 prints and writes."""
from __future__ import annotations

import json
import shutil

import pytest
from conftest import hf_tiny_model
from test_distributed_parallel import torchrun

from llamazoo.cli import main


@pytest.fixture(scope="module")
def tiny_gqa_folder(tmp_path_factory, default_model_dir):
    """A tiny random GQA Llama (4 query, 2 KV heads) with SmolLM2's tokenizer."""
    out = tmp_path_factory.mktemp("tiny_tp_gen")
    hf_tiny_model(vocab_size=49152, num_key_value_heads=2, max_position_embeddings=128).save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(default_model_dir / name, out / name)
    return out


def records(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_tp_generation_is_token_identical(tiny_gqa_folder, tmp_path, capsys):
    args = ["generate", f"checkpoint.model_name_or_path={tiny_gqa_folder}", "generation.max_new_tokens=16",
            'generation.prompts=["The llama is", "A much longer prompt about alpacas and their wool"]',
            "generation.batch_size=2", "generation.output_format=jsonl", "model.device=cpu",
            "model.dtype=float32"]
    assert main([*args, f"generation.output_dir={tmp_path / 'one'}"]) == 0
    ref = records(capsys.readouterr().out)
    p = torchrun(2, ["-m", "llamazoo", *args, "parallel.tensor_parallel=2",
                     f"generation.output_dir={tmp_path / 'tp'}"])
    got = records(p.stdout)
    assert len(ref) == len(got) == 2  # rank 1 printed nothing
    for a, b in zip(ref, got):
        assert a["token_ids"] == b["token_ids"] and len(a["token_ids"]) == 16
        assert a["completion"] == b["completion"]
    assert (tmp_path / "tp" / "summary.txt").is_file()


def test_tp_size_must_match_the_world(tiny_gqa_folder, tmp_path):
    p = torchrun(2, ["-m", "llamazoo", "generate", f"checkpoint.model_name_or_path={tiny_gqa_folder}",
                     "model.device=cpu", f"generation.output_dir={tmp_path}"], check=False)
    assert p.returncode != 0 and "parallel.tensor_parallel=2" in p.stderr
