"""Atomic files: written to a temporary sibling and renamed into place, so an interrupted run never leaves a
half-written result or checkpoint behind.  Below every other module (solvers checkpoint through it; the
reports at the edge write through it)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

__all__ = ["atomic_write", "atomic_torch_save"]


def atomic_write(path, write) -> Path:
    """Call ``write(file)`` on a temporary sibling of ``path``, then rename it into place."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_torch_save(obj, path) -> Path:
    """``torch.save`` through a temporary sibling and a rename (solver checkpoints, cached results)."""
    return atomic_write(Path(path), lambda fh: torch.save(obj, fh))
