"""Matrix-free derivatives of the optimality map ``R(x, w) = ∇_w L(x, w)`` at ``(x̄, w̄)``.

* ``H v``  — Hessian of the risk times a vector, one pass over the data: about 2 gradient costs
  through each batch's kept gradient graph, 2–8 recomputed (by the autodiff composition, ``mode``).
* ``J μ``  — ``∇_x R · μ`` for ``μ`` supported on the perturbed points K: one forward-mode
  derivative of ``∇_w ℓ`` along the data, over the |K| points only.
* ``Jᵀ y`` — the adjoint: for each point in K, ``∇_{x_i} ⟨∇_w ℓ_i, y⟩``.

None of them forms a p×p or p×nd matrix; each sums over the rows its problem holds and hands the
sum to ``problem.reduce`` (all-reduced on a sharded problem).  ``dense_hessian`` /
``dense_data_jacobian`` build the matrices with ``torch.func.hessian`` / ``jacfwd`` for small
problems; tests use them as references.

Scaling of J: ``"exact"`` uses the factor of the risk itself (``1/n`` for a mean risk), which is
the true derivative of ``∇_w L``; ``"paper"`` uses ``1/|K|`` as printed in the paper's eqs. (14),
(17).  With ``"paper"`` the shift is ``n/|K|`` times the exact first-order shift.
"""

from __future__ import annotations

import gc
import os
import warnings

import numpy as np
import torch
from torch import Tensor
from torch.func import grad, jacfwd, jvp, linearize

from .linear import LinearOperator
from .problem import Perturbation, Problem, center_classes

__all__ = ["Hessian", "Damped", "DataJacobian", "dense_hessian", "dense_data_jacobian", "dense_output_jacobian",
           "output_hessians", "data_jacobian_adjoint",
           "per_sample_jacobian", "J_SCALES", "HVP_MODES", "cache_budget", "graph_bytes", "linearized", "memory_in_use"]

J_SCALES = ("exact", "paper")
HVP_MODES = ("fwd_over_rev", "rev_over_fwd", "double_backward", "auto")


