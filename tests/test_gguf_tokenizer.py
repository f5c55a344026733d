"""GGUF tokenizers equal the originals: llama.cpp's vocab test suite (ids the original HF tokenizers give),
through the tokenizer builder `convert --from-gguf` uses, and SmolLM2's GGUF against the ids it had before."""
from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path

import pytest

from llama_cpp_vocab import fetch_vocab_suite, vocab_cases
from llamazoo.io.gguf_tokenizer import gguf_tokenizer, read_gguf_metadata
from llamazoo.io.tokenizer import load_tokenizer_from_folder

DATA = Path(__file__).resolve().parent / "data"

# The suite's vocabularies a Llama-architecture GGUF carries, and why each is Llama-family:
LLAMA_FAMILY = {
    "llama-spm": "Llama-2's SentencePiece tokenizer",
    "phi-3": "Llama-2's SentencePiece vocabulary plus chat tokens (same tokenizer type and normalization)",
    "llama-bpe": "Llama-3's byte-level BPE",
    "deepseek-llm": "general.architecture 'llama' (DeepSeek-LLM 7B is a Llama model)",
    "deepseek-coder": "general.architecture 'llama' (DeepSeek-Coder 6.7B is a Llama model)",
    "starcoder": "SmolLM's pre-tokenizer (each digit alone, then GPT-2's split): the default model's",
    "refact": "SmolLM's pre-tokenizer",
    "gpt-2": "GPT-2's split: what a byte-level GGUF without tokenizer.ggml.pre gets",
}  # command-r shares SmolLM's pre-tokenizer and passes too, but its 256k vocabulary takes ~10 s to build


@pytest.fixture(scope="module")
def suite() -> Path:
    return fetch_vocab_suite(list(LLAMA_FAMILY))


@lru_cache(maxsize=None)
def built(gguf: Path):
    """Each vocabulary is built once per session (Llama-3's takes seconds)."""
    return gguf_tokenizer(gguf)


@pytest.mark.parametrize("name", LLAMA_FAMILY)
def test_llama_cpp_vocab_suite(suite, name):
    """Every test string of llama.cpp's suite gives the original tokenizer's ids (no special tokens)."""
    tok = built(suite / f"ggml-vocab-{name}.gguf")
    cases = vocab_cases(suite, name)
    assert len(cases) >= 46
    wrong = [(text, ids, tok.encode(text, add_special_tokens=False)) for text, ids in cases]
    wrong = [w for w in wrong if w[1] != w[2]]
    assert not wrong, f"{len(wrong)}/{len(cases)} wrong, e.g. {wrong[:3]}"


def test_sentencepiece_folder_is_a_llama2_folder(suite, tmp_path):
    """The saved folder keeps the rebuilt tokenizer.model; SentencePiece itself and the reloaded folder give
    the suite's ids; BOS is added, special tokens stay whole, a re-save keeps tokenizer.model."""
    import sentencepiece

    tok = built(suite / "ggml-vocab-llama-spm.gguf")
    tok.save(tmp_path / "a")
    sp = sentencepiece.SentencePieceProcessor(model_file=str(tmp_path / "a" / "tokenizer.model"))
    again = load_tokenizer_from_folder(tmp_path / "a")
    for text, ids in vocab_cases(suite, "llama-spm"):
        assert sp.encode(text) == ids and again.encode(text) == [1] + ids, text
    assert tok.encode(" ") == [1, 259]  # the dummy prefix space before a leading space ("▁▁")
    assert tok.encode("<s>[INST] hi", add_special_tokens=False) == [1, 518, 25580, 29962, 7251]
    assert (tok.bos_token_id, tok.eos_token_id, tok.add_bos) == (1, 2, True)
    again.save(tmp_path / "b")
    assert (tmp_path / "b" / "tokenizer.model").read_bytes() == (tmp_path / "a" / "tokenizer.model").read_bytes()


