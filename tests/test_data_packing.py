"""Tokens and rows of `llamazoo data_prep` (single-file mode): exact values, and every packing config x
boundary against a plain token-by-token model of generative_data_prep's rules, on the example inputs of
tests/generated_data.py.
"""
from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from llamazoo.data.articles import ArticleBuilder, ArticleOptions
from llamazoo.data.packing import PACKING_CHOICES, Packer, PackingConfig
from llamazoo.data.pipeline import PrepareOptions, load_tokenizer_and_type, prepare_single_file

GPT2 = str(Path(__file__).parent / "data" / "tokenizers" / "gpt2")
EOS = 50256


def run_single(tmp_path: Path, src: Path, tokenizer: str = GPT2, name: str = "out.hdf5", **kw) -> dict:
    out = tmp_path / name
    opts = PrepareOptions(input_path=str(src), output_path=str(out), pretrained_tokenizer=tokenizer,
                          overwrite_output_path=True, progress=False, **kw)
    prepare_single_file(opts, out=lambda s: None)
    with h5py.File(out, "r") as f:
        return {k: f[k][:] for k in f.keys()}


def write_jsonl(path: Path, objs: list) -> Path:
    path.write_text("".join(json.dumps(o) + "\n" for o in objs))
    return path


# --------------------------------------------------------------------------------------------
# exact tokens
# --------------------------------------------------------------------------------------------
def test_full_packing_splits_articles_and_pads_only_the_last_row(tmp_path):
    src = write_jsonl(tmp_path / "a.jsonl", [{"prompt": "hello how", "completion": "are you"},
                                             {"prompt": "hi", "completion": "bye"}])
    got = run_single(tmp_path, src, max_seq_length=3)
    assert got["input_ids"].tolist() == [[31373, 703, 389], [345, EOS, 5303], [33847, EOS, EOS]]
    assert got["token_type_ids"].tolist() == [[0, 0, 1], [1, 3, 0], [1, 3, 2]]
    assert got["input_ids"].dtype == np.int32 and "category_ids" not in got


def test_space_rule_strips_prompt_and_adds_one_space_even_with_empty_prompt(tmp_path):
    src = write_jsonl(tmp_path / "a.jsonl", [{"prompt": "hello how   ", "completion": "   are you"},
                                             {"prompt": "", "completion": "are you"},
                                             {"completion": "are you"}])
    got = run_single(tmp_path, src, max_seq_length=8, input_packing_config="single::drop")
    assert got["input_ids"].tolist() == [[31373, 703, 389, 345, EOS] + [EOS] * 3,
                                         [389, 345, EOS] + [EOS] * 5, [389, 345, EOS] + [EOS] * 5]
    off = run_single(tmp_path, src, name="off.hdf5", max_seq_length=16, input_packing_config="single::drop",
                     disable_space_separator=True)
    hf = load_tokenizer_and_type(GPT2)[0].hf
    row0 = hf.encode("hello how   ") + hf.encode("   are you") + [EOS]
    assert off["input_ids"][0].tolist()[:len(row0)] == row0
    assert off["input_ids"][1].tolist()[:3] == hf.encode("are you") + [EOS]


def test_prefix_postfix_wrap_only_nonempty_prompts(tmp_path):
    src = write_jsonl(tmp_path / "a.jsonl", [{"prompt": "hi", "completion": "bye"},
                                             {"prompt": "", "completion": "bye"}])
    got = run_single(tmp_path, src, max_seq_length=12, input_packing_config="single::drop",
                     prompt_prefix="[INST]", prompt_postfix="[/INST]")
    hf = load_tokenizer_and_type(GPT2)[0].hf
    p = hf.encode("[INST]hi[/INST]")
    assert got["input_ids"][0].tolist()[:len(p) + 2] == p + [33847, EOS]
    assert got["token_type_ids"][0].tolist()[:len(p) + 2] == [0] * len(p) + [1, 3]
    assert got["input_ids"][1].tolist()[:2] == [33847, EOS]


