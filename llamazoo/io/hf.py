"""Hugging Face checkpoint folders in and out: the one checkpoint loader.

Loading builds the model on the meta device and assigns tensors straight from mmapped safetensors
(or `torch.load(mmap=True)` for .bin), so the weights are never held twice. Saving writes into a
temporary sibling folder and renames it when complete, so an interrupted save leaves nothing that
looks like a checkpoint.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Iterator

import torch

from llamazoo.io.atomic import replace_path, temp_path_beside
from llamazoo.io.damaged import reading
from llamazoo.io.mapped import HugePageArena, empty_on_huge_pages, release_pages
from llamazoo.model.llama import (LlamaConfig, LlamaForCausalLM, PrecisionOptions, init_weights,
                                  materialize_parameters, replay_default_init)
from llamazoo.model.registry import NAMED_CONFIGS, named_config

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}
DEFAULT_MAX_SHARD_SIZE = 5 * 1000**3


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return None
    try:
        return DTYPES[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of float32, bfloat16, float16, auto") from None


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# -- configs ----------------------------------------------------------------------------------------
def read_config(path: str | os.PathLike) -> LlamaConfig:
    """A config.json file, a folder holding one, or a named config."""
    if isinstance(path, str) and path in NAMED_CONFIGS:
        return named_config(path)
    p = Path(path)
    file = p / "config.json" if p.is_dir() else p
    if not file.is_file():
        if p.is_dir():
            raise FileNotFoundError(f"{p}: no config.json in this folder")
        raise FileNotFoundError(
            f"{path}: no such file or folder, and not a model name (known: default, {', '.join(NAMED_CONFIGS)})"
        )
    d = read_json(file)
    if not isinstance(d, dict):
        raise ValueError(f"{file}: expected a JSON object of config keys")
    return LlamaConfig.from_hf(d, source=str(file))


def read_json(file: Path) -> Any:
    """A JSON file's content; bad JSON or bytes that are not UTF-8 are one DamagedFileError naming the file."""
    with reading(file, "JSON"):
        return json.loads(file.read_text(encoding="utf-8"))


# -- reading tensors ----------------------------------------------------------------------------------
def weight_files(folder: Path) -> list[Path]:
    """The weight files of a HF folder, checking that every shard named in an index exists."""
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        index = folder / index_name
        if index.is_file():
            content = read_json(index)
            weight_map = content.get("weight_map") if isinstance(content, dict) else None
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise ValueError(f"{index}: expected a \"weight_map\" object of tensor name -> shard file name")
            files = sorted(set(weight_map.values()))
            for name in files:
                if not (folder / name).is_file():
                    raise FileNotFoundError(f"{folder / name}: shard named in {index_name} is missing")
            return [folder / n for n in files]
        if (folder / single).is_file():
            return [folder / single]
    raise FileNotFoundError(f"{folder}: no model.safetensors, pytorch_model.bin or an index of shards")


def open_safetensors(path: Path):
    """safe_open(path) (a context manager): a damaged or truncated file is one DamagedFileError naming it.

    The header is parsed and checked against the file's length here, so truncation fails at open; the
    tensors are mmapped, so read them (get_tensor, get_slice[...]) inside `reading(path, "safetensors")`."""
    from safetensors import safe_open

    with reading(path, "safetensors"):
        return safe_open(str(path), framework="pt")


def load_torch_file(path: Path, weights_only: bool = True, mmap: bool = True) -> Any:
    """torch.load on CPU, mmapped (if `mmap`) when the file has the zip format of torch >= 1.6, read whole
    when it has the legacy one; a damaged or truncated file is one DamagedFileError naming it (torch raises
    OSError, EOFError, pickle or zip errors)."""
    with reading(path, "PyTorch"):
        with open(path, "rb") as fh:
            zipped = fh.read(4) == b"PK\x03\x04"
        return torch.load(str(path), map_location="cpu", mmap=mmap and zipped, weights_only=weights_only)


