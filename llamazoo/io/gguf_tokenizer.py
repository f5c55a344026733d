"""The tokenizer of a GGUF file, rebuilt from its metadata so it gives the original model's ids.

A GGUF has no tokenizer files, only llama.cpp's description of the tokenizer: pieces, scores, token types,
merges, special ids and flags, and the name of the pre-tokenizer (`tokenizer.ggml.pre`). We turn that back
into what the original model folder shipped:

- `tokenizer.ggml.model == "llama"` (SentencePiece: Llama-2, Mistral, Phi-3, ...): a SentencePiece model
  proto (`tokenizer.model`), BPE with byte fallback, a dummy-prefix space and no whitespace folding, loaded
  through the folder path, so transformers converts it as it does a Llama-2 folder's `tokenizer.model`
  (Llama-2's own gives the same tokenizer.json). transformers' GGUF path instead uses its non-legacy Llama
  tokenizer, which gives " " -> "▁" where the original gives "▁▁".
- `"gpt2"` (byte-level BPE: Llama-3, SmolLM, DeepSeek, ...): a `tokenizers` BPE model from the vocab and
  merges with the pre-tokenizer the `pre` name stands for (the original tokenizer.json's split rules) and
  Llama-3's `ignore_merges`, handed to transformers as the tokenizer.json a folder would hold.

Control tokens become special added tokens, user-defined ones plain added tokens (both matched whole in
text, as the originals do); BOS/EOS flags and the chat template come from the file. Only the metadata is
read, by our own reader: gguf's GGUFReader indexes every array item (seconds for Llama-3's 400k strings).
"""
from __future__ import annotations

import json
import logging
import os
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from llamazoo.io.damaged import DamagedFileError
from llamazoo.io.tokenizer import Tokenizer, load_tokenizer_from_folder

log = logging.getLogger(__name__)

# llama.cpp's token types (llama_token_type); SentencePiece's ModelProto.SentencePiece.Type uses the same numbers.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


# --- metadata --------------------------------------------------------------------------------------------
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


def read_gguf_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """All metadata key/values of a GGUF file (v2/v3), without its tensors. Arrays of numbers come back as
    lists, like gguf's `ReaderField.contents()`."""
    path = Path(path)
    data = np.memmap(path, dtype=np.uint8, mode="r") if path.stat().st_size else b""
    buf = memoryview(data)

    def unpack(fmt: str, pos: int):
        try:
            return struct.unpack_from(fmt, buf, pos)
        except struct.error:
            raise DamagedFileError(path, "GGUF", f"metadata cut off at byte {pos}") from None

    def string(pos: int) -> tuple[str, int]:
        (n,) = unpack("<Q", pos)
        end = pos + 8 + n
        if end > len(buf):
            raise DamagedFileError(path, "GGUF", f"metadata cut off at byte {pos}")
        return bytes(buf[pos + 8:end]).decode("utf-8", errors="replace"), end

    def value(vtype: int, pos: int):
        if vtype in _SCALARS:
            fmt = _SCALARS[vtype]
            return unpack(fmt, pos)[0], pos + struct.calcsize(fmt)
        if vtype == _STRING:
            return string(pos)
        if vtype == _ARRAY:
            itype, count = unpack("<IQ", pos)
            pos += 12
            if itype in _SCALARS:
                dt = np.dtype(_SCALARS[itype])
                end = pos + count * dt.itemsize
                if end > len(buf):
                    raise DamagedFileError(path, "GGUF", f"metadata cut off at byte {pos}")
                return np.frombuffer(buf[pos:end], dtype=dt).tolist(), end
            items = []
            for _ in range(count):
                item, pos = value(itype, pos)
                items.append(item)
            return items, pos
        raise ValueError(f"{path}: unknown GGUF metadata value type {vtype} at byte {pos}")

    if bytes(buf[:4]) != b"GGUF":
        raise ValueError(f"{path}: not a GGUF file (no GGUF magic)")
    version, _, n_kv = unpack("<IQQ", 4)
    if version not in (2, 3):
        raise ValueError(f"{path}: GGUF version {version}; only versions 2 and 3 are readable")
    meta: dict[str, Any] = {}
    pos = 24
    for _ in range(n_kv):
        key, pos = string(pos)
        (vtype,) = unpack("<I", pos)
        meta[key], pos = value(vtype, pos + 4)
    return meta


