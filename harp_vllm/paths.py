"""Where models are cached and where local evaluation data lives (both overridable)."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "HARP_VLLM_CACHE"
DATA_ENV = "HARP_VLLM_DATA_DIR"


def cache_dir() -> Path:
    """Model cache root: ``$HARP_VLLM_CACHE`` or ``~/.cache/harp-vllm`` (outside the repo)."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "harp-vllm"


def data_dir() -> Path:
    """Local copy of the evaluation data: ``$HARP_VLLM_DATA_DIR`` or the shared folder.

    The default is the first ``shared/data`` found beside the working directory or the
    source tree (the layout of this project's machines: ``<work>/shared/data``).
    """
    env = os.environ.get(DATA_ENV)
    if env:
        return Path(env).expanduser()
    here = Path(__file__).resolve()
    for base in [Path.cwd(), *Path.cwd().parents, *here.parents]:
        cand = base / "shared" / "data"
        if cand.is_dir():
            return cand
    return Path.cwd().parent / "shared" / "data"
