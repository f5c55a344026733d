"""`llamazoo eval perplexity`: text windows against transformers' sliding-window perplexity, prepared HDF5
rows against the training loss's weights computed by hand, torchrun data parallel against one process,
and the input errors."""
from __future__ import annotations

import json
import math
import shutil

import h5py
import numpy as np
import pytest
import torch
from conftest import hf_tiny_model
from test_distributed_parallel import torchrun

from llamazoo.cli import main
from llamazoo.evaluation.perplexity import windows

TEXT = ("The quiet river carries a heavy letter past the old village. Every morning the market opens and "
        "people cross the bridge with baskets of apples, bread and lanterns. ") * 6
DOCS = [{"text": "A curious student finds the golden orchard beyond the distant island."},
        {"prompt": "Question: what does the teacher paint?\nAnswer:", "completion": " The evening harbor."},
        {"text": "x"},  # one token after BOS: scored once
        {"text": TEXT[:300]}]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tokenizers):
    """A tiny random Llama with the SentencePiece tokenizer (Llama-2's conventions: a BOS on every text)."""
    out = tmp_path_factory.mktemp("eval_tiny")
    model = hf_tiny_model(vocab_size=1000, max_position_embeddings=256)
    model.save_pretrained(out)
    shutil.copy(tokenizers("sentencepiece") / "tokenizer.model", out / "tokenizer.model")
    return model, out


def reference_nll(model, docs: list[list[int]], max_len: int, stride: int) -> tuple[float, int]:
    """transformers' perplexity-guide loop per document (windows every `stride` tokens, only the tokens
    past the previous window's end scored), with the NLL summed exactly over scored tokens."""
    total, count = 0.0, 0
    with torch.no_grad():
        for ids in docs:
            ids = torch.tensor([ids])
            n, prev_end = ids.shape[1], 0
            for begin in range(0, n, stride):
                end = min(begin + max_len, n)
                x = ids[:, begin:end]
                labels = x.clone()
                labels[:, :-(end - prev_end)] = -100
                logits = model(x).logits.float()
                nll = torch.nn.functional.cross_entropy(logits[0, :-1], labels[0, 1:], reduction="sum",
                                                        ignore_index=-100)
                total += nll.item()
                count += int((labels[0, 1:] != -100).sum())
                prev_end = end
                if end == n:
                    break
    return total / count, count


def test_windows_score_every_token_once_with_context():
    for n in (1, 2, 7, 64, 65, 200):
        for max_len, stride in ((8, 3), (8, 7), (64, 32), (5, 1)):
            seen = []
            for start, end, first in windows(n, max_len, stride):
                assert end - start <= max_len and start < first <= end
                seen += range(first, end)
            assert seen == list(range(1, n))


def test_text_perplexity_equals_transformers_sliding_window(tiny, tmp_path, one_thread):
    from llamazoo.io.tokenizer import load_tokenizer

    model, folder = tiny
    tok = load_tokenizer(folder)
    assert tok.add_bos
    (tmp_path / "doc.txt").write_text(TEXT)
    (tmp_path / "docs.jsonl").write_text("\n".join(json.dumps(d) for d in DOCS) + "\n\n")
    for name, texts, max_len, stride in (("doc.txt", [TEXT], 48, 20), ("docs.jsonl", None, 32, 31)):
        texts = texts or [d.get("text", d.get("prompt", "") + d.get("completion", "")) for d in DOCS]
        ref, count = reference_nll(model, [tok.encode(t) for t in texts], max_len, stride)
        out = tmp_path / f"{name}.json"
        assert main(["eval", "perplexity", "--no-progress", f"checkpoint.model_name_or_path={folder}",
                     f"eval.input={tmp_path / name}", f"eval.max_seq_length={max_len}", f"eval.stride={stride}",
                     "eval.batch_size=3", "model.dtype=float32", f"eval.output={out}"]) == 0
        got = json.loads(out.read_text())
        assert got["tokens"] == count and got["documents"] == len(texts)
        assert abs(got["nll"] - ref) <= 1e-4 * ref
        assert got["perplexity"] == pytest.approx(math.exp(got["nll"]))
        assert got["tokens_per_second"] > 0 and got["max_seq_length"] == max_len and got["stride"] == stride