@dataclass
class GGUFVocab:
    """The tokenizer metadata of a GGUF file, with llama.cpp's defaults for missing keys."""

    source: str
    model: str
    pre: str | None
    tokens: list[str]
    scores: list[float] | None
    types: list[int]
    merges: list[str] | None
    bos_id: int | None
    eos_id: int | None
    unk_id: int | None
    pad_id: int | None
    add_bos: bool | None  # None: the file does not say
    add_eos: bool | None
    add_space_prefix: bool | None
    remove_extra_whitespaces: bool
    chat_template: str | None

    @classmethod
    def from_metadata(cls, meta: dict[str, Any], source: str) -> "GGUFVocab":
        def get(key: str, default=None):
            return meta.get(f"tokenizer.{key}", default)

        tokens = get("ggml.tokens")
        if not tokens:
            raise ValueError(f"{source}: GGUF metadata has no tokenizer.ggml.tokens (no tokenizer in this file)")
        types = get("ggml.token_type") or [NORMAL] * len(tokens)
        return cls(
            source=source, model=get("ggml.model"), pre=get("ggml.pre"), tokens=list(tokens),
            scores=get("ggml.scores"), types=list(types), merges=get("ggml.merges"),
            bos_id=get("ggml.bos_token_id"), eos_id=get("ggml.eos_token_id"),
            unk_id=get("ggml.unknown_token_id"), pad_id=get("ggml.padding_token_id"),
            add_bos=get("ggml.add_bos_token"), add_eos=get("ggml.add_eos_token"),
            add_space_prefix=get("ggml.add_space_prefix"),
            remove_extra_whitespaces=bool(get("ggml.remove_extra_whitespaces", False)),
            chat_template=get("chat_template"),
        )

    def token(self, i: int | None) -> str | None:
        return self.tokens[i] if i is not None and 0 <= i < len(self.tokens) else None

    def config(self, add_bos_default: bool) -> dict[str, Any]:
        """tokenizer_config.json: special tokens, BOS/EOS flags, chat template."""
        cfg: dict[str, Any] = {
            "add_bos_token": self.add_bos if self.add_bos is not None else add_bos_default,
            "add_eos_token": bool(self.add_eos),
            "clean_up_tokenization_spaces": False,
        }
        for name, i in (("bos_token", self.bos_id), ("eos_token", self.eos_id), ("unk_token", self.unk_id),
                        ("pad_token", self.pad_id)):
            if self.token(i) is not None:
                cfg[name] = self.token(i)
        if self.chat_template:
            cfg["chat_template"] = self.chat_template
        return cfg


# --- SentencePiece ---------------------------------------------------------------------------------------
def sentencepiece_model(v: GGUFVocab) -> bytes:
    """A SentencePiece BPE model proto equal to the original tokenizer.model as far as encoding goes."""
    from sentencepiece import sentencepiece_model_pb2 as spm_pb

    if v.scores is None or len(v.scores) != len(v.tokens):
        raise ValueError(f"{v.source}: a SentencePiece ('llama') vocabulary needs tokenizer.ggml.scores, "
                         f"one per token")
    m = spm_pb.ModelProto()
    unk = v.unk_id if v.unk_id is not None else next((i for i, t in enumerate(v.types) if t == UNKNOWN), 0)
    for i, (piece, score, ttype) in enumerate(zip(v.tokens, v.scores, v.types)):
        if i == unk:
            ttype = UNKNOWN
        elif ttype == UNKNOWN or ttype not in (NORMAL, CONTROL, USER_DEFINED, UNUSED, BYTE):
            ttype = UNUSED  # llama.cpp marks padding entries ([PAD32011] ...) unknown; the original has none
        p = m.pieces.add()
        p.piece, p.score, p.type = piece, float(score), ttype
    t = m.trainer_spec
    t.model_type = spm_pb.TrainerSpec.BPE  # llama.cpp's SPM tokenizer merges by score, as SentencePiece BPE does
    t.vocab_size = len(v.tokens)
    t.byte_fallback = any(tt == BYTE for tt in v.types)
    t.unk_id = unk
    t.bos_id = v.bos_id if v.bos_id is not None else -1
    t.eos_id = v.eos_id if v.eos_id is not None else -1
    t.pad_id = v.pad_id if v.pad_id is not None and v.pad_id not in (unk, v.bos_id, v.eos_id) else -1
    n = m.normalizer_spec
    n.name = "identity"
    n.add_dummy_prefix = True if v.add_space_prefix is None else bool(v.add_space_prefix)
    n.remove_extra_whitespaces = v.remove_extra_whitespaces
    n.escape_whitespaces = True
    return m.SerializeToString()


# --- byte-level BPE --------------------------------------------------------------------------------------
def _split(pattern: str):
    from tokenizers import Regex, pre_tokenizers

    return pre_tokenizers.Split(Regex(pattern), behavior="isolated")