class Hessian(LinearOperator):
    """``v ↦ H v = ∇²_w L(x, w) v`` at ``w`` (default w̄), on the (optionally perturbed) data.

    A symmetric :class:`~setsens.linear.LinearOperator` (``H.T`` is ``H``): ``H(v)`` or ``H @ v`` on a
    tensor of length p; ``calls`` counts products (one pass over the data each).  ``mode`` is the
    autodiff composition of an uncached product, all equal to rounding:
    ``"fwd_over_rev"`` (``jvp`` of the gradient, the default), ``"rev_over_fwd"`` (``∇_w [jvp_w L · v]``),
    ``"double_backward"`` (``∇_w ⟨∇_w L, v⟩`` with ``create_graph``) or ``"auto"``: double backward on
    the CPU, reverse-over-forward on a GPU.  Measured on ResNet-56 (``benchmarks/hvp_ratio.py``), in
    gradients: 2 CPU cores, batch 250 — double backward 3.2–3.8, forward-over-reverse 5.9–7.8,
    reverse-over-forward 5.8–6.3; H100, batch 1000 — 6.6, 2.8 and 2.1.

    ``cache`` (``"auto"``, the default, ``"none"`` or bytes, :func:`cache_budget`): H is fixed at w, so
    the first product on a batch keeps the autograd graph of its gradient (``create_graph``) if it
    fits in what is left of the budget, and every product on that batch is then one backward pass
    through it, whatever ``mode`` says: 2.0–2.4 gradients a product on ResNet-56 on 2 CPU cores (the
    first, which builds it, 5–8), 8.6 MB per CIFAR image in float32.  The first batch kept sets the
    estimate per point for the rest (a build that turns out larger than the budget is used once, not
    kept); batches that do not fit are recomputed.  ``cached_bytes``: what the kept graphs hold, read off the graphs.
    """

    symmetric = True

    def __init__(self, problem: Problem, w: Tensor | None = None, perturbation: Perturbation | None = None,
                 mode: str = "fwd_over_rev", cache: str | int = "auto"):
        if mode not in HVP_MODES:
            raise ValueError(f"mode must be one of {HVP_MODES}, got {mode!r}")
        self.problem = problem
        self.w = problem.params if w is None else w
        self.perturbation = perturbation
        self.shape = (problem.p, problem.p)
        self.calls = 0
        if mode == "auto":
            mode = "double_backward" if self.w.device.type == "cpu" else "rev_over_fwd"
        self.mode = mode
        self._grad = grad(problem.batch_risk)
        self.cache, self.cached_bytes = cache, 0
        cache_budget(cache, self.w.device)  # checks it
        self._graphs: dict[int, tuple] = {}  # batch number → (w as a leaf, ∇L_b with its graph)
        self._per_point: float | None = None  # bytes, measured on the first graph built
        self._retainable = True  # False once a double backward has failed on the model

    def batch_hvp(self, w: Tensor, x: Tensor, y: Tensor, v: Tensor) -> Tensor:
        """One batch's contribution to ``H v``, recomputed."""
        risk = self.problem.batch_risk
        if self.mode == "fwd_over_rev":
            return jvp(lambda w_: self._grad(w_, x, y), (w,), (v,))[1]
        if self.mode == "double_backward":
            with torch.enable_grad():
                wr = w.detach().requires_grad_(True)
                g = torch.autograd.grad(risk(wr, x, y), wr, create_graph=True)[0]
                return torch.autograd.grad(g @ v, wr)[0]
        return grad(lambda w_: jvp(lambda u: risk(u, x, y), (w_,), (v,))[1])(w)

    def matvec(self, v: Tensor) -> Tensor:
        v = v.to(self.w)
        out = torch.zeros_like(self.w)
        for i, (x, y) in enumerate(self.problem.batches(self.perturbation)):
            out += self._product(i, x, y)(v)
        self.calls += 1
        return self.problem.reduce(out)

    def _product(self, i: int, x: Tensor, y: Tensor):
        """``v ↦ H_b v`` on batch ``i``: through its kept graph (built now if it fits) or recomputed."""
        if i not in self._graphs:
            size = 0 if self._per_point is None else self._per_point * x.shape[0]
            if not (self._retainable and self._fits(size)):
                return lambda v: self.batch_hvp(self.w, x, y, v)
            try:
                with torch.enable_grad():
                    wr = self.w.detach().requires_grad_(True)
                    g = torch.autograd.grad(self.problem.batch_risk(wr, x, y), wr, create_graph=True)[0]
            except RuntimeError:  # an operation without a second derivative in autograd
                self._retainable = False
                return lambda v: self.batch_hvp(self.w, x, y, v)
            size = graph_bytes(g)
            self._per_point = self._per_point or size / x.shape[0]
            if not self._fits(size):
                return lambda v: torch.autograd.grad(g, wr, v)[0]  # used once, not kept
            self._graphs[i], self.cached_bytes = (wr, g), self.cached_bytes + size
        wr, g = self._graphs[i]
        return lambda v: torch.autograd.grad(g, wr, v, retain_graph=True)[0]

    def _fits(self, size: float) -> bool:
        return self.cache != "none" and self.cached_bytes + size <= cache_budget(self.cache, self.w.device,
                                                                                   self.cached_bytes)


