"""No turn is lost in data prep: every prompt/completion pair of every line reaches the written rows, or is
counted as dropped by the packing rule the user chose (llamazoo.data.metrics: turns_dropped_from_packing,
turns_dropped_from_all_prompt).

Counting rule. A turn is a pair that has prompt tokens, and it shows in the output as one prompt span: a
run of token type 0. With --apply_chat_template every pair is a turn (the template writes a user header
even around an empty prompt); without it, a pair whose prompt is empty (after the space rule strips its
trailing spaces) has no type-0 token and so no span, and is not counted. A span that `full` packing splits
across rows is one span (rows are read as one stream); with `greedy`/`single` every row is read on its own.
A turn counts as dropped when none of its prompt tokens is written.
"""
from __future__ import annotations

import json
from pathlib import Path

import h5py
import pytest

from llamazoo.data.articles import COMPLETION, PADDING, PROMPT, SEP, Unit
from llamazoo.data.packing import PACKING_CHOICES, Packer, PackingConfig
from llamazoo.data.pipeline import PrepareOptions, load_tokenizer_and_type, prepare_single_file

EOS = 50256
LONG = "a rather long sentence that keeps going " * 20     # ~140 GPT-2 tokens: longer than any row below
LINES = [
    {"prompt": "What is two plus two?", "completion": "Four."},
    [{"prompt": "Hi", "completion": "Hello"}, {"prompt": "Bye", "completion": ""}],          # last completion empty
    [{"prompt": "A?", "completion": "B."}, {"prompt": "C?", "completion": ""},               # empty in the middle
     {"prompt": "D?", "completion": "E."}],
    {"prompt": "", "completion": "Just some text."},                                          # empty prompt
    [{"prompt": "x", "completion": "y"}, {"prompt": "", "completion": ""},                   # both empty
     {"prompt": "z", "completion": "w"}],
    {"prompt": "A prompt alone", "completion": ""},
    {"completion": "no prompt key"},
    {"prompt": "null completion", "completion": None},
    {"prompt": "   ", "completion": "spaces only prompt"},                       # prompt empty after the space rule
    {"prompt": LONG, "completion": "short"},                                                  # long prompt
    {"prompt": "Q", "completion": LONG},                                                      # long completion
    [{"prompt": f"question {i}?", "completion": f"answer {i}."} for i in range(12)],          # a long dialogue
    [{"prompt": "Premise one. Yes or no? ", "completion": " Yes "},                          # metaICL style
     {"prompt": "Premise two. Yes or no? ", "completion": " No "}],
    [{"prompt": "Say a", "completion": "a"}, {"prompt": "", "completion": "user"}],          # texts found in headers
]
ROW = {"gpt2": 40, "gpt2-chat-chatml": 96, "gpt2-chat-llama31tmpl": 128}
BOUNDARIES = [("jsonl", "jsonl"), ("prompt_completion_pair", "prompt_completion_pair")]


def pairs_of(line) -> list[dict]:
    return [line] if isinstance(line, dict) else line


def turns_in(lines: list, chat: bool) -> int:
    """The turns of the input by the counting rule above, from the texts alone."""
    return sum(1 for line in lines for p in pairs_of(line) if chat or (p.get("prompt") or "").rstrip(" "))


def prompt_spans(types: list[list[int]], full: bool) -> int:
    streams = [[t for row in types for t in row]] if full else types
    return sum(1 for s in streams for i, t in enumerate(s) if t == PROMPT and (i == 0 or s[i - 1] != PROMPT))


def prepare_rows(tmp_path: Path, tokenizer: Path, lines: list, **kw):
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "out.hdf5"
    metrics = prepare_single_file(PrepareOptions(input_path=str(src), output_path=str(out),
                                                 pretrained_tokenizer=str(tokenizer), overwrite_output_path=True,
                                                 num_workers=1, progress=False, **kw), out=lambda s: None)
    with h5py.File(out, "r") as f:
        return f["input_ids"][:].tolist(), f["token_type_ids"][:].tolist(), metrics


