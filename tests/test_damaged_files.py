"""Damaged files (truncated by a full disk or an interrupted copy, corrupt headers) are one line naming the file,
exit code 1 and no traceback, through the CLI: HF checkpoints (safetensors, shards, .bin, index), GGUF,
training checkpoints on resume, prepared HDF5 datasets."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from train_helpers import random_dataset, tiny_config_file

from llamazoo.cli import main
from llamazoo.io.damaged import DamagedFileError

pytestmark = pytest.mark.usefixtures("one_thread")


def cli_error(capsys, *argv: str) -> str:
    """Runs the CLI in-process; checks exit code 1, no traceback, and returns the last stderr line (the error)."""
    code = main(list(argv))
    err = capsys.readouterr().err
    assert code == 1, err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


def assert_damaged(line: str, command: str, file: Path, fmt: str, *fragments: str) -> None:
    """The exact shape `llamazoo CMD: error: FILE: damaged or truncated FMT file (REASON)`; the reason is the
    reading library's (its wording may change between versions: only stable fragments are checked)."""
    head = f"llamazoo {command}: error: {file}: damaged or truncated {fmt} file ("
    assert line.startswith(head) and line.endswith(")"), line
    for f in fragments:
        assert f in line[len(head):], line


def truncate(f: Path, keep: float = 0.5) -> None:
    data = f.read_bytes()
    f.write_bytes(data[:int(len(data) * keep)])


def overwrite(f: Path, offset: int, junk: bytes) -> None:
    data = bytearray(f.read_bytes())
    data[offset:offset + len(junk)] = junk
    f.write_bytes(bytes(data))


# -- HF checkpoints ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("damage, reason", [
    (lambda f: truncate(f), "incomplete metadata, file not fully covered"),
    (lambda f: truncate(f, keep=0.9999), "incomplete metadata, file not fully covered"),  # one tensor's tail
    (lambda f: overwrite(f, 8, b"not json"), "invalid JSON in header"),
    (lambda f: f.write_bytes(b""), "header too small"),
])
def test_damaged_safetensors_generate_and_convert(hf_folder, tmp_path, capsys, damage, reason):
    """safetensors checks the header against the file's length when it opens (tensors are mmapped), so a file
    missing even its last bytes fails at open, before any tensor is read."""
    _, folder = hf_folder()
    file = folder / "model.safetensors"
    damage(file)
    line = cli_error(capsys, "generate", f"checkpoint.model_name_or_path={folder}",
                     f"generation.output_dir={tmp_path / 'g'}")
    assert_damaged(line, "generate", file, "safetensors", reason)
    line = cli_error(capsys, "convert", "--from-hf", str(folder), "--output", str(tmp_path / "o"))
    assert_damaged(line, "convert", file, "safetensors", reason)
    assert not (tmp_path / "o").exists()


def test_damaged_shard_of_a_sharded_folder(hf_folder, tmp_path, capsys):
    _, folder = hf_folder(save_kwargs=dict(max_shard_size="100KB"))
    shard = sorted(folder.glob("model-*.safetensors"))[2]
    truncate(shard, keep=0.99)
    line = cli_error(capsys, "convert", "--from-hf", str(folder), "--output", str(tmp_path / "o"))
    assert_damaged(line, "convert", shard, "safetensors", "not fully covered")


def test_damaged_shard_read_by_slices(hf_folder):
    """The tensor-parallel loader reads slices of the same files through the same opener."""
    from llamazoo.io.hf import build_model, load_sharded_weights, read_config

    _, folder = hf_folder(save_kwargs=dict(max_shard_size="100KB"))
    shard = sorted(folder.glob("model-*.safetensors"))[1]
    overwrite(shard, 8, b"\x00\x01")
    with pytest.raises(DamagedFileError, match=rf"^{shard}: damaged or truncated safetensors file \(.*invalid JSON"):
        load_sharded_weights(build_model(read_config(folder)), folder, "cpu")


def test_damaged_index_json(hf_folder, tmp_path, capsys):
    _, folder = hf_folder(save_kwargs=dict(max_shard_size="100KB"))
    index = folder / "model.safetensors.index.json"
    truncate(index)
    line = cli_error(capsys, "convert", "--from-hf", str(folder), "--output", str(tmp_path / "o"))
    assert_damaged(line, "convert", index, "JSON", "line", "column")
    index.write_bytes(b"\xff\xfe\x00garbage")  # not even UTF-8
    line = cli_error(capsys, "convert", "--from-hf", str(folder), "--output", str(tmp_path / "o"))
    assert_damaged(line, "convert", index, "JSON", "utf-8")
    index.write_text('{"weight_map": ["model-00001-of-00005.safetensors"]}')
    line = cli_error(capsys, "convert", "--from-hf", str(folder), "--output", str(tmp_path / "o"))
    assert line == (f'llamazoo convert: error: {index}: expected a "weight_map" object of tensor name -> shard '
                    f'file name')