def _digits(individual: bool = True):
    from tokenizers import pre_tokenizers

    return pre_tokenizers.Digits(individual_digits=individual)


def _bytes(gpt2_split: bool):
    """The byte-to-unicode mapping, optionally with GPT-2's own word split first."""
    from tokenizers import pre_tokenizers

    return pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=gpt2_split)


def _punctuation():
    from tokenizers import pre_tokenizers

    return pre_tokenizers.Punctuation(behavior="contiguous")


# English contractions in either case, then letters with one leading non-letter, numbers, punctuation runs
# with their newlines, newline runs, and whitespace (all but the last space before a word).
_CONTRACTIONS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)"
_LLAMA3 = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
           r"|\s+(?!\S)|\s+")
_QWEN2 = _LLAMA3.replace(r"\p{N}{1,3}", r"\p{N}")  # single digits
_QWEN35 = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+"
           r"|\s+(?!\S)|\s+")  # combining marks stay with their letters
_CJK_HANGUL = "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+"  # DeepSeek's CJK + Hangul runs


@dataclass(frozen=True)
class PreTokenizer:
    """What a `tokenizer.ggml.pre` name stands for: the original tokenizer.json's pre-tokenizer steps (in
    order), its BPE `ignore_merges` flag, normalizer, and llama.cpp's BOS default when the file has no flag."""

    steps: Callable[[], list]
    ignore_merges: bool = False
    nfc: bool = False
    add_bos: bool = False


_GPT2_PRE = PreTokenizer(lambda: [_bytes(True)])
_DIGITS_GPT2_PRE = PreTokenizer(lambda: [_digits(), _bytes(True)])  # every digit alone, then GPT-2's split
_LLAMA3_PRE = PreTokenizer(lambda: [_split(_LLAMA3), _bytes(False)], ignore_merges=True, add_bos=True)
_QWEN2_PRE = PreTokenizer(lambda: [_split(_QWEN2), _bytes(False)], nfc=True)

PRE_TOKENIZERS: dict[str, PreTokenizer] = {
    # Llama-3's tiktoken-style split, and the models that reuse Llama-3's tokenizer
    **dict.fromkeys(["llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral"], _LLAMA3_PRE),
    **dict.fromkeys(["dbrx", "smaug-bpe"], PreTokenizer(_LLAMA3_PRE.steps)),
    # GPT-2's byte-level split
    **dict.fromkeys(["gpt-2", "phi-2", "mpt", "olmo"], _GPT2_PRE),
    # SmolLM/StarCoder: digits isolated, then GPT-2's split
    **dict.fromkeys(["smollm", "starcoder", "refact", "command-r"], _DIGITS_GPT2_PRE),
    **dict.fromkeys(["qwen2", "deepseek-r1-qwen"], _QWEN2_PRE),
    "qwen35": PreTokenizer(lambda: [_split(_QWEN35), _bytes(False)]),  # no NFC: marks are split above
    "deepseek-coder": PreTokenizer(lambda: [
        _split(r"[\r\n]"), _split(r"\s?\p{L}+"), _split(r"\s?\p{P}+"), _split(_CJK_HANGUL), _digits(),
        _bytes(False)]),
    "deepseek-llm": PreTokenizer(lambda: [
        _split(r"[\r\n]"), _split(r"\s?[\p{Lu}\p{Ll}\p{Lt}]+"),  # cased letters only
        _split("\\s?[!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3000-\u3002]+"),  # ASCII/fullwidth punct.
        _split(r"\s+$"), _split(_CJK_HANGUL), _digits(), _bytes(False)]),
    # Falcon: punctuation runs, GPT-2's split, then numbers cut into groups of three digits
    "falcon": PreTokenizer(lambda: [_punctuation(), _bytes(True), _digits(False), _split("[0-9][0-9][0-9]")]),
}


def pre_tokenizer(v: GGUFVocab) -> PreTokenizer:
    if v.pre in (None, "", "default"):
        log.warning("%s: no tokenizer.ggml.pre; splitting text as GPT-2 does (llama.cpp warns the same file "
                    "tokenizes with degraded quality)", v.source)
        return _GPT2_PRE
    if v.pre not in PRE_TOKENIZERS:
        raise ValueError(f"{v.source}: tokenizer.ggml.pre {v.pre!r} is not a pre-tokenizer llamazoo knows "
                         f"(known: {', '.join(sorted(PRE_TOKENIZERS))})")
    return PRE_TOKENIZERS[v.pre]