@pytest.mark.parametrize("tokenizer", list(ROW))
@pytest.mark.parametrize("packing_boundary,attention_boundary", BOUNDARIES)
@pytest.mark.parametrize("keep", [False, True], ids=["drop_prompt_only", "keep_prompt_only"])
def test_every_turn_is_written_or_counted_as_dropped(tmp_path, tokenizers, tokenizer, packing_boundary,
                                                      attention_boundary, keep):
    chat = tokenizer != "gpt2"
    want = turns_in(LINES, chat)
    dropped_by = {}
    for config in PACKING_CHOICES:
        _, types, m = prepare_rows(tmp_path, tokenizers(tokenizer), LINES, max_seq_length=ROW[tokenizer],
                                   input_packing_config=config, apply_chat_template=chat,
                                   packing_boundary=packing_boundary, attention_boundary=attention_boundary,
                                   keep_prompt_only_sequences=keep)
        assert m.turns == want, config
        written = prompt_spans(types, full=config == "full")
        assert written == want - m.turns_dropped_from_packing - m.turns_dropped_from_all_prompt, config
        dropped_by[config] = (m.turns_dropped_from_packing, m.turns_dropped_from_all_prompt)
    # the inputs make every overflow rule drop turns, so the sums above are not trivially met; but a unit of
    # one pair (packing_boundary=prompt_completion_pair) starts with its prompt, which truncate_right keeps
    assert dropped_by["full"][0] == 0
    for config in PACKING_CHOICES[1:]:
        one_pair_units = packing_boundary == "prompt_completion_pair" and config.endswith("truncate_right")
        assert (dropped_by[config][0] == 0) if one_pair_units else (dropped_by[config][0] > 0), config
    if keep:
        assert all(d[1] == 0 for d in dropped_by.values())
    elif not chat:   # the three prompted pairs with an empty completion, at least
        assert all(d[1] >= 3 for d in dropped_by.values())


def spans_text(hf, ids: list[int], types: list[int]) -> list[tuple[int, str]]:
    out: list[tuple[int, list[int]]] = []
    for i, t in zip(ids, types):
        if t == PADDING:
            break
        if out and out[-1][0] == t:
            out[-1][1].append(i)
        else:
            out.append((t, [i]))
    return [(t, hf.decode(s)) for t, s in out]


@pytest.mark.parametrize("tokenizer,header,eot", [
    ("gpt2-chat-chatml", "<|im_start|>{}\n", "<|im_end|>\n"),
    ("gpt2-chat-llama31tmpl", "<|start_header_id|>{}<|end_header_id|>\n\n", "<|eot_id|>")])
def test_last_turn_with_empty_completion_keeps_its_prompt_and_the_end_of_turn(tmp_path, tokenizers, tokenizer,
                                                                               header, eot):
    folder = tokenizers(tokenizer)
    hf = load_tokenizer_and_type(str(folder))[0].hf
    conv = [{"prompt": "Hi", "completion": "Hello"}, {"prompt": "Bye", "completion": ""}]
    ids, types, m = prepare_rows(tmp_path, folder, [conv], max_seq_length=128, apply_chat_template=True)
    assert len(ids) == 1 and m.turns == 2 and m.turns_dropped_from_all_prompt == 0
    bos = "<|endoftext|>" if "llama" in tokenizer else ""    # that template writes BOS on the first turn only
    user, assistant = header.format("user"), header.format("assistant")
    assert spans_text(hf, ids[0], types[0]) == [
        (PROMPT, f"{bos}{user}Hi{eot}{assistant}"), (COMPLETION, f"Hello{eot}<|endoftext|>"),
        (PROMPT, f"{user}Bye{eot}{assistant}"), (COMPLETION, eot), (SEP, "<|endoftext|>")]
    # the completion is the marker's own tokens, encoded as in the rendered text
    n = types[0].index(SEP)
    assert ids[0][n - len(hf.encode(eot)):n] == hf.encode(eot)


def test_chat_contents_are_placed_by_position_not_searched(tmp_path, tokenizers):
    """A completion that also occurs in the template's own text ("a" in "<|im_start|>", "user") and empty
    messages land where the template puts them."""
    folder = tokenizers("gpt2-chat-chatml")
    hf = load_tokenizer_and_type(str(folder))[0].hf
    conv = [{"prompt": "Say a", "completion": "a"}, {"prompt": "", "completion": "user"},
            {"prompt": "", "completion": ""}]
    ids, types, _ = prepare_rows(tmp_path, folder, [conv], max_seq_length=160, apply_chat_template=True)
    user, assistant, end = "<|im_start|>user\n", "<|im_start|>assistant\n", "<|im_end|>\n"
    assert spans_text(hf, ids[0], types[0]) == [
        (PROMPT, f"{user}Say a{end}{assistant}"), (COMPLETION, f"a{end}<|endoftext|>"),
        (PROMPT, f"{user}{end}{assistant}"), (COMPLETION, f"user{end}<|endoftext|>"),
        (PROMPT, f"{user}{end}{assistant}"), (COMPLETION, end), (SEP, "<|endoftext|>")]


