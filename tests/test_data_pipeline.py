"""`llamazoo prepare`: splits, shuffles, balancing, metadata.yaml, metrics, the output folder and bad input."""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml

from llamazoo.data.pipeline import (PrepareOptions, balance_hdf5_files, load_tokenizer_and_type, prepare,
                                    split_counts)

GPT2 = str(Path(__file__).parent / "data" / "tokenizers" / "gpt2")
EOS = 50256


def run(tmp_path: Path, src: Path | str, name: str = "out", **kw):
    kw.setdefault("num_workers", 1)
    kw.setdefault("max_seq_length", 256)
    opts = PrepareOptions(input_path=str(src), output_path=str(tmp_path / name), pretrained_tokenizer=GPT2,
                          progress=False, **kw)
    printed: list[str] = []
    result = prepare(opts, out=printed.append)
    result.printed = printed
    return result


def rows(path: Path, key: str = "input_ids") -> list[list[int]]:
    with h5py.File(path, "r") as f:
        return f[key][:].tolist()


def numbered(tmp_path: Path, n: int, name: str = "n.jsonl") -> Path:
    p = tmp_path / name
    p.write_text("".join(json.dumps({"prompt": f"q{i}", "completion": f"a{i}"}) + "\n" for i in range(n)))
    return p


# --------------------------------------------------------------------------------------------
# splits and the output folder
# --------------------------------------------------------------------------------------------
def test_split_counts_follow_the_original_rules():
    assert split_counts(10, 32, None, None, None, None) == (32, 0, 0)
    assert split_counts(10, 8, None, None, 0.1, 0.1) == (8, 1, 1)   # n = int(8 / 0.8) = 10
    assert split_counts(10, None, None, None, 0.2, None) == (32, 8, 0)
    assert split_counts(11 * 1024**3, None, None, None, None, None) == (128, 0, 0)
    assert split_counts(10, 3, 2, 1, None, None) == (3, 2, 1)
    with pytest.raises(ValueError, match="--num_dev_splits and --num_test_splits must be given together"):
        split_counts(10, 3, 2, None, None, None)
    with pytest.raises(ValueError, match=r"--dev_ratio \(0.6\) and --test_ratio \(0.5\)"):
        split_counts(10, 3, None, None, 0.6, 0.5)


