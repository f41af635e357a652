"""Data-parallel estimates with ``torch.distributed``: every rank holds a shard of the training set.

A :class:`DistributedProblem` is a :class:`~setsens.problem.Problem` over the rows
``[offset, offset + n_local)`` of the global data (:func:`shard`) whose sums over the data are
all-reduced (:meth:`DistributedProblem.reduce`).  Every operator (H v, J μ, Jᵀ y, G v, Gᵀ u), the
risk, the gradient and therefore ``setsens.estimate`` itself run on it unchanged, and every rank
obtains the same global numbers and follows the same Krylov iterates.  Indices are global; the
output vectors of the Gauss–Newton form stay on the rank that owns the rows, and their inner
products are all-reduced.  Communication per product: one all-reduce of p numbers (plus two of one
number per CGLS iteration).

Launch with ``torchrun --nproc_per_node=N script.py`` (gloo on CPU, NCCL on GPU; see
``docs/distributed.md``).
"""

from __future__ import annotations

import gc
import os
import sys

import torch
import torch.distributed as dist
from torch import Tensor

from .problem import Problem

__all__ = ["init_from_env", "world", "shard", "DistributedProblem", "shutdown"]


def init_from_env(backend: str | None = None) -> tuple[int, int]:
    """Initialise the default process group from torchrun's environment; returns ``(rank, world)``.

    ``backend`` defaults to NCCL when CUDA is available, gloo otherwise.  Without torchrun's
    variables (a single process) nothing is initialised and ``(0, 1)`` is returned.
    """
    if dist.is_available() and dist.is_initialized() or "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return world()
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    dist.init_process_group(backend)
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return dist.get_rank(), dist.get_world_size()


def world() -> tuple[int, int]:
    """``(rank, world size)`` of the default process group; ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard(n: int, rank: int, world: int) -> slice:
    """Contiguous, balanced rows of ``n`` for ``rank`` of ``world`` (first ranks get the extras).

    >>> [shard(10, r, 3) for r in range(3)]
    [slice(0, 4, None), slice(4, 7, None), slice(7, 10, None)]
    """
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} outside [0, {world})")
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (rank < extra))


class DistributedProblem(Problem):
    """The global risk over all shards, seen from one rank: a :class:`Problem` that holds rows
    ``offset … offset + n_local − 1`` of ``n_total`` and all-reduces its sums.

    Args:
        model, loss, data: as for :class:`Problem`, ``data`` being this rank's rows.
        offset: global index of the first local row.
        n_total: global number of training points (all-reduced when ``None``).
        problem_options: the other :class:`Problem` arguments (``batch_size``, ``reduction``, …);
            ``reduction="mean"`` divides by ``n_total``.
    """

    def __init__(self, model, loss, data, *, offset: int, n_total: int | None = None, **problem_options):
        super().__init__(model, loss, data, **problem_options)
        self.rows = range(int(offset), int(offset) + self.n)
        self.n = int(self.reduce(torch.tensor([self.n], device=self.device)) if n_total is None else n_total)

    def reduce(self, total):
        """The sum over all ranks of ``total`` (a tensor, summed in place, or a float)."""
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return total
        if isinstance(total, Tensor):
            total = total.contiguous()
            dist.all_reduce(total, op=dist.ReduceOp.SUM)
            return total
        t = torch.tensor([float(total)], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return float(t)


def shutdown(exit_process: bool = True) -> None:
    """End a data-parallel run in the order that avoids an abort at exit.

    Drop your references to every problem, operator and ``SolutionSet`` first (their caches hold
    autograd graphs).  Then this collects them, waits for every rank, destroys the process group and,
    with ``exit_process``, leaves by ``os._exit(0)`` after flushing stdout and stderr: at interpreter
    exit gloo's and autograd's threads can race ("terminate called without an active exception").
    """
    gc.collect()
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    if exit_process:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
