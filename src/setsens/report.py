"""I/O at the edge: atomic writes of JSON, Markdown and figures into a run directory.

Every file is written to a temporary sibling and renamed into place, so an interrupted run
never leaves a half-written result behind.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import torch

from .atomic import atomic_torch_save, atomic_write

__all__ = ["prepare_out_dir", "write_text", "write_json", "save_figure", "to_jsonable", "atomic_torch_save"]


def prepare_out_dir(out: str | os.PathLike) -> Path:
    """Create ``out`` (its parent must exist, so a typo does not scatter directories)."""
    out = Path(out)
    parent = out.resolve().parent
    if not parent.is_dir():
        raise FileNotFoundError(f"the parent directory of the output '{out}' does not exist: {parent}")
    out.mkdir(exist_ok=True)
    return out


def write_text(path, text: str) -> Path:
    return atomic_write(Path(path), lambda fh: fh.write(text.encode()))


def to_jsonable(obj):
    """Tensors, arrays and NumPy scalars → plain Python; non-finite floats → None."""
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return to_jsonable(obj.detach().cpu().tolist())
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return to_jsonable(obj.item())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_json(path, data) -> Path:
    return write_text(path, json.dumps(to_jsonable(data), indent=2) + "\n")


def save_figure(fig, path, dpi: int = 130) -> Path:
    """Save a matplotlib figure as PNG atomically and close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    atomic_write(path, lambda fh: fig.savefig(fh, format="png", dpi=dpi, bbox_inches="tight"))
    plt.close(fig)
    return path
