"""The plain full-batch training loop the studies share (Adam on a loss closure)."""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import Tensor

from .progress import ProgressFn, counted

__all__ = ["adam_steps"]


def adam_steps(params: Iterable[Tensor], loss: Callable[[], Tensor], steps: int, lr: float = 1e-2,
               progress: ProgressFn | None = None) -> None:
    """``steps`` Adam steps on ``loss()`` (recomputed each step); ``progress``: ``Progress("adam", t, steps)`` after
    each step.

    >>> w = torch.zeros(2, requires_grad=True)
    >>> adam_steps([w], lambda: ((w - 1) ** 2).sum(), 300, lr=0.1)
    >>> torch.allclose(w, torch.ones(2), atol=1e-2)
    True
    """
    opt = torch.optim.Adam(params, lr=lr)
    for _ in counted(progress, range(steps), "adam"):
        opt.zero_grad()
        loss().backward()
        opt.step()
