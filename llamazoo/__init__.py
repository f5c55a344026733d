"""llamazoo: an open, PyTorch-native model zoo for the Llama family."""
from __future__ import annotations

__version__ = "0.1.0"


def load_model(path_or_name="default", dtype=None, device="cpu", **kwargs):
    """A HF checkpoint folder, a config.json, a named config (random init) or "default"."""
    from llamazoo.io.hf import load_model as _load

    return _load(path_or_name, dtype=dtype, device=device, **kwargs)


def load_tokenizer(path_or_name="default"):
    from llamazoo.io.tokenizer import load_tokenizer as _load

    return _load(path_or_name)


def save_model(model, out_dir, tokenizer=None, **kwargs):
    from llamazoo.io.hf import save_model as _save

    return _save(model, out_dir, tokenizer=tokenizer, **kwargs)


__all__ = ["load_model", "load_tokenizer", "save_model", "__version__"]
