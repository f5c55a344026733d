"""Inputs the tests write themselves, so the suite needs nothing beside the repository.

- `write_examples(folder)`: small files in generative_data_prep's input shapes (prompt/completion jsonl,
  list-of-turns dialogues, metaICL lists, a category key, malformed and blank lines, plain text), with
  the properties the tests rely on: lines longer and shorter than the packing tests' rows, leading and
  trailing spaces and newlines, empty prompts and completions, multibyte text, and a templated dialogue
  set that SmolLM2 learns within a couple dozen steps.
- `write_sentencepiece_tokenizer(folder)`: a SentencePiece BPE model trained with Llama-2's settings
  (byte fallback, split digits, dummy prefix, no normalization, BOS 1 / EOS 2 / UNK 0) on generated text:
  the SentencePiece case of the tokenizer tests without shipping Llama-2's licensed model.

Everything is deterministic (fixed seeds, one training thread, no input shuffling).
"""
from __future__ import annotations

import io
import json
import random
from pathlib import Path

SENTENCEPIECE_VOCAB = 1000

NOUNS = tuple(("river mountain village market garden morning evening story question answer people water light "
               "house road friend teacher student book paper window table bridge harbor lantern orchard engine "
               "signal library kitchen meadow forest island valley tower letter music painting recipe journey").split())
ADJECTIVES = tuple("quiet bright old small green wide careful sudden warm distant simple curious heavy golden".split())
VERBS = tuple("finds carries opens follows builds watches paints repairs remembers crosses answers visits".split())
EXTRAS = ("café", "naïve", "très", "Ünïcödé", "日本語", "テキスト", "Ω", "straße", "—", "🦙", "🤗", "1,234.5",
          "42", "2024", "“quoted”", "don't", "it's", "(see above)", "e.g.", "x = y + 1;")


def sentence(rng: random.Random, n_words: int, extras: float = 0.08) -> str:
    words = []
    for i in range(n_words):
        r = rng.random()
        if r < extras:
            words.append(rng.choice(EXTRAS))
        elif i % 3 == 0:
            words.append(rng.choice(ADJECTIVES))
        elif i % 3 == 1:
            words.append(rng.choice(NOUNS))
        else:
            words.append(rng.choice(VERBS + ("the", "a", "of", "and", "with", "near")))
    text = " ".join(words)
    return text[0].upper() + text[1:] + rng.choice(".....?!")


def paragraph(rng: random.Random, n_words: int) -> str:
    parts, left = [], n_words
    while left > 0:
        k = min(left, rng.randint(5, 16))
        parts.append(sentence(rng, k))
        left -= k
    return rng.choice([" ", " ", " ", "  ", "\t"]).join(parts)


# ------------------------------------------------------------------------------------------------
# example inputs
# ------------------------------------------------------------------------------------------------
def pretraining_lines(n: int = 100) -> list[str]:
    """Plain text, one document a line; word counts cycle so rows of 48-96 tokens see short and long
    lines (the first two have 40+ tokens)."""
    rng = random.Random(1)
    sizes = (70, 45, 12, 160, 95, 6, 240, 35)
    return [paragraph(rng, sizes[i % len(sizes)] + rng.randint(0, 8)) + "\n" for i in range(n)]


