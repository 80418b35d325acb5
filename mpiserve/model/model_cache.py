"""Checkpoints generated on this machine (demo and benchmark models) live in one cache.

Many processes (MPI ranks) may race to build the same entry: each builds in its own staging
directory and renames it into place; the losers discard theirs.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path


def cache_root() -> Path:
    """$MPISERVE_CACHE, else $XDG_CACHE_HOME/mpiserve, else ~/.cache/mpiserve."""
    if os.environ.get("MPISERVE_CACHE"):
        return Path(os.environ["MPISERVE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mpiserve"


def cached_checkpoint(name: str, write: Callable[[Path], None]) -> Path:
    """The cache directory `name`, written by `write(directory)` the first time it is needed."""
    target = cache_root() / name
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
    staging.mkdir()
    try:
        write(staging)
        os.rename(staging, target)
    except OSError:
        if not target.is_dir():          # a real failure, not another process winning the race
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
