"""Tiny prepared datasets for the training tests, written with h5py exactly as generative_data_prep lays
them out (train_i_of_N.hdf5 / dev_j_of_D.hdf5, int32 input_ids + token_type_ids, metadata.yaml)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import yaml

PAD, EOS = 0, 2


def article(rng: np.random.Generator, n_prompt: int, n_completion: int, vocab: int = 512) -> tuple[list[int], list[int]]:
    """Prompt tokens (type 0), completion tokens (type 1), then the article's EOS (type 3)."""
    ids = rng.integers(3, vocab, n_prompt + n_completion).tolist() + [EOS]
    types = [0] * n_prompt + [1] * n_completion + [3]
    return ids, types


def pad_row(ids: list[int], types: list[int], L: int) -> tuple[list[int], list[int]]:
    assert len(ids) <= L
    return ids + [PAD] * (L - len(ids)), types + [2] * (L - len(types))


def pack(articles: list[tuple[list[int], list[int]]], L: int) -> list[tuple[list[int], list[int]]]:
    """Greedy packing: whole articles appended while they fit."""
    rows, cur_i, cur_t = [], [], []
    for ids, types in articles:
        if cur_i and len(cur_i) + len(ids) > L:
            rows.append(pad_row(cur_i, cur_t, L))
            cur_i, cur_t = [], []
        cur_i, cur_t = cur_i + ids, cur_t + types
    if cur_i:
        rows.append(pad_row(cur_i, cur_t, L))
    return rows


def write_hdf5(path: Path, rows: list[tuple[list[int], list[int]]], L: int) -> None:
    import h5py

    ids = np.array([r[0] for r in rows], dtype=np.int32).reshape(-1, L)
    types = np.array([r[1] for r in rows], dtype=np.int32).reshape(-1, L)
    with h5py.File(path, "w") as f:
        for name, data in (("input_ids", ids), ("token_type_ids", types)):
            f.create_dataset(name, data=data, dtype="i4", compression="gzip", chunks=True, maxshape=(None, L))


def write_dataset(folder: Path, train_rows, dev_rows, L: int, n_train_files: int = 1, vocab_size: int = 512,
                  tokenizer_dir: Path | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    chunks = np.array_split(np.arange(len(train_rows)), n_train_files)
    for i, idx in enumerate(chunks, 1):
        write_hdf5(folder / f"train_{i}_of_{n_train_files}.hdf5", [train_rows[j] for j in idx], L)
    if dev_rows:
        write_hdf5(folder / "dev_1_of_1.hdf5", dev_rows, L)
    meta = {"max_seq_length": L, "token_type_ids": True, "vocab_size": vocab_size, "tokenizer_model_type": "test",
            "number_of_training_files": n_train_files, "number_of_dev_files": 1 if dev_rows else 0,
            "number_of_test_files": 0, "max_batch_size_train": min(len(c) for c in chunks),
            "max_batch_size_dev": len(dev_rows) if dev_rows else None}
    (folder / "metadata.yaml").write_text(yaml.safe_dump(meta, sort_keys=True))
    if tokenizer_dir is not None:
        import shutil

        shutil.copytree(tokenizer_dir, folder / "tokenizer")
    return folder


def random_dataset(folder: Path, L: int = 32, n_articles: int = 40, n_dev: int = 8, seed: int = 0,
                   vocab: int = 512, n_train_files: int = 2) -> Path:
    rng = np.random.default_rng(seed)
    arts = [article(rng, int(rng.integers(0, 6)), int(rng.integers(2, 12)), vocab) for _ in range(n_articles + n_dev)]
    return write_dataset(folder, pack(arts[:n_articles], L), pack(arts[n_articles:], L), L, n_train_files, vocab)


def tiny_config_file(path: Path, vocab: int = 512, **overrides) -> Path:
    cfg = dict(model_type="llama", vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
               bos_token_id=1, eos_token_id=EOS, tie_word_embeddings=False)
    cfg.update(overrides)
    path.write_text(json.dumps(cfg))
    return path
