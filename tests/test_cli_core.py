"""The CLI's core commands and its error contract: one clear line naming the file or key, exit 1, no traceback."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch


def llamazoo(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llamazoo", *args], capture_output=True, text=True, timeout=timeout)


def assert_clean_error(res: subprocess.CompletedProcess, *fragments: str) -> None:
    assert res.returncode == 1, (res.returncode, res.stdout, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert "Traceback" not in res.stderr
    for f in fragments:
        assert f in lines[0], lines[0]


def test_models_lists_exact_counts():
    res = llamazoo("models")
    assert res.returncode == 0, res.stderr
    for name, count in [("llama2-7b", "6,738,415,616"), ("llama2-70b", "68,976,648,192"),
                        ("llama3.1-70b", "70,553,706,496"), ("smollm2-135m", "134,515,008")]:
        assert any(line.startswith(name + " ") and count in line for line in res.stdout.splitlines()), name
    data = json.loads(llamazoo("models", "--json").stdout)
    assert {r["name"]: r["parameters"] for r in data}["llama3-8b"] == 8_030_261_248


@pytest.fixture
def broken(hf_folder):
    _, folder = hf_folder(save_kwargs=dict(max_shard_size="100KB"))
    return folder


def test_missing_config_json(broken, tmp_path):
    (broken / "config.json").unlink()
    res = llamazoo("convert", "--from-hf", str(broken), "--output", str(tmp_path / "o"))
    assert_clean_error(res, str(broken), "no config.json")


def test_missing_shard(broken, tmp_path):
    shard = sorted(broken.glob("model-*.safetensors"))[1]
    shard.unlink()
    res = llamazoo("convert", "--from-hf", str(broken), "--output", str(tmp_path / "o"))
    assert_clean_error(res, shard.name, "missing", "model.safetensors.index.json")
    assert not (tmp_path / "o").exists()


def test_tensor_of_wrong_shape(hf_folder, tmp_path):
    from safetensors.torch import load_file, save_file

    _, folder = hf_folder()
    sd = load_file(folder / "model.safetensors")
    sd["model.layers.1.mlp.up_proj.weight"] = torch.zeros(3, 64)
    save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})
    res = llamazoo("convert", "--from-hf", str(folder), "--output", str(tmp_path / "o"))
    assert_clean_error(res, "model.layers.1.mlp.up_proj.weight", "(3, 64)", "(112, 64)", "model.safetensors")


def test_unknown_model_name(tmp_path):
    res = llamazoo("convert", "--from-hf", "llama9-1t", "--output", str(tmp_path / "o"))
    assert_clean_error(res, "llama9-1t", "not a model name", "llama2-7b")


def test_non_llama_model_type(broken, tmp_path):
    cfg = json.loads((broken / "config.json").read_text())
    cfg["model_type"] = "mistral"
    (broken / "config.json").write_text(json.dumps(cfg))
    res = llamazoo("convert", "--from-hf", str(broken), "--output", str(tmp_path / "o"))
    assert_clean_error(res, "config.json", "model_type is 'mistral'", "'llama'")


def test_debug_shows_traceback(tmp_path):
    res = llamazoo("--debug", "convert", "--from-hf", "llama9-1t", "--output", str(tmp_path / "o"))
    assert res.returncode != 0 and "Traceback" in res.stderr


def test_convert_gguf_cli(tmp_path, default_model_dir):
    """`convert --from-gguf` writes a folder equal to the cached default (sharded on request)."""
    from llamazoo.io.default import find_gguf
    from llamazoo.io.hf import load_model

    out = tmp_path / "smol"
    res = llamazoo("convert", "--from-gguf", str(find_gguf()), "--output", str(out), "--max-shard-size", "200MB")
    assert res.returncode == 0, res.stderr
    assert (out / "model.safetensors.index.json").is_file() and (out / "tokenizer.json").is_file()
    a, b = load_model(out), load_model(default_model_dir)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    again = llamazoo("convert", "--from-gguf", str(find_gguf()), "--output", str(out))
    assert_clean_error(again, str(out), "already exists", "--overwrite")
