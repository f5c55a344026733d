"""The embedded default model: GGUF conversion, transformers parity, greedy tokens, readable text."""
from __future__ import annotations

import json
import re

import pytest
import torch

import llamazoo
from llamazoo.io.default import find_gguf


@pytest.fixture(scope="module")
def models(default_model_dir):
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32).eval()
    ours = llamazoo.load_model("default")
    tok = llamazoo.load_tokenizer("default")
    return hf, ours, tok


def greedy(model, ids: torch.Tensor, n: int) -> list[int]:
    """Reference loop without cache, so it checks the model alone."""
    out = ids
    with torch.no_grad():
        for _ in range(n):
            nxt = model(out)[:, -1].argmax(-1, keepdim=True)
            out = torch.cat([out, nxt], dim=1)
    return out[0, ids.shape[1]:].tolist()


def test_converted_folder_is_smollm2(default_model_dir):
    cfg = json.loads((default_model_dir / "config.json").read_text())
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_key_value_heads"]) == (30, 576, 3)
    assert cfg["tie_word_embeddings"] is True
    assert llamazoo.load_model("default").config.num_parameters == 134_515_008


def test_conversion_equals_transformers_gguf_loader(models):
    """transformers' own GGUF loader (it dequantizes with the gguf package too) gives the same logits."""
    import transformers

    _, ours, tok = models
    gguf = find_gguf()
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                            dtype=torch.float32).eval()
    ids = torch.tensor([tok.encode("The capital of France is")])
    with torch.no_grad():
        assert (ref(ids).logits - ours(ids)).abs().max().item() <= 1e-4


def test_logits_and_32_greedy_tokens_match_transformers(models):
    hf, ours, tok = models
    ids = torch.tensor([tok.encode("Once upon a time")])
    with torch.no_grad():
        assert (hf(ids).logits - ours(ids)).abs().max().item() <= 1e-4
        ref = hf.generate(ids, max_new_tokens=32, do_sample=False, pad_token_id=tok.eos_token_id)
    assert greedy(ours, ids, 32) == ref[0, ids.shape[1]:].tolist()


def test_default_prompt_yields_readable_english(models):
    _, ours, tok = models
    ids = torch.tensor([tok.encode("Once upon a time")])
    text = tok.decode(greedy(ours, ids, 24))
    words = re.findall(r"[A-Za-z]+", text)
    common = {"the", "a", "of", "and", "was", "in", "to", "with", "city", "there", "who", "that", "is", "his", "her"}
    assert len(words) >= 12, text
    assert sum(w.lower() in common for w in words) >= 3, text
    assert all(ord(c) < 128 for c in text), text


def test_chat_template_and_special_tokens(models):
    _, _, tok = models
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")
    assert tok.encode("<|im_end|>", add_special_tokens=False) == [tok.eos_token_id]