def test_pairs_left_out_for_an_empty_completion_are_counted(tmp_path, tokenizers):
    """Without a chat template a pair with an empty completion is left out (the original's rule); its
    tokens and its turn are counted as dropped from all-prompt, as --keep_prompt_only_sequences would have
    written them."""
    folder = tokenizers("gpt2")
    hf = load_tokenizer_and_type(str(folder))[0].hf
    lines = [[{"prompt": "Hi", "completion": "Hello"}, {"prompt": "Bye now ", "completion": ""}],
             {"prompt": "", "completion": ""}]
    ids, types, m = prepare_rows(tmp_path, folder, lines, max_seq_length=16)
    assert spans_text(hf, ids[0], types[0]) == [(PROMPT, "Hi"), (COMPLETION, " Hello"), (SEP, "<|endoftext|>")]
    left_out = len(hf.encode("Bye now")) + 1
    assert (m.turns, m.turns_dropped_from_all_prompt, m.tokens_dropped_from_all_prompt) == (2, 1, left_out)
    assert m.input_tokens == 3 + left_out
    kept_ids, kept_types, k = prepare_rows(tmp_path, folder, lines, max_seq_length=16, keep_prompt_only_sequences=True)
    assert spans_text(hf, kept_ids[0], kept_types[0]) == [
        (PROMPT, "Hi"), (COMPLETION, " Hello<|endoftext|>"), (PROMPT, "Bye now"), (SEP, "<|endoftext|>")]
    assert (k.turns, k.turns_dropped_from_all_prompt, k.tokens_dropped_from_all_prompt) == (2, 0, 0)


def unit(types: list[int]) -> Unit:
    return Unit(list(range(len(types))), types, [], turns=prompt_spans([types], full=True))


def test_full_packing_follows_a_prompt_across_dropped_rows_and_takes():
    """With `full` packing a prompt goes on across rows (and across takes): it is dropped only when every
    row holding it is."""
    p = Packer(4, -1, PackingConfig.parse("full"), keep_prompt_only=False)
    rows = []
    for u in [unit([0, 1, 1, 3]),                  # row 1: kept
              unit([0, 0, 0, 0, 0, 1, 3]),         # row 2 has no completion, row 3 has: kept
              unit([3, 0, 0, 0, 0, 0, 0, 0, 0]),   # rows 4-5, both dropped: lost
              unit([3, 3, 0, 1, 3]),               # row 6: kept
              unit([0, 0, 0])]:                    # row 7, dropped: lost (known only at the end)
        p.add([u])
        rows += p.take()[1].tolist()               # a take after every unit
    p.finish()
    rows += p.take()[1].tolist()
    assert rows == [[0, 1, 1, 3], [0, 1, 3, 3], [3, 3, 0, 1]]
    assert (p.metrics.turns, p.metrics.turns_dropped_from_all_prompt) == (5, 2)
    assert p.metrics.tokens_dropped_from_all_prompt == 4 * 4
    assert prompt_spans(rows, full=True) == 5 - 2


@pytest.mark.parametrize("config,kept,lost", [("single::truncate_left", [1, 3, 0, 1, 3], 2),
                                              ("single::truncate_right", [0, 1, 3, 0, 1], 1),
                                              ("single::drop", None, 3)])
def test_overflow_counts_the_turns_whose_whole_prompt_it_cuts(config, kept, lost):
    p = Packer(5, -1, PackingConfig.parse(config))
    p.add([unit([0, 1, 3, 0, 1, 3, 0, 1, 3])])
    p.finish()
    types = p.take()[1].tolist()
    assert types == ([kept] if kept else [])
    assert (p.metrics.turns, p.metrics.turns_dropped_from_packing) == (3, lost)


def test_prompt_prefix_with_chat_template_is_one_clear_error(tmp_path, tokenizers):
    with pytest.raises(ValueError, match=r"^--prompt_prefix/--prompt_postfix cannot be combined with --apply_chat_"
                                         r"template: the chat template writes the text around each prompt$"):
        prepare_rows(tmp_path, tokenizers("gpt2-chat-chatml"), LINES, max_seq_length=64, apply_chat_template=True,
                     prompt_prefix="[INST]")