def graph_bytes(output: Tensor, exclude: Tensor | None = None) -> int:
    """Bytes that ``output`` and the tensors its autograd graph saves for the backward pass hold (each
    storage once; ``exclude``'s own storage left out), read off the graph's nodes — no hooks, which
    would tie saved outputs to their graph in a cycle that is never freed."""
    storages = {output.untyped_storage().data_ptr(): output.untyped_storage().nbytes()}
    seen, stack = set(), [output.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for name in dir(node):
            if name.startswith("_saved_"):
                value = getattr(node, name)
                for t in value if isinstance(value, (tuple, list)) else (value,):
                    if isinstance(t, Tensor):
                        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        stack.extend(f for f, _ in node.next_functions)
    if exclude is not None:
        storages.pop(exclude.untyped_storage().data_ptr(), None)
    return sum(storages.values())


def cache_budget(cache: str | int, device: torch.device, held: int = 0) -> int:
    """Bytes a per-batch linearisation cache that holds ``held`` may hold in all: ``"none"`` 0, an int
    itself, ``"auto"`` ``held`` plus a quarter of the memory free now on ``device`` (the GPU's free
    memory, else the host's available RAM) — asked at each batch, so operators and other processes
    share, and a build's transient peak (about twice what it keeps) still fits."""
    if cache == "none":
        return 0
    if cache != "auto":
        if isinstance(cache, str) or cache < 0:
            raise ValueError(f"cache must be 'auto', 'none' or a number of bytes ≥ 0, got {cache!r}")
        return int(cache)
    if device.type == "cuda":
        return held + torch.cuda.mem_get_info(device)[0] // 4
    try:
        with open("/proc/meminfo") as fh:
            free = next(int(line.split()[1]) * 1024 for line in fh if line.startswith("MemAvailable"))
    except (OSError, StopIteration):
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return held + free // 4


def memory_in_use(device: torch.device) -> int:
    """Bytes this process holds on ``device`` now: the CUDA allocator's, else the resident set."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def linearized(f, w: Tensor) -> tuple:
    """``(v ↦ ∂f(w)/∂w · v, bytes held or None)``: ``torch.func.linearize`` with everything that does
    not depend on v computed now (its constants folded by one product); the bytes are those constants'.
    ``(None, None)`` when f cannot be traced (control flow that reads tensor values, e.g. ``one_hot``)."""
    freeze = gc.get_freeze_count() == 0  # a caller's own frozen objects are left as they are
    if freeze:
        gc.freeze()  # what lived before the trace is not scanned by the collection below (a full one
        # takes 0.2–0.3 s in a process with torch's compiler stack imported, longer than the trace)
    try:
        with warnings.catch_warnings():  # torch.fx const folding warns about its own attributes
            warnings.simplefilter("ignore")
            push = linearize(f, w)[1]
            push(torch.zeros_like(w))
    except (RuntimeError, TypeError, NotImplementedError):
        return None, None
    finally:
        gc.collect()  # the tracer's reference cycles hold tensors of the primal pass
        if freeze:
            gc.unfreeze()
    cells = dict(zip(push.__code__.co_freevars, push.__closure__))
    if "const_folded_jvp_graph" not in cells:  # another torch's linearize: size unknown
        return push, None
    held = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
            for t in cells["const_folded_jvp_graph"].cell_contents.parameters()}
    return push, sum(held.values())


class GaussNewtonMatrix(LinearOperator):
    """The generalised Gauss–Newton matrix ``Σ_i c G_iᵀ Λ_i G_i + λI`` at w (p × p, positive semi-definite),
    matrix-free: ``G_i`` the output Jacobian, ``Λ_i`` the loss's Hessian in the outputs, λ the risk's weight
    decay.  The curvature of the linearised network; unlike H it never has negative eigenvalues.
    Cost per product: one JVP, one VJP and a second derivative of the loss in the outputs per batch.
    A symmetric :class:`~setsens.linear.LinearOperator` (``G.T`` is ``G``)."""

    symmetric = True

    def __init__(self, problem: Problem, w: Tensor | None = None):
        self.problem = problem
        self.w = problem.params if w is None else w
        self.shape = (problem.p, problem.p)
        self.calls = 0

    def matvec(self, v: Tensor) -> Tensor:
        problem, out = self.problem, torch.zeros_like(self.w)
        v = v.to(self.w)
        for x, y in problem.batches():
            f = lambda w: problem.outputs(w, x)  # noqa: E731
            risk = lambda o: problem.loss(o, y).sum() * problem.weight  # noqa: E731
            outputs, vjp_fn = torch.func.vjp(f, self.w)
            jv = torch.func.jvp(f, (self.w,), (v,))[1]
            out += vjp_fn(torch.func.jvp(grad(risk), (outputs.detach(),), (jv,))[1])[0]
        self.calls += 1
        return problem.reduce(out) + problem.weight_decay * v


def output_hessians(problem: Problem, w: Tensor | None = None) -> Tensor:
    """``c Λ_i``: each point's loss Hessian in its outputs (``torch.func.hessian``) times the risk's weight c,
    (n, K, K) — the blocks of the Gauss–Newton matrix's middle factor.  Cost: one forward pass and n small
    Hessians."""
    w = problem.params if w is None else w
    blocks = []
    for x, y in problem.batches():
        with torch.no_grad():
            out = problem.outputs(w, x)
        for o, t in zip(out, y):
            blocks.append(torch.func.hessian(lambda z: problem.loss(z[None], t[None]).sum())(o).reshape(o.numel(), -1))
    return torch.stack(blocks) * problem.weight


def dense_gauss_newton(problem: Problem, w: Tensor | None = None) -> Tensor:
    """The p × p generalised Gauss–Newton matrix from the dense output Jacobian and each point's loss Hessian in
    the outputs (:func:`output_hessians`).  Small only: the reference of :class:`GaussNewtonMatrix`."""
    J = dense_output_jacobian(problem, w)
    return J.T @ torch.block_diag(*output_hessians(problem, w)) @ J + problem.weight_decay * torch.eye(problem.p,
                                                                                                       dtype=J.dtype)


class Damped(LinearOperator):
    """``H + λI`` for any symmetric operator with the :class:`Hessian` interface (``calls`` counts H v)."""

    symmetric = True

    def __init__(self, H, damping: float):
        self.H, self.damping, self.shape = H, damping, H.shape

    @property
    def calls(self) -> int:
        return self.H.calls

    @property
    def w(self) -> Tensor:
        return self.H.w

    def matvec(self, v: Tensor) -> Tensor:
        return self.H(v) + self.damping * v


class DataJacobian(LinearOperator):
    """``J = ∇_x ∇_w L(x̄, w)`` restricted to the points ``indices`` (p × |K|·d), matrix-free.

    A :class:`~setsens.linear.LinearOperator`: ``J @ μ`` takes ``μ`` of shape (|K|, *input_shape) (or
    flat); ``J.T @ y`` returns that shape.  On a sharded
    problem each process differentiates at the points it holds and the sums are all-reduced.
    """

    def __init__(self, problem: Problem, indices, w: Tensor | None = None, scale: str = "exact"):
        if scale not in J_SCALES:
            raise ValueError(f"scale must be one of {J_SCALES}, got {scale!r}")
        self.problem = problem
        self.indices = problem.check_indices(indices)
        self.w = problem.params if w is None else w
        self.mine = problem.holds(self.indices)
        self.x, self.y = problem.points(self.indices[self.mine]) if self.mine.any() else (None, None)
        self.factor = 1.0 / self.indices.numel() if scale == "paper" else problem.weight
        self.shape = (problem.p, int(np.prod(problem.input_shape)) * self.indices.numel())
        self.calls = 0

    def _sum_loss(self, w: Tensor, x: Tensor) -> Tensor:
        return self.problem.per_sample_loss(w, x, self.y).sum()

    def matvec(self, mu: Tensor) -> Tensor:
        """``J μ``: the change of ``∇_w L`` when the points move along ``μ`` (to first order)."""
        self.calls += 1
        out = torch.zeros_like(self.w)
        if self.x is not None:
            mu = mu.to(self.x).reshape(self.indices.numel(), *self.x.shape[1:])[self.mine.to(self.x.device)]
            g = grad(self._sum_loss)
            out = jvp(lambda x: g(self.w, x), (self.x,), (mu,))[1] * self.factor
        return self.problem.reduce(out)

    def rmatvec(self, y: Tensor) -> Tensor:
        """``Jᵀ y``, shape (|K|, *input_shape): for each point ``∇_{x_i} ⟨∇_w ℓ_i, y⟩``."""
        self.calls += 1
        out = torch.zeros(self.indices.numel(), *self.problem.input_shape, dtype=self.w.dtype, device=self.w.device)
        if self.x is not None:
            y = y.to(self.w)

            def directional(x):
                return jvp(lambda w: self._sum_loss(w, x), (self.w,), (y,))[1]

            out[self.mine.to(out.device)] = grad(directional)(self.x) * self.factor
        return self.problem.reduce(out)


def data_jacobian_adjoint(problem: Problem, u: Tensor) -> Tensor:
    """``J_kᵀ u`` for every training point k, (n, *input_shape): :class:`DataJacobian`'s adjoint over all the
    points, a batch of them at a time.  Cost: one reverse-over-forward pass over the data."""
    return torch.cat([DataJacobian(problem, rows).T @ u for rows in torch.arange(problem.n).split(problem.batch_size)])


def dense_hessian(problem: Problem, w: Tensor | None = None, perturbation: Perturbation | None = None) -> Tensor:
    """The p×p Hessian, batch by batch: forward-over-reverse products with every basis vector at once
    (``vmap``).  Small p only (tests, toy).  Not ``torch.func.hessian``: its reverse-mode Jacobian
    gives wrong second derivatives through ``nn.MultiheadAttention`` (torch 2.13; checked against
    finite differences in the tests)."""
    w = problem.params if w is None else w
    H = torch.zeros(problem.p, problem.p, dtype=w.dtype, device=w.device)
    eye = torch.eye(problem.p, dtype=w.dtype, device=w.device)
    for x, y in problem.batches(perturbation):
        column = lambda e: torch.func.jvp(lambda w_: grad(problem.batch_risk)(w_, x, y), (w,), (e,))[1]
        H += torch.func.vmap(column)(eye)
    return H


def dense_data_jacobian(problem: Problem, indices, w: Tensor | None = None, scale: str = "exact") -> Tensor:
    """The p × (|K|·d) matrix ``∇_x ∇_w L`` on the points ``indices`` by ``jacfwd``.  Small only."""
    jac = DataJacobian(problem, indices, w, scale)
    g = grad(jac._sum_loss)
    full = jacfwd(lambda x: g(jac.w, x))(jac.x)
    return full.reshape(problem.p, -1) * jac.factor


def per_sample_jacobian(problem: Problem):
    """``(w, x) ↦ ∂f(x_i, w)/∂w`` for a batch x: (b, K, p), one sample's reverse passes vmapped over the
    batch (each point's outputs depend on that point only: models in eval mode)."""
    one = torch.func.jacrev(lambda w_, x: problem.outputs(w_, x[None]).reshape(-1))
    return torch.func.vmap(lambda w_, x: one(w_, x).reshape(-1, problem.p), in_dims=(None, 0))


def dense_output_jacobian(problem: Problem, w: Tensor | None = None,
                          perturbation: Perturbation | None = None, centered: bool = False) -> Tensor:
    """``∂f(x_i, w)/∂w`` for every training point, stacked: an (n·K) × p matrix.  Small only.
    ``centered``: each point's rows centred over the classes, as ``OutputJacobian(centered=True)``.

    For a squared-error risk at a zero-residual minimum, ``H = c·JᵀJ`` (Gauss–Newton), and the
    solution set S(x̄) is a smooth manifold of codimension n·K near w̄ — the setting in which the
    first-order set estimate is exact to second order — precisely when this matrix has full row
    rank.  Its smallest singular value says how ill-determined the fit of each output is.
    Cost: n·K reverse-mode products of one sample each (``vmap`` over ``jacrev``), memory n·K·p.
    """
    w = problem.params if w is None else w
    per_sample, out, start = per_sample_jacobian(problem), None, 0
    for x, _ in problem.batches(perturbation):  # filled in place: the peak is G and one batch's Jacobian
        J = per_sample(w, x)
        if out is None:
            out = torch.empty(len(problem.rows), J.shape[1], problem.p, dtype=J.dtype, device=J.device)
        out[start:start + x.shape[0]] = center_classes(J, 1) if centered else J
        start += x.shape[0]
    return out.reshape(-1, problem.p)
