"""Tokenizers from checkpoint folders, on top of transformers' fast tokenizers.

A folder has `tokenizer.json`, or only a SentencePiece `tokenizer.model` (Llama-2 folders), plus optional
`tokenizer_config.json` / `special_tokens_map.json`. transformers converts a SentencePiece model to a fast
tokenizer with the same ids; Llama SentencePiece folders without a tokenizer_config.json get Llama's
convention of a BOS before every text.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Sequence

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "vocab.json", "merges.txt", "added_tokens.json")


class Tokenizer:
    """The tokenizer interface llamazoo uses everywhere; `hf` is the wrapped transformers tokenizer."""

    def __init__(self, hf: Any, source: str = ""):
        self.hf = hf
        self.source = source
        self.extra_files: dict[str, bytes] = {}  # files save() writes too: tokenizer.model (SentencePiece)

    # ids ----------------------------------------------------------------------------------------
    @property
    def bos_token_id(self) -> int | None:
        return self.hf.bos_token_id

    @property
    def eos_token_id(self) -> int | None:
        return self.hf.eos_token_id

    @property
    def pad_token_id(self) -> int | None:
        """The pad id, falling back to EOS (as the original Model Zoo does)."""
        return self.hf.pad_token_id if self.hf.pad_token_id is not None else self.eos_token_id

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    @property
    def add_bos(self) -> bool:
        """Whether encode(..., add_special_tokens=True) starts with BOS."""
        probe = self.hf.encode("a", add_special_tokens=True)
        return bool(probe) and self.bos_token_id is not None and probe[0] == self.bos_token_id

    @property
    def chat_template(self) -> str | None:
        return getattr(self.hf, "chat_template", None)

    # text <-> ids -------------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.hf.encode(text, add_special_tokens=add_special_tokens)

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
        if not texts:
            return []
        return self.hf(list(texts), add_special_tokens=add_special_tokens)["input_ids"]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens,
                              clean_up_tokenization_spaces=False)

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
        return self.hf.convert_ids_to_tokens(list(ids))

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True,
                            tokenize: bool = False, **kwargs: Any):
        if not self.chat_template:
            raise ValueError(f"tokenizer {self.source or ''} has no chat_template".replace("  ", " "))
        return self.hf.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                           tokenize=tokenize, **kwargs)

    def save(self, out_dir: str | os.PathLike) -> None:
        self.hf.save_pretrained(str(out_dir))
        for name, data in self.extra_files.items():
            (Path(out_dir) / name).write_bytes(data)


def has_tokenizer(folder: str | os.PathLike) -> bool:
    p = Path(folder)
    return (p / "tokenizer.json").is_file() or (p / "tokenizer.model").is_file()


def load_tokenizer_from_folder(folder: str | os.PathLike) -> Tokenizer:
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: tokenizer folder not found")
    if not has_tokenizer(folder):
        raise FileNotFoundError(f"{folder}: no tokenizer.json or tokenizer.model in this folder")
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        hf = AutoTokenizer.from_pretrained(str(folder))
    except Exception as e:  # transformers raises many types for broken folders
        raise ValueError(f"{folder}: cannot load tokenizer: {e}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    config_file = folder / "tokenizer_config.json"
    sentencepiece_only = not (folder / "tokenizer.json").is_file()
    if sentencepiece_only and not (config_file.is_file() and "add_bos_token" in json.loads(config_file.read_text())):
        hf.add_bos_token = True  # Llama-2's convention
    tok = Tokenizer(hf, str(folder))
    if (folder / "tokenizer.model").is_file():  # transformers does not save it again: a re-save keeps it
        tok.extra_files["tokenizer.model"] = (folder / "tokenizer.model").read_bytes()
    return tok


def load_tokenizer(path_or_name: str | os.PathLike = "default") -> Tokenizer:
    """A checkpoint folder, a tokenizer folder, or "default" (the embedded model)."""
    from llamazoo.io.default import resolve_checkpoint

    return load_tokenizer_from_folder(resolve_checkpoint(path_or_name, need_weights=False))


logging.getLogger("transformers.tokenization_utils_base").setLevel(logging.ERROR)
