"""The plain full-batch training loop the studies share (Adam on a loss closure)."""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import Tensor

__all__ = ["adam_steps"]


def adam_steps(params: Iterable[Tensor], loss: Callable[[], Tensor], steps: int, lr: float = 1e-2,
               progress: Callable | None = None) -> None:
    """``steps`` Adam steps on ``loss()`` (recomputed each step); ``progress`` wraps the steps (tqdm).

    >>> w = torch.zeros(2, requires_grad=True)
    >>> adam_steps([w], lambda: ((w - 1) ** 2).sum(), 300, lr=0.1)
    >>> torch.allclose(w, torch.ones(2), atol=1e-2)
    True
    """
    opt = torch.optim.Adam(params, lr=lr)
    for _ in range(steps) if progress is None else progress(range(steps)):
        opt.zero_grad()
        loss().backward()
        opt.step()
