"""Reproductions and studies behind the CLI subcommands.

Each module in ``NAMES`` exposes one ``click`` command named like the module; :mod:`setsens.cli`
imports a module only when its subcommand runs.  To add a subcommand, add its module name to
``NAMES``.  :mod:`.options` (option checks), :mod:`.state` (resumable runs) and :mod:`.bars` (the one
renderer of the library's progress) serve them all.
"""

from __future__ import annotations

import importlib

NAMES = ("analyze", "audit", "toy", "demo", "weights", "resnet", "landscape", "lipschitz")


def command(name: str):
    """The click command of subcommand ``name`` (None if there is none)."""
    if name not in NAMES:
        return None
    return importlib.import_module(f"{__name__}.{name}").command