@pytest.mark.parametrize("damage", ["truncated", "overwritten head", "empty"])
def test_damaged_pytorch_bin(hf_folder, tmp_path, capsys, damage):
    model, folder = hf_folder()
    (folder / "model.safetensors").unlink()
    file = folder / "pytorch_model.bin"
    torch.save(model.state_dict(), file)
    {"truncated": lambda: truncate(file), "overwritten head": lambda: overwrite(file, 0, b"\x00" * 64),
     "empty": lambda: file.write_bytes(b"")}[damage]()
    line = cli_error(capsys, "convert", "--from-hf", str(folder), "--output", str(tmp_path / "o"))
    assert_damaged(line, "convert", file, "PyTorch")


def test_legacy_pytorch_bin_still_loads(hf_folder):
    """The pre-zip torch.save format cannot be mmapped; it is read whole instead of being called damaged."""
    from llamazoo.io.hf import load_model

    model, folder = hf_folder()
    (folder / "model.safetensors").unlink()
    torch.save(model.state_dict(), folder / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    ours = load_model(folder)
    assert torch.equal(ours.model.layers[1].mlp.up_proj.weight, model.model.layers[1].mlp.up_proj.weight)


# -- GGUF ------------------------------------------------------------------------------------------------
def tiny_gguf(path: Path) -> Path:
    """A small GGUF file (header, metadata, tensor infos, two tensors' data)."""
    import numpy as np
    from gguf import GGUFWriter

    w = GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_tensor("token_embd.weight", np.arange(32 * 16, dtype=np.float32).reshape(32, 16))
    w.add_tensor("output_norm.weight", np.ones(16, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_truncated_gguf(tmp_path, capsys):
    """Cut anywhere (header, metadata, tensor infos, data, by its last byte): the GGUF reader maps every
    tensor when it opens the file, so `convert --from-gguf` stops there, naming the file."""
    data = tiny_gguf(tmp_path / "whole.gguf").read_bytes()
    file = tmp_path / "model.gguf"
    for keep in [*range(0, len(data), 97), len(data) - 1]:
        file.write_bytes(data[:keep])
        line = cli_error(capsys, "convert", "--from-gguf", str(file), "--output", str(tmp_path / "o"))
        assert_damaged(line, "convert", file, "GGUF")
        assert not (tmp_path / "o").exists()


# -- prepared HDF5 datasets --------------------------------------------------------------------------------
@pytest.fixture
def dataset(tmp_path) -> Path:
    return random_dataset(tmp_path / "ds", n_articles=40)


def test_damaged_hdf5_inspect_data(dataset, capsys):
    file = dataset / "train_2_of_2.hdf5"
    truncate(file)
    for target in (dataset, file):
        line = cli_error(capsys, "inspect-data", str(target))
        assert_damaged(line, "inspect-data", file, "HDF5", "truncated file")
    overwrite(file, 0, b"\x00" * 8)
    line = cli_error(capsys, "inspect-data", str(file))
    assert_damaged(line, "inspect-data", file, "HDF5", "file signature not found")


def test_hdf5_without_input_ids_inspect_data(tmp_path, capsys):
    import h5py

    file = tmp_path / "other.hdf5"
    with h5py.File(file, "w") as h:
        h.create_dataset("token_type_ids", data=[[0, 1]])
    line = cli_error(capsys, "inspect-data", str(file))
    assert line == f"llamazoo inspect-data: error: {file}: no 'input_ids' dataset; expected input_ids and token_type_ids"


def first_chunk(file: Path) -> tuple[int, int]:
    """(byte offset, size) of input_ids' first compressed chunk."""
    import h5py

    with h5py.File(file, "r") as h:
        info = h["input_ids"].id.get_chunk_info(0)
        return info.byte_offset, info.size


def test_corrupt_hdf5_chunk_fails_when_read(dataset, capsys):
    """A corrupt compressed chunk leaves the file openable; it fails when its rows are read, still naming it."""
    from llamazoo.data.dataset import PreparedDataset

    file = dataset / "train_1_of_2.hdf5"
    offset, size = first_chunk(file)
    overwrite(file, offset + size // 2, b"\xa5" * 32)
    ds = PreparedDataset(dataset, 32)
    try:
        with pytest.raises(DamagedFileError, match=rf"^{file}: damaged or truncated HDF5 file \("):
            ds.train.read(list(range(len(ds.train))))
    finally:
        ds.close()
    line = cli_error(capsys, "inspect-data", str(file))
    assert_damaged(line, "inspect-data", file, "HDF5")


# -- training checkpoints ----------------------------------------------------------------------------------
def train_args(base: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--no-progress", f"training.dataset={base / 'ds'}", f"checkpoint.config_name={base / 'c.json'}",
            f"training.output_dir={out}", "model.device=cpu", "training.batch_size=2", "training.end_early_at_step=2",
            "training.save_every_steps=2", "training.evaluate=false", *extra]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A single-process run with a checkpoint at step 2."""
    base = tmp_path_factory.mktemp("damaged_resume")
    random_dataset(base / "ds", n_articles=40)
    tiny_config_file(base / "c.json")
    assert main(train_args(base, base / "run")) == 0
    assert (base / "run" / "checkpoints" / "step_2" / "train_state.pt").is_file()
    return base


@pytest.mark.parametrize("name, fmt, damage", [
    ("model.safetensors", "safetensors", truncate),
    ("train_state.pt", "PyTorch", truncate),
    ("train_state.pt", "PyTorch", lambda f: overwrite(f, 0, b"\x00" * 32)),
])
def test_damaged_training_checkpoint_on_resume(trained, tmp_path, capsys, name, fmt, damage):
    out = tmp_path / "run"
    shutil.copytree(trained / "run", out)
    file = out / "checkpoints" / "step_2" / name
    damage(file)
    capsys.readouterr()
    line = cli_error(capsys, *train_args(trained, out, "training.end_early_at_step=4", "training.resume_from=auto"))
    assert_damaged(line, "train", file, fmt)


def test_damaged_hdf5_in_training(trained, tmp_path, capsys):
    ds = tmp_path / "ds"
    shutil.copytree(trained / "ds", ds)
    truncate(ds / "train_1_of_2.hdf5")
    base = tmp_path
    shutil.copy(trained / "c.json", base / "c.json")
    line = cli_error(capsys, *train_args(base, tmp_path / "run"))
    assert_damaged(line, "train", ds / "train_1_of_2.hdf5", "HDF5", "truncated file")


@pytest.fixture
def sharded_checkpoint(tmp_path):
    """A torch.distributed.checkpoint training checkpoint written by a one-process gloo group, and what
    loads it (parallel runs are the only writers; the reading code is the same at any world size)."""
    import torch.distributed as dist

    from llamazoo.io.hf import random_model
    from llamazoo.model.registry import named_config
    from llamazoo.training.state import CheckpointIO, load_sharded_checkpoint, save_sharded_checkpoint

    class Sharded(CheckpointIO):
        sharded = True

    def fresh():
        model = random_model(named_config("tiny"), seed=0)
        return model, torch.optim.AdamW(model.parameters(), lr=1e-3)

    model, opt = fresh()
    model(torch.tensor([[1, 2, 3]])).sum().backward()
    opt.step()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        path = save_sharded_checkpoint(tmp_path / "run", 2, model, {"step": 2}, Sharded(), opt, keep_last=2)
    finally:
        dist.destroy_process_group()
    return path, lambda: load_sharded_checkpoint(path, *fresh())


def test_sharded_checkpoint_loads_and_damage_names_the_file(sharded_checkpoint):
    from llamazoo.training.state import DCP_DIR

    path, load = sharded_checkpoint
    assert load()["step"] == 2
    shard = next((path / DCP_DIR).glob("*.distcp"))
    size = shard.stat().st_size
    truncate(shard)
    with pytest.raises(DamagedFileError) as e:
        load()
    end = int(str(e.value).rsplit(" ", 1)[1].rstrip(")"))
    assert str(e.value) == (f"{shard}: damaged or truncated torch.distributed.checkpoint shard file ({size // 2} "
                            f"bytes; .metadata lists data up to byte {end})") and size // 2 < end <= size
    meta = path / DCP_DIR / ".metadata"
    truncate(meta)
    with pytest.raises(DamagedFileError, match=rf"^{meta}: damaged or truncated torch.distributed.checkpoint "
                                               rf"metadata file \("):
        load()
    (path / "train_state.pt").write_bytes(b"PK\x03\x04 cut short")
    with pytest.raises(DamagedFileError, match=rf"^{path / 'train_state.pt'}: damaged or truncated PyTorch file"):
        load()


def test_corrupt_sharded_checkpoint_data_is_one_clear_error(sharded_checkpoint):
    """Bytes overwritten inside a shard (its length intact) fail in torch.distributed.checkpoint's reader,
    whose CheckpointException (a BaseException carrying every rank's traceback) becomes one ValueError."""
    from llamazoo.training.state import DCP_DIR

    path, load = sharded_checkpoint
    shard = next((path / DCP_DIR).glob("*.distcp"))
    overwrite(shard, 0, b"\x13" * 64)
    with pytest.raises(ValueError, match=rf"^{path / DCP_DIR}: cannot load these torch.distributed.checkpoint "
                                         r"shards into this run \(rank 0: \w+: ") as e:
        load()
    assert "\n" not in str(e.value) and "Traceback" not in str(e.value)


def test_damaged_train_state_json_on_parallel_resume(sharded_checkpoint):
    """torchrun runs read train_state.json (the layout that wrote the checkpoint) before anything else."""
    from types import SimpleNamespace

    from llamazoo.distributed.trainer_hooks import check_resume_world

    path, _ = sharded_checkpoint
    cfg = SimpleNamespace(training=SimpleNamespace(resume_from=str(path), output_dir=str(path.parent.parent)))
    state = path / "train_state.json"
    assert state.is_file()
    check_resume_world(cfg, dp_size=1)  # intact: same layout, no error
    state.write_text('{"dp_world_size": 1, "world_')
    with pytest.raises(DamagedFileError, match=rf"^{state}: damaged or truncated JSON file \("):
        check_resume_world(cfg, dp_size=1)
    state.write_text("[1, 2]")
    with pytest.raises(ValueError, match=rf"^{state}: damaged training checkpoint \(expected a JSON object\)$"):
        check_resume_world(cfg, dp_size=1)
