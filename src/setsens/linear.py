"""The one linear-operator protocol of setsens: every matrix-free operator composes with ``@`` and ``.T``.

In the style of curvlinops: an operator ``A`` (m × n) defines ``matvec`` (``A v``) and, unless it is
symmetric, ``rmatvec`` (``Aᵀ u``); :class:`LinearOperator` turns them into ``A @ v``, ``A(v)``,
``A.T @ u`` (``A.T`` is a view, itself an operator, whose ``@`` calls ``rmatvec``; ``A.T.T`` is
``A``), :meth:`~LinearOperator.flattened` (the same operator on flat vectors, for the Krylov methods
that take inner products with ``@``) and :meth:`~LinearOperator.to_scipy`.  The operators of
:mod:`setsens.operators` (``Hessian``, ``GaussNewtonMatrix``, ``Damped``, ``DataJacobian``),
:class:`~setsens.function_space.OutputJacobian` and :class:`~setsens.audit.GramFactor` all derive from
it; ``tests/core/test_linear_protocol.py`` holds every one of them to ``⟨A v, u⟩ = ⟨v, Aᵀ u⟩``.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse.linalg as spla
import torch
from torch import Tensor

__all__ = ["LinearOperator"]


class LinearOperator:
    """A matrix-free linear operator ``A`` of ``shape`` (m, n) at the weights ``w`` of a problem.

    A subclass sets ``shape`` and defines ``matvec(v)`` (``A v``) and ``rmatvec(u)`` (``Aᵀ u``), or
    sets ``symmetric = True`` and defines ``matvec`` only (``rmatvec`` is then ``matvec`` and ``A.T``
    is ``A`` itself).  What every operator then has:

    * ``A @ v`` and ``A(v)``: ``matvec``; ``A.T @ u``: ``rmatvec`` (``A.T`` is a transposed view,
      shape (n, m), whose ``.T`` is ``A``);
    * ``calls``: products done, each ``matvec`` or ``rmatvec`` one (counted by the subclass: one pass
      over the data for the derivative operators, one dense product for ``GramFactor``);
    * ``dtype`` and ``device``: those of ``w`` (the weights the operator is taken at), in which it
      returns its products; inputs are cast to them;
    * :meth:`flattened` and :meth:`to_scipy`: the operator on flat vectors.

    Shapes: ``matvec`` and ``rmatvec`` accept their input flat (``numel`` n, resp. m) or in the
    operator's natural shape, and return the natural shape — a length-p vector in weight space,
    (rows, K) output vectors for ``OutputJacobian`` (rows: the training points held here), (|K|,
    *input_shape) point moves for ``DataJacobian``.  ``GramFactor`` also takes a leading batch
    dimension of several vectors at once.

    Centring over the classes belongs to the operator, not to its callers: an operator whose loss
    ignores a common shift of the outputs (``OutputJacobian(centered=True)``, ``GramFactor`` when
    ``problem.loss_ignores_output_shift``) *is* the centred map ``P G`` (``P = I − 𝟙𝟙ᵀ/K`` on each
    row), applies ``P`` inside both ``matvec`` and ``rmatvec`` and so stays its own exact adjoint pair;
    callers pass uncentred vectors and need not centre what it returns.  (The preconditioners of
    :mod:`setsens.preconditioners` centre their own output by reading ``G.centered``.)

    Products on a sharded problem are all-reduced by the subclass (``problem.reduce``); the inner
    product ``⟨A v, u⟩ = ⟨v, Aᵀ u⟩`` then holds with the all-reduced sum over the rows.
    """

    shape: tuple[int, int]
    symmetric: bool = False
    calls: int = 0

    def matvec(self, v: Tensor) -> Tensor:
        raise NotImplementedError

    def rmatvec(self, u: Tensor) -> Tensor:
        if self.symmetric:
            return self.matvec(u)
        raise NotImplementedError(f"{type(self).__name__} has no adjoint product")

    def __matmul__(self, v: Tensor) -> Tensor:
        return self.matvec(v)

    def __call__(self, v: Tensor) -> Tensor:
        return self.matvec(v)

    @property
    def T(self) -> LinearOperator:
        """``Aᵀ``: ``A`` itself if symmetric, else a view whose products are ``A``'s ``rmatvec``."""
        return self if self.symmetric else _Transposed(self)

    @property
    def dtype(self) -> torch.dtype:
        return self.w.dtype

    @property
    def device(self) -> torch.device:
        return self.w.device

    def flattened(self) -> LinearOperator:
        """The same operator on flat vectors: both products return ``.reshape(-1)`` of ``A``'s."""
        return self if self.symmetric else _Flattened(self)

    def to_scipy(self) -> spla.LinearOperator:
        """A SciPy ``LinearOperator`` (float64 NumPy vectors in and out) for SciPy's Krylov solvers."""
        return spla.LinearOperator(tuple(self.shape), matvec=_numpy(self.matvec), rmatvec=_numpy(self.rmatvec),
                                   dtype=np.float64)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.shape[0]}×{self.shape[1]}>"


class _View(LinearOperator):
    """An operator defined by another one (``op``): its calls, dtype and device."""

    def __init__(self, op: LinearOperator):
        self.op = op

    @property
    def calls(self) -> int:
        return self.op.calls

    @property
    def dtype(self) -> torch.dtype:
        return self.op.dtype

    @property
    def device(self) -> torch.device:
        return self.op.device


class _Transposed(_View):
    """``Aᵀ``: ``@`` is ``A.rmatvec``, ``.T`` is ``A``."""

    @property
    def shape(self) -> tuple[int, int]:
        return self.op.shape[1], self.op.shape[0]

    def matvec(self, u: Tensor) -> Tensor:
        return self.op.rmatvec(u)

    def rmatvec(self, v: Tensor) -> Tensor:
        return self.op.matvec(v)

    @property
    def T(self) -> LinearOperator:
        return self.op


class _Flattened(_View):
    """``A`` on flat vectors."""

    @property
    def shape(self) -> tuple[int, int]:
        return self.op.shape

    def matvec(self, v: Tensor) -> Tensor:
        return self.op.matvec(v).reshape(-1)

    def rmatvec(self, u: Tensor) -> Tensor:
        return self.op.rmatvec(u).reshape(-1)

    def flattened(self) -> LinearOperator:
        return self


def _numpy(product):
    def apply(v: np.ndarray) -> np.ndarray:
        out = product(torch.from_numpy(np.ascontiguousarray(v).reshape(-1)))
        return out.detach().cpu().double().numpy().reshape(-1)

    return apply
