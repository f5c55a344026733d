"""--apply_chat_template (first-turn-only BOS/system text kept once) and `llamazoo inspect-data`."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import h5py
import pytest

from llamazoo.data.inspect import inspect_dataset, render_row
from llamazoo.data.pipeline import PrepareOptions, load_tokenizer_and_type, prepare, prepare_single_file

EOS = 50256
CONV = [{"prompt": "Hi there", "completion": "Hello!"}, {"prompt": "How?", "completion": "Fine."}]


def chat_rows(tmp_path: Path, tokenizer: Path, **kw) -> tuple[list[int], list[int]]:
    src = tmp_path / "c.jsonl"
    src.write_text(json.dumps(CONV) + "\n")
    out = tmp_path / f"{tokenizer.name}.hdf5"
    prepare_single_file(PrepareOptions(input_path=str(src), output_path=str(out), pretrained_tokenizer=str(tokenizer),
                                       max_seq_length=128, apply_chat_template=True, progress=False, **kw),
                        out=lambda s: None)
    with h5py.File(out, "r") as f:
        ids, types = f["input_ids"][0].tolist(), f["token_type_ids"][0].tolist()
    n = types.index(2) if 2 in types else len(types)
    return ids[:n], types[:n]


def spans_text(hf, ids, types) -> list[tuple[int, str]]:
    out = []
    for i, t in zip(ids, types):
        if out and out[-1][0] == t:
            out[-1] = (t, out[-1][1] + hf.decode([i]))
        else:
            out.append((t, hf.decode([i])))
    return out


def test_chatml_template_spans(tmp_path, tokenizers):
    hf = load_tokenizer_and_type(str(tokenizers("gpt2-chat-chatml")))[0].hf
    ids, types = chat_rows(tmp_path, tokenizers("gpt2-chat-chatml"))
    assert spans_text(hf, ids, types) == [
        (0, "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"), (1, "Hello!<|im_end|>\n<|endoftext|>"),
        (0, "<|im_start|>user\nHow?<|im_end|>\n<|im_start|>assistant\n"), (1, "Fine.<|im_end|>\n"),
        (3, "<|endoftext|>")]


def test_llama31_style_template_puts_first_turn_bos_once_and_drops_dangling_header(tmp_path, tokenizers):
    hf = load_tokenizer_and_type(str(tokenizers("gpt2-chat-llama31tmpl")))[0].hf
    ids, types = chat_rows(tmp_path, tokenizers("gpt2-chat-llama31tmpl"))
    assert ids[0] == EOS and ids.count(EOS) == 3   # template BOS once + one EOS after each pair
    assert spans_text(hf, ids, types) == [
        (0, "<|endoftext|><|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n"), (1, "Hello!<|eot_id|><|endoftext|>"),
        (0, "<|start_header_id|>user<|end_header_id|>\n\nHow?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"),
        (1, "Fine.<|eot_id|>"), (3, "<|endoftext|>")]


def test_chat_template_without_template_is_a_clear_error(tmp_path, tokenizers):
    with pytest.raises(ValueError, match="--apply_chat_template: the tokenizer has no chat_template"):
        chat_rows(tmp_path, tokenizers("gpt2"))


def test_inspect_data_reports_shapes_counts_and_marked_rows(tmp_path, capsys, tokenizers):
    src = tmp_path / "d.jsonl"
    src.write_text(json.dumps({"prompt": "hello how", "completion": "are you"}) + "\n" +
                   json.dumps({"prompt": "hi", "completion": "bye"}) + "\n")
    out = tmp_path / "ds"
    prepare(PrepareOptions(input_path=str(src), output_path=str(out), pretrained_tokenizer=str(tokenizers("gpt2")),
                           max_seq_length=8, num_training_splits=2, num_workers=1, progress=False,
                           input_packing_config="single::drop"), out=lambda s: None)
    report = inspect_dataset(out, rows=1, files=2)
    assert "metadata: max_seq_length 8, vocab_size 50257, 2 train / 0 dev / 0 test files" in report
    assert "train_1_of_2.hdf5: 1 rows x 8 tokens (int32); prompt 2, completion 2, padding 3, sep 1" in report
    assert "<prompt>hello how</prompt><completion> are you</completion><sep><|endoftext|></sep><pad x3/>" in report
    assert "<prompt>hi</prompt><completion> bye</completion><sep><|endoftext|></sep><pad x5/>" in report
    from llamazoo.commands import inspect_data as cmd

    p = argparse.ArgumentParser(prog="llamazoo inspect-data")
    cmd.add_arguments(p)
    assert cmd.run(p.parse_args([str(out / "train_2_of_2.hdf5"), "--tokenizer", str(tokenizers("gpt2"))])) == 0
    assert "<prompt>hi</prompt>" in capsys.readouterr().out
    with h5py.File(out / "train_1_of_2.hdf5", "r") as f:
        assert render_row(f["input_ids"][0], f["token_type_ids"][0], None).startswith("<prompt>31373 703</prompt>")
