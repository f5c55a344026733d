"""Tokenizers give the same ids as transformers.AutoTokenizer; chat templates render identically."""
from __future__ import annotations

import random

import pytest
from generated_data import SENTENCEPIECE_VOCAB

from llamazoo.io.tokenizer import load_tokenizer


def varied_strings(n: int = 300) -> list[str]:
    rng = random.Random(0)
    pieces = ["Hello", "world", " ", "  ", "   ", "\n", "\n\n", "\t", "日本語", "テキスト", "🤗", "🎉", "café",
              "naïve", "Ünïcödé", "123", "4,567.89", "$", "'s", "don't", "<s>", "</s>", "<|endoftext|>",
              "<|im_start|>", "<|im_end|>", "def f(x):", "    return x", "ü", "ß", "Ω", "\u200b", "a" * 30, "—",
              "...", "?!", "#", "@user", "https://example.com/a?b=c", "SELECT * FROM t;", "x", "I", "the"]
    out = ["", " ", "a", "Once upon a time", " leading space", "trailing space ", "\n", "  \n  "]
    while len(out) < n:
        out.append("".join(rng.choice(pieces) + rng.choice(["", " ", ""]) for _ in range(rng.randint(1, 12))))
    return out


def reference(folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


@pytest.mark.parametrize("name", ["gpt2", "sentencepiece", "smollm2"])
def test_ids_match_autotokenizer(name, tokenizers, default_model_dir):
    folder = default_model_dir if name == "smollm2" else tokenizers(name)
    ours, ref = load_tokenizer(folder), reference(folder)
    for s in varied_strings():
        assert ours.encode(s, add_special_tokens=False) == ref.encode(s, add_special_tokens=False), repr(s)
        ids = ours.encode(s)
        assert ours.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)


def test_sentencepiece_folder_matches_sentencepiece_and_adds_bos(tokenizers):
    """A folder with only a tokenizer.model (Llama-2's layout; the model has Llama-2's settings, see
    tests/generated_data.py) encodes exactly as SentencePiece itself, with Llama's BOS first."""
    import sentencepiece

    folder = tokenizers("sentencepiece")
    tok = load_tokenizer(folder)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.get_piece_size()) == (0, 1, 2, SENTENCEPIECE_VOCAB)
    assert (tok.bos_token_id, tok.eos_token_id, tok.vocab_size) == (1, 2, SENTENCEPIECE_VOCAB)
    assert tok.add_bos
    for s in varied_strings(200):
        if "<s>" in s or "</s>" in s:
            continue  # transformers parses these as special tokens, SentencePiece as text
        assert tok.encode(s) == [1] + sp.encode(s), repr(s)
    assert tok.convert_ids_to_tokens(tok.encode("Hello  world")) == ["<s>", "▁Hello", "▁", "▁world"]
    # unseen characters fall back to bytes; digits are split
    assert tok.convert_ids_to_tokens(tok.encode("🦙 42", add_special_tokens=False)) == \
        ["▁", "<0xF0>", "<0x9F>", "<0xA6>", "<0x99>", "▁", "4", "2"]
    assert tok.decode(tok.encode("Hello  world\n  x"), skip_special_tokens=True) == "Hello  world\n  x"


def test_gpt2_has_no_bos_and_pads_with_eos(tokenizers):
    tok = load_tokenizer(tokenizers("gpt2"))
    assert not tok.add_bos
    assert tok.eos_token_id == tok.bos_token_id == 50256
    assert tok.pad_token_id == 50256


@pytest.mark.parametrize("folder", ["gpt2-chat-chatml", "gpt2-chat-llama31tmpl", "smollm2"])
def test_chat_template_renders_like_transformers(folder, tokenizers, default_model_dir):
    path = default_model_dir if folder == "smollm2" else tokenizers(folder)
    ours, ref = load_tokenizer(path), reference(path)
    conversations = [
        [{"role": "user", "content": "Hi!"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"},
         {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"}],
    ]
    for messages in conversations:
        for gen in (True, False):
            assert ours.apply_chat_template(messages, add_generation_prompt=gen) == \
                ref.apply_chat_template(messages, add_generation_prompt=gen, tokenize=False)


def test_no_chat_template_is_a_clear_error(tokenizers):
    tok = load_tokenizer(tokenizers("gpt2"))
    with pytest.raises(ValueError, match="no chat_template"):
        tok.apply_chat_template([{"role": "user", "content": "x"}])


def test_missing_tokenizer_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer.json or tokenizer.model"):
        load_tokenizer(tmp_path)
