"""Where llamazoo keeps what it builds or fetches for later runs (every layer may use it)."""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """$LLAMAZOO_CACHE, else $XDG_CACHE_HOME/llamazoo, else ~/.cache/llamazoo."""
    env = os.environ.get("LLAMAZOO_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "llamazoo"
