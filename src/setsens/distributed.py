"""Data-parallel operators with ``torch.distributed``: every rank holds a shard of the training set.

Each rank builds an ordinary :class:`~setsens.problem.Problem` on its shard (contiguous rows
``[offset, offset + n_local)`` of the global data, see :func:`shard`).  The wrappers here compute
the local contribution and all-reduce it, so every rank obtains the *global* ``H v``, ``J μ``,
``Jᵀ y``, risk and gradient — bit-identical on all ranks — and any solver run on every rank
(:func:`setsens.preconditioners.minres`, SciPy's Krylov methods) follows the same iterates.
Communication per product: one all-reduce of p numbers.

The Gauss–Newton estimate (:mod:`setsens.function_space`) runs the same way: each rank keeps the
output rows of its own points, ``Gᵀ u`` is all-reduced and so are the inner products of output
vectors (:class:`DistributedOutputJacobian`, :func:`distributed_function_space_shift`).

Launch with ``torchrun --nproc_per_node=N script.py`` (gloo on CPU, NCCL on GPU; see
``docs/distributed.md``).  Scaling: the factor of the global risk, ``1/n_total`` for a mean, is
applied here, whatever the shard problem's own ``reduction``.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import Tensor

from .function_space import OutputJacobian, cgls, output_shift
from .operators import Adjoint, DataJacobian, Hessian
from .problem import Perturbation, Problem

__all__ = ["init_from_env", "shard", "DistributedProblem", "DistributedHessian", "DistributedDataJacobian",
           "DistributedOutputJacobian", "distributed_function_space_shift"]


def init_from_env(backend: str | None = None) -> tuple[int, int]:
    """Initialise the default process group from torchrun's environment; returns ``(rank, world)``.

    ``backend`` defaults to NCCL when CUDA is available, gloo otherwise.  Without torchrun's
    variables (a single process) nothing is initialised and ``(0, 1)`` is returned.
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return 0, 1
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    dist.init_process_group(backend)
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return dist.get_rank(), dist.get_world_size()


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


def _all_reduce(t: Tensor) -> Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


class DistributedProblem:
    """The global risk over all shards, seen from one rank.

    Args:
        local: this rank's :class:`Problem` on rows ``offset … offset + local.n − 1``.
        offset: global index of the first local row.
        n_total: global number of training points (all-reduced when ``None``).
        reduction: of the global risk, ``"mean"`` (``1/n_total``) or ``"sum"``.
    """

    def __init__(self, local: Problem, offset: int, n_total: int | None = None, reduction: str = "mean"):
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        self.local, self.offset = local, int(offset)
        if n_total is None:
            n_total = int(_all_reduce(torch.tensor([local.n], dtype=torch.int64, device=local.device)).item())
        self.n = int(n_total)
        self.p = local.p
        self.params = local.params
        self.reduction = reduction
        # global weight ÷ the local problem's own weight
        self.factor = (1.0 / self.n if reduction == "mean" else 1.0) / local.weight

    def localize(self, perturbation: Perturbation | None) -> Perturbation | None:
        """The part of a (globally indexed) perturbation that lies in this shard, locally indexed."""
        if perturbation is None:
            return None
        idx = perturbation.indices
        inside = (idx >= self.offset) & (idx < self.offset + self.local.n)
        if not inside.any():
            return None
        return Perturbation(idx[inside] - self.offset, perturbation.delta[inside])

    def risk(self, w: Tensor | None = None, perturbation: Perturbation | None = None) -> float:
        r = torch.tensor([self.local.risk(w, self.localize(perturbation)) * self.factor], dtype=torch.float64,
                         device=self.local.device)
        return float(_all_reduce(r))

    def gradient(self, w: Tensor | None = None, perturbation: Perturbation | None = None) -> Tensor:
        return _all_reduce(self.local.gradient(w, self.localize(perturbation)) * self.factor)


class DistributedHessian:
    """Global ``H v``: the local shard's product, rescaled, all-reduced (``calls`` counts products)."""

    def __init__(self, problem: DistributedProblem, w: Tensor | None = None, perturbation: Perturbation | None = None,
                 fast: bool = True):
        from .preconditioners import FastHessian

        cls = FastHessian if fast else Hessian
        self.problem = problem
        self.inner = cls(problem.local, w, problem.localize(perturbation))
        self.shape = (problem.p, problem.p)
        self.calls = 0

    def __call__(self, v: Tensor) -> Tensor:
        out = self.inner(v) * self.problem.factor
        self.calls += 1
        return _all_reduce(out)

    def to_scipy(self):
        from .operators import _scipy_operator

        return _scipy_operator(self, self.problem.p)