def test_sentencepiece_bos_before_each_prompt_and_kept_on_prompt_less_completion(tmp_path, tokenizers):
    sp = str(tokenizers("sentencepiece"))  # Llama-2's settings: BOS 1 added to every text, EOS 2, no pad
    src = write_jsonl(tmp_path / "a.jsonl", [[{"prompt": "Hi", "completion": "Yo"}, {"prompt": "Ok", "completion": "No"}],
                                             {"prompt": "", "completion": "Yo"}])
    got = run_single(tmp_path, src, tokenizer=sp, max_seq_length=16, input_packing_config="single::drop")
    hf = load_tokenizer_and_type(sp)[0].hf
    hi, yo, ok, no = hf.encode("Hi"), hf.encode(" Yo"), hf.encode("Ok"), hf.encode(" No")
    assert hi[0] == 1 and yo[0] == 1  # the tokenizer adds BOS to every text
    row0 = hi + yo[1:] + [2] + ok + no[1:] + [2]
    assert got["input_ids"][0].tolist()[:len(row0)] == row0
    types0 = [0] * len(hi) + [1] * len(yo) + [0] * len(ok) + [1] * (len(no) - 1) + [3]
    assert got["token_type_ids"][0].tolist()[:len(row0)] == types0
    assert got["input_ids"][1].tolist()[:len(yo) + 1] == yo + [2]  # no prompt: the completion keeps its BOS
    assert got["input_ids"][0, len(row0):].tolist() == [2] * (16 - len(row0))  # no pad token: EOS pads


def test_txt_lines_keep_their_newline_and_end_with_a_separator(tmp_path):
    src = tmp_path / "a.txt"
    src.write_text("first line\nsecond\n")
    got = run_single(tmp_path, src, max_seq_length=6, input_packing_config="single::truncate_right")
    hf = load_tokenizer_and_type(GPT2)[0].hf
    a, b = hf.encode("first line\n"), hf.encode("second\n")
    assert got["input_ids"].tolist() == [a + [EOS] + [EOS] * (5 - len(a)), b + [EOS] + [EOS] * (5 - len(b))]
    assert got["token_type_ids"][0].tolist() == [1] * len(a) + [3] + [2] * (5 - len(a))


def test_attention_boundary_pair_makes_every_pair_eos_a_separator(tmp_path):
    src = write_jsonl(tmp_path / "a.jsonl", [[{"prompt": "hi", "completion": "bye"}, {"prompt": "hi", "completion": "bye"}]])
    jl = run_single(tmp_path, src, max_seq_length=8)
    pair = run_single(tmp_path, src, name="b.hdf5", max_seq_length=8, attention_boundary="prompt_completion_pair")
    assert jl["token_type_ids"][0].tolist() == [0, 1, 1, 0, 1, 3, 2, 2]
    assert pair["token_type_ids"][0].tolist() == [0, 1, 3, 0, 1, 3, 2, 2]


def test_empty_completion_pairs_and_prompt_only_rows_are_dropped_unless_kept(tmp_path):
    src = write_jsonl(tmp_path / "a.jsonl", [{"prompt": "hello how are you", "completion": ""},
                                             {"prompt": "hello how are you doing", "completion": "fine"}])
    got = run_single(tmp_path, src, max_seq_length=4)
    # the first pair is skipped; the second is 5 prompt tokens + 2: its first row is all prompt -> dropped
    assert got["token_type_ids"].tolist() == [[0, 1, 3, 2]]
    kept = run_single(tmp_path, src, name="k.hdf5", max_seq_length=4, keep_prompt_only_sequences=True)
    assert kept["token_type_ids"].tolist() == [[0, 0, 0, 0], [3, 0, 0, 0], [0, 0, 1, 3]]


def test_categories_fill_category_ids_and_pad_with_minus_one(tmp_path):
    cats = tmp_path / "c.json"
    cats.write_text('["a", "b"]')
    src = write_jsonl(tmp_path / "a.jsonl", [{"prompt": "hi", "completion": "bye", "category": "b"},
                                             {"prompt": "hi", "completion": "bye"}])
    got = run_single(tmp_path, src, max_seq_length=4, input_packing_config="single::drop",
                     categories_path=str(cats))
    assert got["category_ids"].tolist() == [[1, 1, 1, -1], [-1, -1, -1, -1]]


# --------------------------------------------------------------------------------------------
# every packing config x boundary against a token-by-token reference
# --------------------------------------------------------------------------------------------
def reference_articles(hf, line: str, kind: str, o: ArticleOptions) -> list[tuple[list, list]]:
    """generative_data_prep's per-line rules, written out one pair at a time with hf.encode."""
    eos, bos = hf.eos_token_id, hf.bos_token_id

    def pair(prompt, completion):
        ids, types = [], []
        if prompt:
            p = hf.encode(prompt)
            if p and p[-1] == eos:
                p = p[:-1]
            ids += p
            types += [0] * len(p)
        if completion:
            c = hf.encode(completion)
            if prompt and c and c[0] == bos:
                c = c[1:]
            if c and c[-1] == eos:
                c = c[:-1]
            ids += c
            types += [1] * len(c)
        if ids:
            ids, types = ids + [eos], types + [1]
        return ids, types

    if kind == "txt":
        ids, types = pair("", line)
        return [(ids, types[:-1] + [3])]
    obj = json.loads(line)
    items = [obj] if isinstance(obj, dict) else obj
    out, ids, types = [], [], []
    for i, it in enumerate(items):
        prompt, completion = it.get(o.prompt_keyword) or "", it[o.completion_keyword] or ""
        if not completion and not o.keep_prompt_only_sequences:
            continue
        if not o.disable_space_separator:
            prompt = prompt.rstrip(" ") if prompt else prompt
            completion = " " + completion.lstrip(" ") if completion else completion
        if prompt:
            prompt = (o.prompt_prefix or "") + prompt + (o.prompt_postfix or "")
        a, b = pair(prompt, completion)
        ids, types = ids + a, types + b
        if o.attention_boundary == "prompt_completion_pair" and ids:
            types[-1] = 3
        if o.packing_boundary == "prompt_completion_pair" and i != len(items) - 1:
            out.append((ids, types))
            ids, types = [], []
    if ids:
        types[-1] = 3
    out.append((ids, types))
    return out