def byte_level_bpe(v: GGUFVocab, pre: PreTokenizer):
    """A tokenizers.Tokenizer: BPE over the byte-level vocab and merges, the named pre-tokenizer, byte-level
    decoding, BOS/EOS as the file says; control/user-defined tokens as added tokens (they are stored as plain
    text in the vocab)."""
    from tokenizers import AddedToken, Tokenizer as RustTokenizer, decoders, models, normalizers, pre_tokenizers
    from tokenizers import processors

    if not v.merges:
        raise ValueError(f"{v.source}: a byte-level BPE ('gpt2') vocabulary needs tokenizer.ggml.merges")
    vocab: dict[str, int] = {}
    for i, t in enumerate(v.tokens):
        vocab.setdefault(t, i)
    merges = []
    for m in v.merges:
        cut = m.find(" ", 1)  # a merge is "left right"; the left part is never empty
        if cut < 0:
            raise ValueError(f"{v.source}: tokenizer.ggml.merges entry {m!r} is not 'left right'")
        merges.append((m[:cut], m[cut + 1:]))
    try:
        model = models.BPE(vocab=vocab, merges=merges, ignore_merges=pre.ignore_merges, fuse_unk=False)
    except Exception as e:  # the Rust error names the merge
        raise ValueError(f"{v.source}: tokenizer.ggml.merges do not fit tokenizer.ggml.tokens: {e}") from None
    tok = RustTokenizer(model)
    if pre.nfc:
        tok.normalizer = normalizers.NFC()
    steps = pre.steps()
    tok.pre_tokenizer = steps[0] if len(steps) == 1 else pre_tokenizers.Sequence(steps)
    tok.decoder = decoders.ByteLevel()
    added = [AddedToken(t, special=ty == CONTROL, normalized=False)
             for t, ty in zip(v.tokens, v.types) if ty in (CONTROL, USER_DEFINED)]
    tok.add_tokens(added)
    cfg = v.config(add_bos_default=pre.add_bos)
    bos = v.token(v.bos_id) if cfg["add_bos_token"] else None
    eos = v.token(v.eos_id) if cfg["add_eos_token"] else None

    def seq(part: str, type_id: int) -> list[str]:
        return [f"{t}:{type_id}" for t in (bos, f"${part}", eos) if t]

    tok.post_processor = processors.TemplateProcessing(
        single=seq("A", 0), pair=seq("A", 0) + seq("B", 1),
        special_tokens=list({t: (t, i) for t, i in ((bos, v.bos_id), (eos, v.eos_id)) if t}.values()))
    return tok


# --- the tokenizer ---------------------------------------------------------------------------------------
def gguf_tokenizer(path: str | os.PathLike, metadata: dict[str, Any] | None = None) -> Tokenizer:
    """The model's tokenizer from a GGUF file's metadata (any GGUF with a vocabulary, tensors or not). A
    SentencePiece one goes through a Llama-2-style folder (tokenizer.model + tokenizer_config.json) and keeps
    its tokenizer.model, which Tokenizer.save writes next to tokenizer.json."""
    path = Path(path)
    if metadata is None:
        if not path.is_file():
            raise FileNotFoundError(f"{path}: GGUF file not found")
        metadata = read_gguf_metadata(path)
    v = GGUFVocab.from_metadata(metadata, str(path))
    if v.model == "llama":
        cfg = v.config(add_bos_default=True)
        with tempfile.TemporaryDirectory(prefix="llamazoo-gguf-tokenizer-") as tmp:
            (Path(tmp) / "tokenizer.model").write_bytes(sentencepiece_model(v))
            (Path(tmp) / "tokenizer_config.json").write_text(json.dumps(cfg, ensure_ascii=False))
            tok = load_tokenizer_from_folder(tmp)
        # transformers' generic tokenizer ignores these config keys when loading; set, they rebuild the
        # post-processor
        tok.hf.add_bos_token = cfg["add_bos_token"]
        tok.hf.add_eos_token = cfg["add_eos_token"]
    elif v.model == "gpt2":
        from transformers import PreTrainedTokenizerFast

        pre = pre_tokenizer(v)
        cfg = v.config(add_bos_default=pre.add_bos)
        tok = Tokenizer(PreTrainedTokenizerFast(tokenizer_object=byte_level_bpe(v, pre), **cfg))
    else:
        raise ValueError(f"{v.source}: tokenizer.ggml.model {v.model!r} is not supported (expected 'llama' "
                         f"for SentencePiece or 'gpt2' for byte-level BPE)")
    tok.source = str(path)
    return tok
