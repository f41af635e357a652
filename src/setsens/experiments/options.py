"""Checks of command-line options shared by the subcommands.

They run before any work starts, and every mistake reaches the user as a one-line click error
that names the option (exit status 2, no traceback).
"""

from __future__ import annotations

import math
from pathlib import Path

import click

__all__ = ["first_line", "number_list", "npz_lengths"]


def first_line(err: BaseException) -> str:
    """The first line of an error's message (``""`` when it has none)."""
    return (str(err).strip().splitlines() or [""])[0]


def number_list(text: str, hint: str, cast=float, minimum: float | None = None, open_min: bool = False) -> tuple:
    """``"1e-4,1e-3"`` → ``(1e-4, 1e-3)``: finite numbers, each ≥ ``minimum`` (> with ``open_min``)."""
    try:
        values = tuple(cast(v) for v in str(text).split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"expected a comma-separated list of numbers, got {text!r}", param_hint=hint) from None
    if not values:
        raise click.BadParameter("must not be empty", param_hint=hint)
    for v in values:
        if not math.isfinite(v):
            raise click.BadParameter(f"{v} is not a finite number", param_hint=hint)
        if minimum is not None and (v < minimum or (open_min and v == minimum)):
            relation = ">" if open_min else "≥"
            raise click.BadParameter(f"every value must be {relation} {minimum:g}, got {v:g}", param_hint=hint)
    return values


def npz_lengths(path, arrays: tuple[str, ...], hint: str) -> dict[str, int]:
    """The length of each of ``arrays`` in the ``.npz`` at ``path``; a click error if the file is
    missing, is no ``.npz`` or lacks one of them."""
    import numpy as np

    if not Path(path).is_file():
        raise click.BadParameter(f"file not found: {path}", param_hint=hint)
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [a for a in arrays if a not in z.files]
            if missing:
                raise click.BadParameter(f"{path} lacks the arrays {missing}", param_hint=hint)
            return {a: len(z[a]) for a in arrays}
    except click.BadParameter:
        raise
    except Exception as err:
        raise click.BadParameter(f"{path} is not an .npz archive ({type(err).__name__}: {first_line(err)})",
                                 param_hint=hint) from None