def test_round_robin_splits_folder_metadata_and_metrics(tmp_path):
    src = numbered(tmp_path, 12)
    res = run(tmp_path, src, num_training_splits=2, num_dev_splits=1, num_test_splits=1, keep_split_jsonls=True,
              input_packing_config="single::drop", max_seq_length=8)
    out = res.output_path
    names = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if "tokenizer/" not in p.as_posix())
    assert {"dev_1_of_1.hdf5", "train_1_of_2.hdf5", "train_2_of_2.hdf5", "metadata.yaml", "logs.log",
            "sha256/files_metadata.json", "test_files/test_1_of_1.jsonl", "splits/train_1_of_2.jsonl",
            "splits/train_2_of_2.jsonl", "splits/dev_1_of_1.jsonl"} <= set(names)
    assert not any(n.endswith(".idx") or n.startswith(".work") for n in names)
    # split order: train, train, test, dev; line i goes to split i % 4
    test_lines = (out / "test_files/test_1_of_1.jsonl").read_text().splitlines()
    assert [json.loads(x)["prompt"] for x in test_lines] == ["q2", "q6", "q10"]
    assert [json.loads(x)["prompt"] for x in (out / "splits/dev_1_of_1.jsonl").read_text().splitlines()] == \
        ["q3", "q7", "q11"]
    hf = load_tokenizer_and_type(GPT2)[0].hf
    first = rows(out / "train_1_of_2.hdf5")
    assert [r[:len(hf.encode(f"q{i}"))] for r, i in zip(first, (0, 4, 8))] == [hf.encode(f"q{i}") for i in (0, 4, 8)]
    meta = yaml.safe_load((out / "metadata.yaml").read_text())
    assert list(meta) == sorted(meta)
    assert meta["max_seq_length"] == 8 and meta["token_type_ids"] is True and meta["vocab_size"] == 50257
    assert meta["tokenizer_model_type"] == "<class 'transformers.models.gpt2.configuration_gpt2.GPT2Config'>"
    assert (meta["number_of_training_files"], meta["number_of_dev_files"], meta["number_of_test_files"]) == (2, 1, 1)
    assert meta["max_batch_size_train"] == 3 and meta["max_batch_size_dev"] == 3
    assert meta["train_sequences"] == 6 and meta["train_articles"] == 6 and meta["dev_sequences"] == 3
    assert meta["train_output_tokens"] == 48
    assert meta["train_prompt_tokens"] + meta["train_completion_tokens"] + meta["train_padding_tokens"] == 48
    assert meta["train_input_tokens"] == meta["train_prompt_tokens"] + meta["train_completion_tokens"]
    assert meta["train_tokens_dropped_from_packing"] == 0 and meta["train_tokens_dropped_from_all_prompt"] == 0
    table = res.printed[0]
    assert re.search(r"\| Sequences +\| +6 \|", table) and re.search(r"\| Data Utilization +\| +100.00% \|", table)
    assert re.search(r"\| Dataset Tokens +\| +48 \|", table)
    assert "Sequence Completion Utilization" in table and "train metrics" in table
    assert "train metrics" in (out / "logs.log").read_text()
    checks = json.loads((out / "sha256/files_metadata.json").read_text())
    assert set(checks["metadata.yaml"]) == {"sha256", "size", "modified_time"}
    assert (out / "tokenizer" / "tokenizer.json").is_file()
    assert not list(tmp_path.glob(".out*"))


def test_no_dev_gives_null_max_batch_size_dev_and_no_dev_keys(tmp_path):
    res = run(tmp_path, numbered(tmp_path, 6), num_training_splits=3)
    assert res.metadata["max_batch_size_dev"] is None and res.metadata["number_of_dev_files"] == 0
    assert not any(k.startswith("dev_") for k in res.metadata)


def test_balance_moves_tail_rows_in_file_order(tmp_path):
    paths = []
    for i, n in enumerate([5, 1, 0, 4]):
        p = tmp_path / f"train_{i + 1}_of_4.hdf5"
        with h5py.File(p, "w") as f:
            data = np.array([[10 * i + r] * 2 for r in range(n)], dtype=np.int32).reshape(n, 2)
            for k in ("input_ids", "token_type_ids"):
                f.create_dataset(k, data=data, maxshape=(None, 2), chunks=(4, 2))
        paths.append(p)
    balance_hdf5_files(paths)   # total 10, avg 2, rem 2: targets 3, 3, 2, 2
    got = [[r[0] for r in rows(p)] for p in paths]
    assert got == [[0, 1, 2], [10, 3, 4], [32, 33], [30, 31]]
    got_types = [[r[0] for r in rows(p, "token_type_ids")] for p in paths]
    assert got_types == got


def test_balanced_pipeline_files_differ_by_at_most_one_row(tmp_path, examples):
    res = run(tmp_path, examples / "generative_tuning.jsonl", num_training_splits=3, input_packing_config="greedy::drop")
    sizes = [len(rows(res.output_path / f"train_{i}_of_3.hdf5")) for i in (1, 2, 3)]
    assert max(sizes) - min(sizes) <= 1 and res.metadata["max_batch_size_train"] == min(sizes)
    assert sum(sizes) == res.metadata["train_sequences"]
    unbalanced = run(tmp_path, examples / "generative_tuning.jsonl", name="u", num_training_splits=3,
                     input_packing_config="greedy::drop", do_not_balance_hdf5=True)
    assert sum(len(rows(unbalanced.output_path / f"train_{i}_of_3.hdf5")) for i in (1, 2, 3)) == sum(sizes)