class DistributedDataJacobian:
    """Global ``J`` on the (globally indexed) points ``indices``; each rank handles its own points.

    ``J @ μ`` takes μ for all |K| points (same on every rank); ``J.T @ y`` returns all |K| rows.
    ``scale="exact"`` uses the global risk's factor, ``"paper"`` uses ``1/|K|``.
    """

    def __init__(self, problem: DistributedProblem, indices, w: Tensor | None = None, scale: str = "exact"):
        self.problem = problem
        self.indices = torch.as_tensor(indices).long().reshape(-1)
        if ((self.indices < 0) | (self.indices >= problem.n)).any():
            raise IndexError(f"indices out of range [0, {problem.n})")
        loc = problem.local
        self.mask = (self.indices >= problem.offset) & (self.indices < problem.offset + loc.n)
        self.inner = DataJacobian(loc, self.indices[self.mask] - problem.offset, w, "exact") if self.mask.any() else None
        k = self.indices.numel()
        # the inner Jacobian uses the local weight; rescale to the global one (or 1/|K|)
        target = 1.0 / k if scale == "paper" else (1.0 / problem.n if problem.reduction == "mean" else 1.0)
        self.rescale = target / loc.weight
        self.input_shape = loc.input_shape
        self.shape = (problem.p, k * int(torch.tensor(self.input_shape).prod()))
        self.w = problem.params if w is None else w

    def matvec(self, mu: Tensor) -> Tensor:
        mu = mu.reshape(self.indices.numel(), *self.input_shape)
        out = torch.zeros_like(self.w)
        if self.inner is not None:
            out += self.inner.matvec(mu[self.mask]) * self.rescale
        return _all_reduce(out)

    def rmatvec(self, y: Tensor) -> Tensor:
        out = torch.zeros(self.indices.numel(), *self.input_shape, dtype=self.w.dtype, device=self.w.device)
        if self.inner is not None:
            out[self.mask] = self.inner.rmatvec(y) * self.rescale
        return _all_reduce(out)

    def __matmul__(self, mu: Tensor) -> Tensor:
        return self.matvec(mu)

    @property
    def T(self) -> Adjoint:
        return Adjoint(self)


class DistributedOutputJacobian:
    """Global ``G = ∂f/∂w`` with its rows on the ranks that own the points.

    ``G @ v`` returns this rank's rows (n_local, K); ``G.T @ u`` takes this rank's rows and returns
    the global length-p vector (all-reduced); :meth:`dot` is the global inner product of two
    row-sharded output vectors.  Communication per CGLS iteration: one all-reduce of p numbers and
    two of one number.
    """

    def __init__(self, problem: DistributedProblem, w: Tensor | None = None, centered: bool = False):
        self.problem = problem
        self.inner = OutputJacobian(problem.local, w, centered)

    def matvec(self, v: Tensor) -> Tensor:
        return self.inner.matvec(v)

    def rmatvec(self, u: Tensor) -> Tensor:
        return _all_reduce(self.inner.rmatvec(u))

    def dot(self, a: Tensor, b: Tensor) -> float:
        return float(_all_reduce((a * b).sum().reshape(1).double()))

    def __matmul__(self, v: Tensor) -> Tensor:
        return self.matvec(v)

    @property
    def T(self) -> Adjoint:
        return Adjoint(self)

    def output_shift(self, perturbation: Perturbation) -> Tensor:
        """This rank's rows of r (zeros where none of its points moved)."""
        local = self.problem.localize(perturbation)
        if local is not None:
            return output_shift(self.problem.local, local, self.inner.w, self.inner.centered)
        x, _ = next(self.problem.local.batches())
        k = self.problem.local.outputs(self.inner.w, x[:1]).shape[-1]
        return torch.zeros(self.problem.local.n, k, dtype=self.inner.w.dtype, device=self.inner.w.device)


def distributed_function_space_shift(problem: DistributedProblem, perturbation: Perturbation, *, maxiter: int = 50,
                                     rtol: float = 1e-6, centered: bool | None = None, scale: float = 1.0, callback=None):
    """:func:`setsens.function_space.function_space_shift` over all shards; the same v on every rank."""
    if centered is None:
        centered = problem.local.loss_ignores_output_shift
    G = DistributedOutputJacobian(problem, centered=centered)
    r = G.output_shift(perturbation) * scale
    res = cgls(G.matvec, G.rmatvec, -r, maxiter=maxiter, rtol=rtol, callback=callback, dot=G.dot)
    return res.x.to(problem.params), res