def generative_tuning_items(n: int = 100, seed: int = 2) -> list[dict]:
    """Prompt/completion pairs of several kinds: a prompt ending in a space and a completion starting
    with one, newline-wrapped pairs, empty prompts, a long prompt, many leading spaces, empty completions."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        kind = i % 7
        if kind == 0:
            out.append({"prompt": f"Write a title for this paragraph: {paragraph(rng, rng.randint(20, 60))}\n\nTitle: ",
                        "completion": " " + sentence(rng, rng.randint(3, 8), 0).rstrip(".?!")})
        elif kind == 1:
            out.append({"prompt": "\n" + sentence(rng, rng.randint(6, 14))[:-1] + "?\n",
                        "completion": "\n" + sentence(rng, rng.randint(2, 6)) + "\n"})
        elif kind == 2:
            out.append({"prompt": "", "completion": paragraph(rng, rng.randint(30, 90))})
        elif kind == 3:
            out.append({"prompt": f"Summarize: {paragraph(rng, rng.randint(150, 260))}",
                        "completion": "   " + paragraph(rng, rng.randint(10, 30))})
        elif kind == 4:
            out.append({"prompt": f"Translate to French: {sentence(rng, rng.randint(4, 10))}   ",
                        "completion": f"  Très {rng.choice(ADJECTIVES)}, le {rng.choice(NOUNS)} — voilà."})
        elif kind == 5:
            out.append({"prompt": f"Continue: {sentence(rng, rng.randint(5, 12))}", "completion": ""})
        else:
            out.append({"prompt": f"Q: {sentence(rng, rng.randint(5, 12))[:-1]}?\nA:",
                        "completion": " " + paragraph(rng, rng.randint(15, 45))})
    return out


def metaicl_items(n: int = 20) -> list[list[dict]]:
    """metaICL: each line a list of ten few-shot pairs with one-word labels padded by spaces/newlines."""
    rng = random.Random(3)
    out = []
    for _ in range(n):
        shots = []
        for k in range(10):
            premise, claim = sentence(rng, rng.randint(6, 14)), sentence(rng, rng.randint(3, 7))[:-1]
            label = rng.choice(["Yes", "No", "Maybe"])
            if k % 2:
                shots.append({"prompt": f"Suppose {premise} Can we infer that \"{claim}\"? Yes, no, or maybe? ",
                              "completion": f" {label} "})
            else:
                shots.append({"prompt": f"{premise}\nQuestion: {claim}?\n", "completion": f"\n{label}\n"})
        out.append(shots)
    return out


TOPICS = ("astronomy", "gardening", "cooking", "sailing", "chess", "poetry", "geology", "painting", "日本語",
          "beekeeping", "carpentry", "music")
FLOORS = ("first", "second", "third")


def dialogue_items(n: int = 42) -> list[list[dict]]:
    """Library help-desk conversations (2-4 turns, ~270 characters a line) from a few templates. The answers
    repeat fixed phrases and a fixed shelf per topic, so a model learns them within a couple dozen steps."""
    rng = random.Random(4)
    out = []
    for i in range(n):
        t = i % len(TOPICS) if i < len(TOPICS) else rng.randrange(len(TOPICS))
        topic, shelf = TOPICS[t], chr(ord("A") + t)
        turns = [{"prompt": rng.choice([f"Where are the books about {topic}?", f"Any books about {topic}?"]),
                  "completion": f"Books about {topic} are on shelf {shelf}. Happy reading!"}]
        for _ in range(rng.randint(1, 2)):
            k = rng.randrange(3)
            if k == 0:
                weeks = rng.randint(1, 4)
                turns.append({"prompt": f"Can I borrow one for {weeks} weeks?",
                              "completion": f"Yes, {weeks} weeks is fine. Happy reading!"})
            elif k == 1:
                turns.append({"prompt": f"Are you open on {rng.choice(['Monday', 'Friday', 'Sunday'])}?",
                              "completion": "We are open every day from nine to five. Happy reading!"})
            else:
                turns.append({"prompt": f"Who can help me with {topic}?",
                              "completion": f"Ask the librarian at shelf {shelf}. Happy reading!"})
        if rng.random() < 0.3:
            turns.append({"prompt": "Thank you!", "completion": "You are welcome. Happy reading!"})
        out.append(turns)
    return out


CATEGORIES = ("arithmetic", "geography", "spelling")


def category_items(n: int = 100) -> list[dict]:
    rng = random.Random(5)
    places = {"Ilvara": "Tessen", "Moravia Nova": "Brel", "Ostrand": "Kallum", "Süderholm": "Öby"}
    out = []
    for i in range(n):
        cat = CATEGORIES[rng.randrange(3)]
        if cat == "arithmetic":
            a, b = rng.randint(1, 999), rng.randint(1, 999)
            item = {"prompt": f"What is {a} + {b}?\n", "completion": f" {a + b}"}
        elif cat == "geography":
            country = rng.choice(sorted(places))
            item = {"prompt": f"\nWhat is the capital of {country}?\n", "completion": f"\n{places[country]}\n"}
        else:
            word = rng.choice(NOUNS)
            item = {"prompt": f"Spell '{word}' backwards: ", "completion": " " + word[::-1]}
        out.append({**item, "category": cat})
    return out


def json_load_error_lines(n: int = 100, bad: tuple[int, ...] = (12, 35), truncated: int = 72,
                          blank: int = 50) -> list[str]:
    """prompt/completion lines where lines `bad` miss a ':' after "prompt", line `truncated` is cut off
    mid-string and line `blank` is empty (1-based). Dealt to two splits, each split's first bad line is a
    missing ':'."""
    items = iter(generative_tuning_items(n, seed=6))
    lines = []
    for i in range(1, n + 1):
        if i == blank:
            lines.append("\n")
            continue
        line = json.dumps(next(items))
        if i in bad:
            line = line.replace('"prompt": ', '"prompt" ', 1)
        elif i == truncated:
            line = line[:len(line) // 2]
        lines.append(line + "\n")
    return lines


def write_examples(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)

    def jsonl(name: str, objs: list) -> None:
        (folder / name).write_text("".join(json.dumps(o, ensure_ascii=i % 2 == 0) + "\n" for i, o in enumerate(objs)),
                                   encoding="utf-8")

    (folder / "pretraining.txt").write_text("".join(pretraining_lines()), encoding="utf-8")
    jsonl("generative_tuning.jsonl", generative_tuning_items())
    jsonl("metaICL.jsonl", metaicl_items())
    jsonl("dialogue.jsonl", dialogue_items())
    jsonl("category.jsonl", category_items())
    (folder / "categories.json").write_text(json.dumps(list(CATEGORIES)))
    (folder / "json_load_error.jsonl").write_text("".join(json_load_error_lines()), encoding="utf-8")
    return folder


# ------------------------------------------------------------------------------------------------
# a SentencePiece model with Llama-2's settings
# ------------------------------------------------------------------------------------------------
def sentencepiece_corpus(n: int = 3000) -> list[str]:
    """Training sentences: the words above, 'Hello world', digits, double spaces, multibyte text (but no
    emoji: those stay byte-fallback pieces)."""
    rng = random.Random(7)
    words = NOUNS + ADJECTIVES + VERBS + ("the", "a", "of", "and", "Hello", "world", "Once", "upon", "time", "café",
                                         "naïve", "très", "日本語", "テキスト")
    out = []
    for _ in range(n):
        ws = [rng.choice(words) for _ in range(rng.randint(3, 14))]
        if rng.random() < 0.3:
            ws.append(str(rng.randint(0, 99999)))
        if rng.random() < 0.05:
            ws[rng.randrange(len(ws))] += " "  # a double space now and then
        text = " ".join(ws)
        out.append(text[0].upper() + text[1:] + rng.choice(".?!,:"))
    return out


def write_sentencepiece_tokenizer(folder: Path) -> Path:
    """A folder with only `tokenizer.model`, as Llama-2 checkpoints ship it."""
    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(sentencepiece_corpus()), model_writer=model, model_type="bpe",
        vocab_size=SENTENCEPIECE_VOCAB, character_coverage=0.99995, byte_fallback=True, split_digits=True,
        split_by_unicode_script=True, split_by_whitespace=True, split_by_number=True,
        allow_whitespace_only_pieces=True, max_sentencepiece_length=16, add_dummy_prefix=True,
        remove_extra_whitespaces=False, normalization_rule_name="identity", unk_id=0, bos_id=1, eos_id=2,
        pad_id=-1, num_threads=1, shuffle_input_sentence=False, input_sentence_size=0, minloglevel=2)
    tmp = folder.with_name(folder.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "tokenizer.model").write_bytes(model.getvalue())
    tmp.rename(folder)
    return folder