def write_prepared(folder, L: int = 24, seed: int = 0):
    """dev rows: single articles (prompt, completion, separator EOS, padding) and one row of two packed
    articles; train rows: something else. Returns the dev articles as (ids, types) lists."""
    rng = np.random.default_rng(seed)
    folder.mkdir()
    (folder / "metadata.yaml").write_text(f"max_seq_length: {L}\nnumber_of_training_files: 1\n")

    def article(p: int, c: int):
        ids = [1, *rng.integers(3, 1000, p + c).tolist(), 2]
        return ids, [0] * (p + 1) + [1] * c + [3]

    rows = [[article(5, 6)], [article(3, 12)], [article(4, 4), article(2, 7)], [article(9, 9)]]
    for name, use in (("dev_1_of_1.hdf5", rows), ("train_1_of_1.hdf5", [[article(2, 3)]])):
        ids = np.full((len(use), L), 2, dtype=np.int32)
        types = np.full((len(use), L), 2, dtype=np.int32)
        for r, arts in enumerate(use):
            flat_ids = sum((a[0] for a in arts), [])
            flat_types = sum((a[1] for a in arts), [])
            ids[r, :len(flat_ids)], types[r, :len(flat_types)] = flat_ids, flat_types
        with h5py.File(folder / name, "w") as f:
            f["input_ids"], f["token_type_ids"] = ids, types
    return [a for arts in rows for a in arts]


def test_prepared_rows_use_the_training_loss_weights(tiny, tmp_path, one_thread):
    model, folder = tiny
    articles = write_prepared(tmp_path / "prepared")
    total, weight = 0.0, 0
    with torch.no_grad():  # each article alone; prompt targets weigh 0
        for ids, types in articles:
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1].float(), -1)
            for i in range(len(ids) - 1):
                if types[i + 1] in (1, 3):
                    total -= logp[i, ids[i + 1]].item()
                    weight += 1
    for source in ("prepared", "prepared/dev_1_of_1.hdf5"):
        out = tmp_path / "ppl.json"
        assert main(["eval", "perplexity", f"checkpoint.model_name_or_path={folder}", "model.dtype=float32",
                     f"eval.input={tmp_path / source}", "eval.prompt_loss_weight=0", "eval.batch_size=3",
                     f"eval.output={out}"]) == 0
        got = json.loads(out.read_text())
        assert got["tokens"] == weight and got["rows"] == 4
        assert got["nll"] == pytest.approx(total / weight, rel=1e-5)
    assert got["split"] == "file"
    assert json.loads(out.read_text())["max_seq_length"] == 24


def test_data_parallel_equals_one_process(tiny, tmp_path):
    _, folder = tiny
    (tmp_path / "docs.jsonl").write_text("\n".join(json.dumps(d) for d in DOCS * 2) + "\n")
    args = ["eval", "perplexity", "--no-progress", f"checkpoint.model_name_or_path={folder}", "model.device=cpu",
            f"eval.input={tmp_path / 'docs.jsonl'}", "eval.max_seq_length=24", "eval.stride=12",
            "model.dtype=float32"]
    assert main([*args, f"eval.output={tmp_path / 'one.json'}"]) == 0
    p = torchrun(2, ["-m", "llamazoo", *args, f"eval.output={tmp_path / 'two.json'}"])
    one, two = (json.loads((tmp_path / f).read_text()) for f in ("one.json", "two.json"))
    assert two["world_size"] == 2 and one["world_size"] == 1
    assert two["tokens"] == one["tokens"] and two["windows"] == one["windows"]
    assert two["nll"] == pytest.approx(one["nll"], rel=1e-6)
    assert p.stdout.count('"nll"') == 1  # rank 0 prints


@pytest.mark.parametrize("name, content, extra, message", [
    ("bad.jsonl", '{"text": "fine"}\n{"prompt": "no completion"}\n', [],
     'bad.jsonl:2: expected a JSON object with a "text" string, or "prompt" and "completion" strings'),
    ("bad.jsonl", '{"text": "fine"}\n\n[1,\n', [], "bad.jsonl:3: not JSON"),
    ("doc.txt", "some text here", ["eval.max_seq_length=16", "eval.stride=16"],
     "eval.stride=16 must be smaller than eval.max_seq_length=16"),
    ("doc.csv", "a,b", [], "doc.csv must be a .txt, .jsonl or .hdf5 file or a prepared HDF5 folder"),
    ("folder", None, [], "folder is a folder without metadata.yaml"),
])
def test_input_errors_are_one_line(tiny, tmp_path, capsys, name, content, extra, message):
    _, folder = tiny
    path = tmp_path / name
    if content is None:
        path.mkdir()
    else:
        path.write_text(content)
    assert main(["eval", "perplexity", f"checkpoint.model_name_or_path={folder}", f"eval.input={path}",
                 *extra]) == 1
    err = capsys.readouterr().err
    assert err.startswith("llamazoo eval: error: ") and message in err and err.count("\n") == 1