def test_folder_input_and_workers_give_the_same_rows(tmp_path, examples):
    folder = tmp_path / "in"
    folder.mkdir()
    lines = (examples / "dialogue.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    (folder / "a.jsonl").write_text("".join(lines[:20]))
    (folder / "b.jsonl").write_text("".join(lines[20:]))
    (folder / "ignored.txt").write_text("not used\n")
    one = run(tmp_path, examples / "dialogue.jsonl", name="one", num_training_splits=2, max_seq_length=64)
    two = run(tmp_path, folder, name="two", num_training_splits=2, max_seq_length=64, num_workers=2)
    for f in ("train_1_of_2.hdf5", "train_2_of_2.hdf5"):
        assert rows(one.output_path / f) == rows(two.output_path / f)
        assert rows(one.output_path / f, "token_type_ids") == rows(two.output_path / f, "token_type_ids")


def test_on_ram_shuffle_is_seeded(tmp_path):
    src = numbered(tmp_path, 40)
    a = run(tmp_path, src, name="a", shuffle="on_RAM", seed=1, num_training_splits=1, keep_split_jsonls=True)
    b = run(tmp_path, src, name="b", shuffle="on_RAM", seed=1, num_training_splits=1, keep_split_jsonls=True)
    c = run(tmp_path, src, name="c", shuffle="on_RAM", seed=2, num_training_splits=1, keep_split_jsonls=True)
    read = lambda r: (r.output_path / "splits/train_1_of_1.jsonl").read_text().splitlines()  # noqa: E731
    assert read(a) == read(b) != read(c)
    assert sorted(read(a)) == sorted(src.read_text().splitlines())
    assert read(a) != src.read_text().splitlines()


def test_large_file_shuffle_is_seeded_complete_and_contiguous(tmp_path):
    src = numbered(tmp_path, 300)
    src.write_text(src.read_text().rstrip("\n"))  # last line without a newline
    kw = dict(shuffle="large_file", num_training_splits=3, keep_split_jsonls=True, shuffle_memory_mb=0.001)
    a = run(tmp_path, src, name="a", seed=5, **kw)
    b = run(tmp_path, src, name="b", seed=5, **kw)
    get = lambda r: [(r.output_path / f"splits/train_{i}_of_3.jsonl").read_text() for i in (1, 2, 3)]  # noqa: E731
    assert get(a) == get(b)
    all_lines = [x for part in get(a) for x in part.splitlines()]
    assert sorted(all_lines) == sorted(src.read_text().splitlines())
    assert [len(p.splitlines()) for p in get(a)] == [100, 100, 100]
    assert all_lines[:20] != src.read_text().splitlines()[:20]


# --------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------
def test_malformed_json_names_file_and_line_and_leaves_no_output(tmp_path, examples):
    src = examples / "json_load_error.jsonl"
    with pytest.raises(ValueError, match=rf"^{src}:\d+: not valid JSON \(Expecting ':' delimiter"):
        run(tmp_path, src, num_training_splits=2)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_ignore_input_format_error_skips_counts_and_lists_bad_lines(tmp_path, examples):
    src = examples / "json_load_error.jsonl"
    bad, blank = [], 0
    for i, line in enumerate(src.read_text(encoding="utf-8").splitlines()):
        if not line.strip():
            blank += 1  # blank lines are skipped: neither articles nor errors
            continue
        try:
            json.loads(line)
        except json.JSONDecodeError:
            bad.append(i + 1)
    res = run(tmp_path, src, num_training_splits=2, ignore_input_format_error=True)
    log = (res.output_path / "json_load_failed_lines.log").read_text().splitlines()
    assert [int(x.split(":")[1]) for x in log] == bad and res.failed_lines == len(bad)
    assert all(x.startswith(f"{src}:") for x in log)
    assert len(bad) == 3 and blank == 1
    assert res.metadata["train_articles"] == 100 - blank - len(bad)


def test_missing_completion_and_bad_utf8_name_file_and_line(tmp_path):
    src = tmp_path / "x.jsonl"
    src.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\n')
    with pytest.raises(ValueError, match=rf"^{src}:2: no 'completion' key \(--completion_keyword\)$"):
        run(tmp_path, src, num_training_splits=1)
    src.write_bytes(b'{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": "\xff"}\n')
    with pytest.raises(ValueError, match=rf"^{src}:2: not UTF-8 text \(byte 0xff at byte 32 of the line\)$"):
        run(tmp_path, src, num_training_splits=1)


def test_empty_input_too_few_lines_and_existing_output(tmp_path):
    empty = tmp_path / "e.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match=rf"^{empty}: the input is empty \(--input_path\)$"):
        run(tmp_path, empty, num_training_splits=1)
    with pytest.raises(ValueError, match=r"5 lines are fewer than the 8 splits asked for \(6 train \+ 1 dev \+ 1 test\)"):
        run(tmp_path, numbered(tmp_path, 5), num_training_splits=6, num_dev_splits=1, num_test_splits=1)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="--output_path exists and is not empty; pass --overwrite_output_path"):
        run(tmp_path, numbered(tmp_path, 5), num_training_splits=1)
    res = run(tmp_path, numbered(tmp_path, 5), num_training_splits=1, overwrite_output_path=True)
    assert not (res.output_path / "keep.txt").exists() and (res.output_path / "train_1_of_1.hdf5").is_file()


