"""Reproductions and studies behind the CLI subcommands.

Each module exposes one ``click`` command; :func:`commands` lists them for :mod:`setsens.cli`.
To add a subcommand, add its module name to ``_MODULES``.
"""

from __future__ import annotations

import importlib

_MODULES = ["toy", "demo", "weights", "resnet", "landscape", "lipschitz"]


def commands():
    out = []
    for name in _MODULES:
        module = importlib.import_module(f"{__name__}.{name}")
        out.append(module.command)
    return out
