"""Headline figures over seeds: parse ``--seeds`` and summarise a figure as a distribution."""

from __future__ import annotations

import statistics

import click


def parse_seeds(text: str, hint: str = "--seeds") -> list[int]:
    """``"0,1,2"`` → ``[0, 1, 2]`` (a click error on anything else)."""
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {text!r}", param_hint=hint) from None
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise click.BadParameter("give one or more distinct non-negative seeds", param_hint=hint)
    return seeds


def distribution(values: list[float]) -> dict:
    """``{median, min, max, per_seed}`` of one headline figure over seeds."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "per_seed": list(values)}