def test_unknown_category_names_the_line(tmp_path):
    cats = tmp_path / "c.json"
    cats.write_text('["a"]')
    src = tmp_path / "x.jsonl"
    src.write_text('{"prompt": "a", "completion": "b", "category": "zzz"}\n')
    with pytest.raises(ValueError, match=rf"^{src}:1: category 'zzz' is not in --categories_path \(a\)$"):
        run(tmp_path, src, num_training_splits=1, categories_path=str(cats))


def test_categories_example_writes_category_ids_and_mapping(tmp_path, examples):
    res = run(tmp_path, examples / "category.jsonl", num_training_splits=2,
              categories_path=str(examples / "categories.json"))
    assert json.loads((res.output_path / "category_to_id.json").read_text()) == \
        {"arithmetic": 0, "geography": 1, "spelling": 2}
    cats = np.array(rows(res.output_path / "train_1_of_2.hdf5", "category_ids"))
    types = np.array(rows(res.output_path / "train_1_of_2.hdf5", "token_type_ids"))
    assert set(np.unique(cats[types != 2])) == {0, 1, 2} and (cats[types == 2] == -1).all()


def test_command_line_flags_reach_the_pipeline(tmp_path, capsys):
    from llamazoo.commands import prepare as cmd

    p = argparse.ArgumentParser(prog="llamazoo prepare")
    cmd.add_arguments(p)
    args = p.parse_args(["--input_path", str(numbered(tmp_path, 4)), "--output_path", str(tmp_path / "cli"),
                         "--pretrained_tokenizer", GPT2, "--max_seq_length", "16", "--num_training_splits", "2",
                         "--num_workers", "1", "--input_packing_config", "single::truncate_left", "--no_progress"])
    assert cmd.run(args) == 0
    assert "wrote" in capsys.readouterr().out
    assert yaml.safe_load((tmp_path / "cli/metadata.yaml").read_text())["max_seq_length"] == 16
    single = argparse.ArgumentParser(prog="llamazoo data_prep")
    cmd.add_arguments(single)
    args = single.parse_args(["--input_path", str(numbered(tmp_path, 4)), "--output_path", str(tmp_path / "one.hdf5"),
                              "--pretrained_tokenizer", GPT2, "--max_seq_length", "16", "--no_progress"])
    assert cmd.run(args) == 0 and len(rows(tmp_path / "one.hdf5")) == 2