def iter_tensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor, Path]]:
    for f in files:
        if f.suffix == ".safetensors":
            with open_safetensors(f) as st:
                for name in st.keys():
                    with reading(f, "safetensors"):
                        t = st.get_tensor(name)
                    yield name, t, f
        else:
            sd = load_torch_file(f)
            for name, t in sd.items():
                yield name, t, f
            del sd


def checkpoint_dtype(folder: Path, cfg: LlamaConfig) -> torch.dtype:
    if cfg.torch_dtype in DTYPES:
        return DTYPES[cfg.torch_dtype]
    for _, t, _ in iter_tensors(weight_files(folder)):
        if t.is_floating_point():
            return t.dtype
    return torch.float32


# -- building models ---------------------------------------------------------------------------------
def build_model(cfg: LlamaConfig, opts: PrecisionOptions | None = None, device: str | torch.device = "meta",
                dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    with torch.device(device):
        model = LlamaForCausalLM(cfg, opts)
    if device != "meta":
        model.to(dtype)
    return model


def random_model(cfg: LlamaConfig, dtype: torch.dtype | None = None, device="cpu",
                 opts: PrecisionOptions | None = None, seed: int | None = None) -> LlamaForCausalLM:
    """HF's random init in `dtype` (fp32 by default), built on the meta device and materialized one tensor
    at a time: the peak is the model in `dtype` plus one fp32 tensor (a 7B model in bf16 needs ~13.5 GB,
    not its 27 GB fp32 size). A seed gives the weights an eager fp32 build, init and cast gave."""
    if seed is not None:
        torch.manual_seed(seed)
    model = build_model(cfg, opts, device="meta")
    materialize_parameters(model, device, dtype or torch.float32)
    replay_default_init(model, device)
    init_weights(model)
    _materialize_buffers(model, device)
    return model


_LAYER = re.compile(r"model\.layers\.\d+\.")
# The CPU kernels stream each weight matrix with 32-byte vector loads, and a matrix that starts off a 64-byte
# boundary splits every other load across two cache lines. safetensors lays tensors out after a JSON header of
# any length (8-byte aligned): all of SmolLM2's start at 40 mod 64. Measured (2 threads, fp32 batch-1 decode):
# 38.6 tok/s read from the file's mapping, 45.4 from the same file with its header padded to 64 bytes, 46.0
# copied into ordinary memory. So a matrix read on CPU that is not 64-byte aligned is copied at load (its file
# pages released: still held once).
KERNEL_ALIGN = 64


def load_weights(model: LlamaForCausalLM, folder: Path, dtype: torch.dtype, device) -> None:
    """Assigns checkpoint tensors to a meta-device model, checking names and shapes."""
    expected = dict(model.state_dict(keep_vars=True))
    tied = model.config.tie_word_embeddings
    loaded: dict[str, torch.Tensor] = {}
    arenas: dict[str, HugePageArena] = {}
    cpu = torch.device(device).type == "cpu"
    for name, t, file in iter_tensors(weight_files(folder)):
        if name.endswith("rotary_emb.inv_freq"):
            continue  # old transformers wrote it; we compute it
        if name not in expected:
            if tied and name == "lm_head.weight":
                continue
            raise ValueError(f"{file}: unexpected tensor {name!r} for a Llama model")
        if tuple(t.shape) != tuple(expected[name].shape):
            raise ValueError(f"{file}: tensor {name!r} has shape {tuple(t.shape)}, expected "
                             f"{tuple(expected[name].shape)} from config.json")
        # parameters take the model's dtype; buffers (quantized codes and scales) load as stored
        param = isinstance(expected[name], torch.nn.Parameter)
        want = dtype if param else t.dtype
        if cpu and (want != t.dtype or (t.dim() == 2 and t.data_ptr() % KERNEL_ALIGN)):  # converted or realigned
            layer = _LAYER.match(name)
            # (quantized codes get tensors of their own: fusing q/k/v copies them, and the copies must go)
            if layer is None or t.dim() != 2 or not param:
                loaded[name] = empty_on_huge_pages(tuple(t.shape), want).copy_(t)
            else:  # one arena per decoder layer for its matrices (they convert alike; quantizing them frees it)
                if layer.group(0) not in arenas:
                    arenas[layer.group(0)] = HugePageArena({
                        n: p.numel() * dtype.itemsize for n, p in expected.items()
                        if n.startswith(layer.group(0)) and isinstance(p, torch.nn.Parameter) and p.dim() == 2})
                loaded[name] = arenas[layer.group(0)].tensor(name, tuple(t.shape), want).copy_(t)
        else:
            loaded[name] = t.to(device=device, dtype=want)
        if loaded[name] is not t:  # a converted copy: the file's pages of t need not stay resident
            release_pages([t])
    missing = [n for n in expected if n not in loaded and not (tied and n == "lm_head.weight")]
    if missing:
        raise ValueError(f"{folder}: checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")
    model.load_state_dict(loaded, strict=False, assign=True)
    if tied and isinstance(model.lm_head, torch.nn.Linear):  # (a quantized tied head serves the embedding)
        model.lm_head.weight = model.model.embed_tokens.weight


def _materialize_buffers(model: LlamaForCausalLM, device) -> None:
    from llamazoo.model.llama import rope_inv_freq

    model.register_buffer("inv_freq", rope_inv_freq(model.config).to(device), persistent=False)


def load_model(path_or_name: str | os.PathLike = "default", dtype: str | torch.dtype | None = None,
               device: str | torch.device = "cpu", opts: PrecisionOptions | None = None,
               seed: int | None = None) -> LlamaForCausalLM:
    """A HF folder (weights in the checkpoint's dtype unless `dtype`), or random init from a config.json
    or a named config (fp32 unless `dtype`), or "default" (the embedded SmolLM2-135M-Instruct)."""
    from llamazoo.io.default import resolve_checkpoint

    target = parse_dtype(dtype)
    path = resolve_checkpoint(path_or_name)
    folder = Path(path)
    if isinstance(path_or_name, str) and path_or_name in NAMED_CONFIGS or folder.is_file():
        return random_model(read_config(path), dtype=target, device=device, opts=opts, seed=seed)
    cfg = read_config(folder)
    files = weight_files(folder)  # fail on a missing shard before any work
    target = target or checkpoint_dtype(folder, cfg)
    model = build_model(cfg, opts, device="meta")
    if cfg.quantization_config:  # int8 / int4 layers (llamazoo.model.quantize), loaded without a float step
        from llamazoo.io.quantized import quantized_layer_specs
        from llamazoo.model.quantize import quantized_skeleton

        quantized_skeleton(model, quantized_layer_specs(files), target)
    load_weights(model, folder, target, device)
    _materialize_buffers(model, device)
    if cfg.quantization_config:
        from llamazoo.model.quantize import prepare_quantized

        prepare_quantized(model, release_pages)
    model.config.torch_dtype = dtype_name(target)
    del files
    return model.eval()


# -- saving ------------------------------------------------------------------------------------------
def _shards(sd: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in sd.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += n
    return shards


def generation_config(cfg: LlamaConfig) -> dict[str, Any]:
    return {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id,
            **({"pad_token_id": cfg.pad_token_id} if cfg.pad_token_id is not None else {}),
            "do_sample": False}


def save_state_dict_folder(sd: dict[str, torch.Tensor], cfg: LlamaConfig, out_dir: str | os.PathLike,
                           tokenizer=None, max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
                           extra_files: dict[str, str] | None = None) -> Path:
    """Writes a HF folder atomically (temporary sibling folder, then rename)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path_beside(out)
    tmp.mkdir()
    try:
        sd = {k: v.detach().contiguous().cpu() for k, v in sd.items()}
        # the float weights' dtype (not a quantized layer's scales: llamazoo.model.quantize)
        dtype = next(v.dtype for k, v in sd.items() if v.is_floating_point() and not k.endswith(("_scale", "_zero")))
        parts = []
        for i, shard in enumerate(_shards(sd, max_shard_size)):
            save_file(shard, str(tmp / f"part-{i:05d}.safetensors"), metadata={"format": "pt"})
            parts.append(list(shard))
        total = sum(v.numel() * v.element_size() for v in sd.values())
        _finish_folder(tmp, out, cfg, parts, total, dtype, tokenizer, extra_files)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def save_model(model: LlamaForCausalLM, out_dir: str | os.PathLike, tokenizer=None,
               max_shard_size: int = DEFAULT_MAX_SHARD_SIZE) -> Path:
    """A HF folder that `transformers.AutoModelForCausalLM.from_pretrained` loads."""
    sd = {k: v for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    return save_state_dict_folder(sd, model.config, out_dir, tokenizer=tokenizer, max_shard_size=max_shard_size)


# -- sharded models (tensor parallel / FSDP2): per-rank loading and gathered saving ---------------------
# A parallelized model holds DTensor parameters; each rank owns a block of every sharded tensor. Loading
# reads only that block from the safetensors files (`get_slice`, mmapped), and saving gathers one tensor
# at a time to rank 0, which writes shards of at most max_shard_size: no rank ever holds the whole model.
def _dist_rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _local_block(t: torch.Tensor) -> tuple[torch.Tensor, tuple[slice, ...]]:
    """(this rank's local tensor, its slices in the global tensor) for a DTensor or a plain tensor."""
    if not hasattr(t, "to_local"):
        return t, tuple(slice(0, n) for n in t.shape)
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    return t.to_local(), tuple(slice(o, o + n) for o, n in zip(offset, shape))


def load_sharded_weights(model: LlamaForCausalLM, folder: str | os.PathLike, device: str | torch.device) -> None:
    """Fills a parallelized meta-device model with this rank's blocks of a HF folder's tensors.

    The model's dtype is kept (cast it on meta before parallelizing). Safetensors files are read by
    slice; .bin files cannot be sliced, so each rank maps the whole file and copies its blocks.
    """
    folder = Path(folder)
    files = weight_files(folder)
    model.to_empty(device=device)
    targets = dict(model.state_dict(keep_vars=True))
    if model.config.tie_word_embeddings:
        targets.pop("lm_head.weight", None)
    seen: set[str] = set()

    @torch.no_grad()
    def fill(name: str, shape: tuple[int, ...], read, file: Path) -> None:
        if name.endswith("rotary_emb.inv_freq") or (name == "lm_head.weight" and name not in targets
                                                    and model.config.tie_word_embeddings):
            return
        if name not in targets:
            raise ValueError(f"{file}: unexpected tensor {name!r} for a Llama model")
        target = targets[name]
        if tuple(shape) != tuple(target.shape):
            raise ValueError(f"{file}: tensor {name!r} has shape {tuple(shape)}, expected {tuple(target.shape)} "
                             f"from config.json")
        local, index = _local_block(target)
        if local.numel():
            local.copy_(read(index))
        seen.add(name)

    def read_slice(sl, index, f: Path) -> torch.Tensor:
        with reading(f, "safetensors"):
            return sl[index]

    for f in files:
        if f.suffix == ".safetensors":
            with open_safetensors(f) as st:
                for name in st.keys():
                    with reading(f, "safetensors"):
                        sl = st.get_slice(name)
                        shape = tuple(sl.get_shape())
                    fill(name, shape, lambda index, sl=sl, f=f: read_slice(sl, index, f), f)
        else:
            sd = load_torch_file(f)
            for name, t in sd.items():
                fill(name, tuple(t.shape), lambda index, t=t: t[index], f)
            del sd
    missing = [n for n in targets if n not in seen]
    if missing:
        raise ValueError(f"{folder}: checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")
    _materialize_buffers(model, device)


def iter_full_tensors(model: LlamaForCausalLM) -> Iterator[tuple[str, torch.Tensor | None]]:
    """(name, whole tensor on CPU) on rank 0 and (name, None) elsewhere, one tensor at a time.

    Every rank must iterate to the end: gathering a DTensor is a collective.
    """
    rank = _dist_rank()
    tied = model.config.tie_word_embeddings
    for name, t in model.state_dict().items():
        if tied and name == "lm_head.weight":
            continue
        full = t.full_tensor() if hasattr(t, "full_tensor") else t
        yield name, (full.detach().contiguous().cpu() if rank == 0 else None)
        del full


def save_sharded_model(model: LlamaForCausalLM, out_dir: str | os.PathLike, tokenizer=None,
                       max_shard_size: int = DEFAULT_MAX_SHARD_SIZE, dtype: torch.dtype | None = None) -> Path:
    """A HF folder from a (possibly) sharded model, written by rank 0; call it on every rank. dtype: the
    floating-point tensors are written in it (FSDP2 mixed precision keeps fp32 shards of a bf16 run).

    Like `save_model`, the folder appears atomically; rank 0 holds at most one safetensors shard
    (max_shard_size bytes) at a time. Returns the folder once it exists (all ranks synchronize).
    """
    import torch.distributed as dist
    from safetensors.torch import save_file

    rank = _dist_rank()
    out = Path(out_dir)
    tmp: Path | None = None
    error: BaseException | None = None
    if rank == 0:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_path_beside(out)
        tmp.mkdir()
    try:
        shard: dict[str, torch.Tensor] = {}
        files: list[list[str]] = []
        size = total = 0
        written = None

        def flush() -> None:
            nonlocal shard, size
            if shard:
                save_file(shard, str(tmp / f"part-{len(files):05d}.safetensors"), metadata={"format": "pt"})
                files.append(list(shard))
                shard, size = {}, 0

        for name, full in iter_full_tensors(model):
            if rank != 0 or error is not None:
                continue
            try:
                if dtype is not None and full.is_floating_point():
                    full = full.to(dtype)
                n = full.numel() * full.element_size()
                if shard and size + n > max_shard_size:
                    flush()
                shard[name] = full
                size += n
                total += n
                if written is None and full.is_floating_point():
                    written = full.dtype
            except BaseException as e:  # keep gathering with the other ranks, raise at the end
                error = e
        if rank == 0 and error is None:
            flush()
            _finish_folder(tmp, out, model.config, files, total, written or torch.float32, tokenizer)
    except BaseException as e:
        error = error or e
    if rank == 0 and error is not None and tmp is not None:
        shutil.rmtree(tmp, ignore_errors=True)
    if dist.is_available() and dist.is_initialized():
        ok = [error is None]
        dist.broadcast_object_list(ok, src=0)
        if rank != 0 and not ok[0]:
            raise RuntimeError(f"rank 0 failed to write {out}")
    if error is not None:
        raise error
    return out


def _finish_folder(tmp: Path, out: Path, cfg: LlamaConfig, parts: list[list[str]], total: int,
                   dtype: torch.dtype, tokenizer, extra_files: dict[str, str] | None = None) -> None:
    """Names the weight parts (part-0000i.safetensors, holding the tensors named in parts[i]) as HF does
    (one model.safetensors, or model-0000i-of-0000n + an index), writes config, generation config,
    tokenizer and extra files, and moves the folder into place."""
    n = len(parts)
    weight_map = {}
    for i, names in enumerate(parts, 1):
        final = "model.safetensors" if n == 1 else f"model-{i:05d}-of-{n:05d}.safetensors"
        (tmp / f"part-{i - 1:05d}.safetensors").rename(tmp / final)
        weight_map.update({k: final for k in names})
    if n > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    hf_cfg = cfg.to_hf()
    hf_cfg["torch_dtype"] = dtype_name(dtype)
    (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")
    (tmp / "generation_config.json").write_text(json.dumps(generation_config(cfg), indent=2) + "\n")
    if tokenizer is not None:
        if isinstance(tokenizer, (str, os.PathLike)):
            from llamazoo.io.tokenizer import load_tokenizer

            tokenizer = load_tokenizer(tokenizer)
        tokenizer.save(tmp)
    for name, text in (extra_files or {}).items():
        (tmp / name).write_text(text)
    replace_path(tmp, out)
