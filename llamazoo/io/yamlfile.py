"""Reading a YAML file that must hold a mapping (configs, dataset metadata), with errors naming the file."""
from __future__ import annotations

from pathlib import Path
from typing import Any


def read_yaml_mapping(path: Path, expected: str = "a mapping") -> dict[str, Any]:
    """The file's top-level mapping ({} for an empty file); ValueError naming the file otherwise."""
    import yaml

    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected {expected}")
    return data
