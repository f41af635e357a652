"""Resumable runs: what a killed run leaves under ``OUT/state/<settings key>/`` for the next one.

A long step caches its results one piece at a time (a solve, an epoch, a retraining), each file
written atomically, in a directory named by a hash of the settings those results depend on: a
rerun into the same ``--out`` with the same settings picks up where the killed run stopped, one
with other settings starts afresh beside it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, is_dataclass
from pathlib import Path

import torch

from ..report import atomic_torch_save

__all__ = ["settings_key", "RunState"]


def settings_key(settings, ignore=()) -> str:
    """A short hash of ``settings`` (a dataclass or a dict) without the fields in ``ignore`` (those
    that do not change a cached result: threads, what is drawn, …)."""
    fields = asdict(settings) if is_dataclass(settings) else dict(settings)
    relevant = {k: v for k, v in fields.items() if k not in ignore}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[:12]


class RunState:
    """The cache directory ``out/state/<settings_key(settings, ignore)>``; ``load``/``save`` by name."""

    def __init__(self, out, settings, ignore=()):
        self.dir = Path(out) / "state" / settings_key(settings, ignore)
        self.dir.mkdir(parents=True, exist_ok=True)

    def path(self, name: str) -> Path:
        return self.dir / f"{name}.pt"

    def load(self, name: str, default=None):
        """The object saved under ``name``, or ``default`` when there is none yet."""
        path = self.path(name)
        return torch.load(path, weights_only=False) if path.exists() else default

    def save(self, name: str, obj) -> Path:
        return atomic_torch_save(obj, self.path(name))