def reference_rows(articles, L: int, config: str, pad: int, keep: bool) -> list[tuple[list, list]]:
    style, _, overflow = config.partition("::")
    rows, cur = [], ([], [])

    def close(row):
        n = L - len(row[0])
        rows.append((row[0] + [pad] * n, row[1] + [2] * n))

    def fit(a):
        if len(a[0]) <= L:
            return a
        if overflow == "drop":
            return [], []
        k = len(a[0]) - L
        return (a[0][k:], a[1][k:]) if overflow == "truncate_left" else (a[0][:L], a[1][:L])

    for a in articles:
        if style == "full":
            for t in zip(*a):
                cur[0].append(t[0])
                cur[1].append(t[1])
                if len(cur[0]) == L:
                    rows.append(cur)
                    cur = ([], [])
        elif style == "greedy":
            if len(cur[0]) + len(a[0]) <= L:
                cur = (cur[0] + a[0], cur[1] + a[1])
            else:
                if cur[0]:
                    close(cur)
                cur = fit(a)
        else:
            a = fit(a)
            if a[0]:
                close(a)
    if style != "single" and cur[0]:
        close(cur)
    return [r for r in rows if keep or 1 in r[1]]


CASES = [("dialogue.jsonl", 40), ("generative_tuning.jsonl", 24), ("metaICL.jsonl", 6), ("pretraining.txt", 8)]


@pytest.mark.parametrize("config", PACKING_CHOICES)
@pytest.mark.parametrize("packing_boundary", ["jsonl", "prompt_completion_pair"])
@pytest.mark.parametrize("attention_boundary", ["jsonl", "prompt_completion_pair"])
def test_rows_equal_token_by_token_reference(tmp_path, examples, config, packing_boundary, attention_boundary):
    hf = load_tokenizer_and_type(GPT2)[0].hf
    for name, n_lines in CASES:
        lines = (examples / name).read_text(encoding="utf-8").splitlines(keepends=True)[:n_lines]
        src = tmp_path / name
        src.write_text("".join(lines), encoding="utf-8")
        kind = "txt" if name.endswith(".txt") else "jsonl"
        o = ArticleOptions(packing_boundary=packing_boundary, attention_boundary=attention_boundary)
        L = 96
        arts = [a for line in lines for a in reference_articles(hf, line, kind, o)]
        want = reference_rows(arts, L, config, EOS, keep=False)
        got = run_single(tmp_path, src, name=f"{name}.hdf5", max_seq_length=L, input_packing_config=config,
                         packing_boundary=packing_boundary, attention_boundary=attention_boundary)
        assert got["input_ids"].tolist() == [r[0] for r in want], name
        assert got["token_type_ids"].tolist() == [r[1] for r in want], name


def test_packer_greedy_closes_the_row_before_a_dropped_unit():
    from llamazoo.data.articles import Unit

    p = Packer(4, -1, PackingConfig.parse("greedy::drop"))
    p.add([Unit([1, 2], [1, 3], []), Unit([5, 6, 7, 8, 9], [1] * 5, []), Unit([3], [3], [])])
    p.finish()
    ids, types, _ = p.take()
    assert ids.tolist() == [[1, 2, -1, -1], [3, -1, -1, -1]]
    assert p.tokens_dropped == 5


def test_bad_packing_config_names_the_flag():
    with pytest.raises(ValueError, match=r"--input_packing_config must be one of full, greedy::drop"):
        PackingConfig.parse("greedy")


def test_builder_rejects_bad_boundary():
    hf = load_tokenizer_and_type(GPT2)[0].hf
    with pytest.raises(ValueError, match="--packing_boundary must be one of jsonl, prompt_completion_pair"):
        ArticleBuilder(hf, ArticleOptions(packing_boundary="line"))