def test_flags_special_tokens_and_chat_template(suite):
    """BOS/EOS flags from the file (llama.cpp's defaults when absent), control tokens as special tokens."""
    llama3 = built(suite / "ggml-vocab-llama-bpe.gguf")  # no add_bos flag: Llama-3 adds BOS
    assert llama3.encode("Hello world") == [128000, 9906, 1917]
    assert llama3.vocab_size == 128256  # control tokens reuse their ids: no token added past the vocabulary
    assert llama3.encode("a<|end_of_text|>", add_special_tokens=False) == [64, 128001]
    assert llama3.decode([128000, 9906, 128001], skip_special_tokens=True) == "Hello"

    phi3 = built(suite / "ggml-vocab-phi-3.gguf")
    assert phi3.encode("<|user|>\nHi<|end|>", add_special_tokens=False)[0] == 32010
    assert phi3.apply_chat_template([{"role": "user", "content": "Hi"}]).startswith("<s><|user|>\nHi<|end|>")

    meta = read_gguf_metadata(suite / "ggml-vocab-llama-spm.gguf")
    flipped = gguf_tokenizer("flipped.gguf", {**meta, "tokenizer.ggml.add_bos_token": False,
                                              "tokenizer.ggml.add_eos_token": True})
    assert flipped.encode("Hello") == [15043, 2]


def test_bad_vocabularies_are_one_clear_error(suite, tmp_path):
    meta = read_gguf_metadata(suite / "ggml-vocab-gpt-2.gguf")
    with pytest.raises(ValueError, match=r"^x\.gguf: tokenizer\.ggml\.pre 'nope' is not a pre-tokenizer "
                                         r"llamazoo knows \(known: .*llama-bpe.*smollm"):
        gguf_tokenizer("x.gguf", {**meta, "tokenizer.ggml.pre": "nope"})
    with pytest.raises(ValueError, match=r"^x\.gguf: tokenizer\.ggml\.model 'bert' is not supported"):
        gguf_tokenizer("x.gguf", {**meta, "tokenizer.ggml.model": "bert"})
    cut = tmp_path / "cut.gguf"
    cut.write_bytes((suite / "ggml-vocab-llama-spm.gguf").read_bytes()[:5000])
    with pytest.raises(ValueError, match=r"cut\.gguf: damaged or truncated GGUF file "
                                         r"\(metadata cut off at byte \d+\)$"):
        gguf_tokenizer(cut)


def test_smollm2_tokenizer_is_unchanged_on_normal_text(tmp_path):
    """The default model's GGUF (pre 'smollm') gives the ids it had before (tests/data/smollm2_gguf_ids.json:
    README lines, chat, code, numbers), also saved and reloaded as `convert --from-gguf` writes it. Only a
    run of spaces before a digit tokenizes differently: the old converter skipped SmolLM's digit split, so it
    gave "  8" as ["Ġ", "Ġ", "8"] where the original (and llama.cpp) gives ["ĠĠ", "8"]."""
    from llamazoo.io.default import find_gguf

    before = json.loads((DATA / "smollm2_gguf_ids.json").read_text(encoding="utf-8"))["cases"]
    ours = gguf_tokenizer(find_gguf())
    ours.save(tmp_path / "smol")
    saved = load_tokenizer_from_folder(tmp_path / "smol")
    differ = []
    for case in before:
        ids = ours.encode(case["text"])
        assert saved.encode(case["text"]) == ids
        if ids != case["ids"]:
            differ.append(case["text"])
            assert ours.decode(ids) == case["text"]
    assert len(before) >= 200 and len(differ) <= 10
    assert all(re.search(r"\s\s\d", t) for t in differ), differ
    assert ours.convert_ids_to_tokens(ours.encode("size  8")) == ["size", "ĠĠ", "8"]
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id, ours.add_bos) == (1, 2, 2, False)
    assert ours.apply_chat_template([{"role": "user", "content": "Hi"}]) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
