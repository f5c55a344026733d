"""The HDF5 reader, the resumable sampler, and the clear errors for bad training input."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from train_helpers import random_dataset, tiny_config_file

from llamazoo.cli import main as cli_main
from llamazoo.config import TrainConfig, load_config
from llamazoo.data.dataset import BatchSampler, PreparedDataset
from llamazoo.training.trainer import train


def test_reader_uses_train_and_dev_files_by_name(tmp_path):
    # a parent folder named like a split must not confuse train/dev (the original matched whole paths)
    ds_dir = random_dataset(tmp_path / "dev_runs" / "train_data", n_train_files=3)
    ds = PreparedDataset(ds_dir, 32)
    assert [p.name for p in ds.train_files] == ["train_1_of_3.hdf5", "train_2_of_3.hdf5", "train_3_of_3.hdf5"]
    assert [p.name for p in ds.dev_files] == ["dev_1_of_1.hdf5"]
    import h5py

    expected = np.concatenate([h5py.File(p)["input_ids"][:] for p in ds.train_files])
    order = [5, 0, len(expected) - 1, 3, 3]
    ids, types = ds.train.read(order)
    assert ids.dtype == torch.int64 and ids.shape == (5, 32)
    assert (ids.numpy() == expected[order]).all()


def test_sampler_is_seeded_complete_rank_split_and_resumable():
    s = BatchSampler(num_rows=10, batch_size=3, seed=7)
    epoch0 = [s.next()[2] for _ in range(s.batches_per_epoch)]
    assert sorted(np.concatenate(epoch0).tolist()) == list(range(10))  # nothing dropped, last batch kept
    assert [len(b) for b in epoch0] == [3, 3, 3, 1]
    again = BatchSampler(10, 3, seed=7)
    assert all((a == again.next()[2]).all() for a in epoch0)
    e1 = s.next()
    assert e1[0] == 1 and not (e1[2] == epoch0[0]).all()
    # resume: state after 5 batches continues with batch 6
    a = BatchSampler(10, 3, seed=7)
    for _ in range(5):
        a.next()
    b = BatchSampler(10, 3, seed=7)
    b.load_state_dict(a.state_dict())
    assert (a.next()[2] == b.next()[2]).all()
    # two ranks split each global batch; every row is used and ranks get equal shares
    r0, r1 = BatchSampler(9, 2, 3, rank=0, world_size=2), BatchSampler(9, 2, 3, rank=1, world_size=2)
    single = BatchSampler(9, 4, 3)
    for _ in range(r0.batches_per_epoch):
        x, y, z = r0.next()[2], r1.next()[2], single.next()[2]
        assert len(x) == len(y)  # the odd last row is topped up from the epoch's start
        assert np.concatenate([x, y]).tolist()[:len(z)] == z.tolist()
    with pytest.raises(ValueError, match="global batch"):
        BatchSampler(10, 2, 7).load_state_dict(a.state_dict())


def run_cli(capsys, *args):
    rc = cli_main(["train", "--no-progress", *args])
    return rc, capsys.readouterr().err


def test_clear_errors(tmp_path, capsys):
    ds = random_dataset(tmp_path / "ds")
    cfg = tiny_config_file(tmp_path / "c.json")
    base = [f"training.output_dir={tmp_path / 'out'}", "model.device=cpu"]
    cases = [
        ([f"training.dataset={tmp_path / 'nope'}", f"checkpoint.config_name={cfg}"], ["training.dataset", "nope", "does not exist"]),
        ([f"training.dataset={tmp_path}", f"checkpoint.config_name={cfg}"], ["metadata.yaml"]),
        ([f"training.dataset={ds}", f"checkpoint.config_name={cfg}", "model.max_seq_length=64"],
         ["model.max_seq_length is 64", "32"]),
        ([f"training.dataset={ds}", f"checkpoint.config_name={cfg}", "checkpoint.model_name_or_path=default"],
         ["exactly one", "both"]),
        ([f"training.dataset={ds}"], ["exactly one", "neither"]),
        ([f"training.dataset={ds}", f"checkpoint.config_name={cfg}", "training.batch_size=1000"],
         ["training.batch_size 1000", "training rows"]),
        ([f"training.dataset={ds}", f"checkpoint.config_name={cfg}", f"training.output_dir={cfg}/sub"],
         ["training.output_dir", "cannot write"]),
        ([f"training.dataset={ds}", f"checkpoint.config_name={tiny_config_file(tmp_path / 'v.json', vocab=100)}"],
         ["vocabulary of 512", "vocab_size 100"]),
        ([f"training.dataset={ds}", f"checkpoint.config_name={cfg}", "training.lr_schedule=step"], ["lr_schedule"]),
        ([f"training.dataset={ds}", f"checkpoint.config_name={cfg}", "training.resume_from=/no/such"],
         ["training.resume_from", "not a training checkpoint"]),
    ]
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:  # optional dependency: when missing, asking for it is a clear error
        cases.append(([f"training.dataset={ds}", f"checkpoint.config_name={cfg}", "training.tensorboard=true"],
                      ["training.tensorboard", "not installed"]))
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "metadata.yaml").write_text("max_seq_length: 32\n")
    cases.append(([f"training.dataset={empty}", f"checkpoint.config_name={cfg}"], ["no train_", "hdf5"]))
    for args, needles in cases:
        rc, err = run_cli(capsys, *base, *args)
        assert rc == 1, (args, err)
        line = err.strip().splitlines()[-1]
        assert line.startswith("llamazoo train: error:"), err
        for n in needles:
            assert n in line, (n, line)


def test_non_finite_loss_stops_with_a_clear_message(tmp_path):
    from llamazoo.io.hf import random_model, read_config, save_model
    from llamazoo.training.trainer import TrainingError

    ds = random_dataset(tmp_path / "ds")
    model = random_model(read_config(tiny_config_file(tmp_path / "c.json")), seed=0)
    with torch.no_grad():
        model.lm_head.weight[5, 0] = float("inf")
    save_model(model, tmp_path / "bad")
    cfg = load_config(TrainConfig, None, [f"training.dataset={ds}", f"checkpoint.model_name_or_path={tmp_path / 'bad'}",
                                          f"training.output_dir={tmp_path / 'out'}", "model.device=cpu"])
    with pytest.raises(TrainingError, match=r"step 1: non-finite loss .*learning_rate"):
        train(cfg, progress=False)
