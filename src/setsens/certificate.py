"""Poisoning certificates: held-out predictions that no move of K training points within a budget
can change — the *margin-bound certificate* (bias-free ReLU networks: the margin bounds of
:mod:`setsens.weights` applied to the set's first-order move; the two halves of setsens joined) and the
*first-order certificate* (any network).  Neither is a proof for the retrained model: both assume the set moves
as its first-order estimate says (step 1 below); only the margin step is proved.

1. **First order (the set).**  Moving points k ∈ K by ``‖Δx_k‖ ≤ δ‖x_k‖`` moves the Gauss–Newton set
   by ``v = Σ_k v_k`` with ``‖v_k‖ ≤ κ_k δ‖x_k‖`` (the scan's local modulus), so
   ``‖v‖ ≤ δ κ_K``, ``κ_K = Σ of the K largest κ_k‖x_k‖`` — for *any* K points.  This holds for
   the linearised set; the member of the new set nearest to w̄ moves by ``δ κ_K + O(δ²)``.
2. **Norms (proved, given step 1).**  Layer l's block of v is a matrix ΔWˡ with
   ``‖ΔWˡ‖_∞ ≤ √(fan-in_l)·‖ΔWˡ‖_F ≤ √(fan-in_l)·‖v‖`` (max row ℓ1 norm), so the per-layer budgets
   ``ε_l = √(fan-in_l)·δ κ_K`` hold every layer.
3. **Margins (proved, given step 1).**  The margin bounds of :mod:`setsens.weights` (Theorems 2–3 of the
   weight-perturbation part) certify each prediction that every network within ε keeps.

So a certified prediction is unchanged by every such poisoning up to the first-order step 1 — the
only approximation, checked by attacking the certified points and retraining
(``setsens audit --certify``).  Cost: the scan, then one bound evaluation per δ.

:func:`first_order_certificate` is the same question answered to first order throughout, for any
network: the margin ``m_cj`` of a held-out prediction c over class j changes by at most
``δ Σ_{K largest} ‖A_kᵀ u_k‖‖x_k‖`` with ``u = (Gᵀ)⁺ ∇_w m_cj`` (the coderivative: the attack's
linearised optimum attains it), so each point gets a radius — the largest δ no poisoning of K
points can flip it at, to first order.  Tight where the margin bounds are loose; its only check is
the attack followed by retraining.  Given a ``training``, the same radius for the budget response
(fine-tuning from w̄, :mod:`setsens.filters`): ``u = φ_T(𝒢) ∇_w m_cj`` and ``‖J_kᵀ u‖`` (J the data Jacobian
of the loss gradient) in place of ``‖A_kᵀ u_k‖``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .audit import GramFactor, Scan, input_jacobians
from .filters import budget_filter
from .finetune import Training
from .operators import data_jacobian_adjoint
from .problem import Problem
from .progress import ProgressFn, report
from .weights.certify import certified_prediction
from .weights.network import is_structured, network_from_model

__all__ = ["Certificate", "poisoning_certificate", "first_order_certificate", "layer_weights"]


def layer_weights(problem: Problem, w: Tensor | None = None) -> list[Tensor]:
    """The weight matrices of the problem's bias-free ReLU network at ``w`` (default w̄), input layer
    first; raises :class:`~setsens.weights.network.UnsupportedNetworkError` outside that setting."""
    if is_structured(problem.model):
        raise ValueError("the certificate's margin bounds need a bias-free ReLU MLP (nn.Sequential of nn.Linear and "
                         f"nn.ReLU), not a {type(problem.model).__name__} with convolutions, BatchNorm or residual "
                         "blocks")
    matrices, _, activation = network_from_model(problem.model)
    if activation != "relu":
        raise ValueError(f"the certificate's margin bounds need ReLU activations, got {activation}")
    name = {id(t): n for n, t in problem.model.named_parameters()}
    params = problem.unflatten(problem.params if w is None else w)
    return [params[name[id(t)]].detach() for t in matrices]


class CertifiedFractions:
    """What every certificate with ``deltas`` (δ tried) and ``certified`` (δ × held-out point) reports."""

    deltas: Tensor
    certified: Tensor

    @property
    def fraction(self) -> Tensor:
        """The certified fraction of the held-out points at each δ."""
        return self.certified.double().mean(dim=1)

    def largest_delta(self, fraction: float = 0.5) -> float:
        """The largest δ tried with at least ``fraction`` certified (0 if none)."""
        ok = self.deltas[self.fraction >= fraction]
        return float(ok.max()) if ok.numel() else 0.0


@dataclass
class Certificate(CertifiedFractions):
    """``certified[i, j]``: held-out point j's prediction survives every move of ``points`` training
    points with ``‖Δx_k‖ ≤ deltas[i]·‖x_k‖`` (first order in the set, proved in the margins);
    ``budgets[i]`` the per-layer ε_l used; ``kappa`` = κ_K, the bound on ‖v‖ per unit δ
    (:func:`poisoning_certificate`); or ``radius`` per point (:func:`first_order_certificate`)."""

    deltas: Tensor
    points: int
    predictions: Tensor
    certified: Tensor
    kappa: float | None = None
    budgets: Tensor | None = None
    radius: Tensor | None = None


def poisoning_certificate(problem: Problem, scan: Scan, x: Tensor, deltas, points: int) -> Certificate:
    """Certify the predictions at ``x`` against every move of ``points`` training points by at most
    ``δ‖x_k‖`` for each δ in ``deltas`` (relative).  Needs the :class:`~setsens.audit.Scan` of
    ``problem`` (its κ_k)."""
    weights = layer_weights(problem)
    deltas, norms = _checked(problem, deltas, points)
    kappa = float((scan.kappa * norms.to(scan.kappa)).topk(points).values.sum())
    fan_in = torch.tensor([W.shape[1] for W in weights], dtype=torch.float64)
    budgets = deltas[:, None] * kappa * fan_in.sqrt()
    x = x.reshape(len(x), -1).to(weights[0])
    certified, predictions = [], None
    for eps in budgets:
        predictions, ok = certified_prediction(weights, x, eps.to(weights[0]))
        certified.append(ok)
    return Certificate(deltas, points, predictions, torch.stack(certified), kappa=kappa, budgets=budgets)


def first_order_certificate(problem: Problem, x: Tensor, deltas, points: int, factor: GramFactor | None = None,
                            chunk: int = 32, training: Training | None = None,
                            progress: ProgressFn | None = None) -> Certificate:
    """Each prediction at ``x`` with its first-order radius against any poisoning of ``points``
    training points (any network, Gauss–Newton form), certified at each δ below it.

    Without ``training`` it predicts the solution set's move (retraining to convergence): ``u = (Gᵀ)⁺ ∇m``
    and point k's sensitivity ``‖A_kᵀ u_k‖``.  With ``training`` (lr resolved) the budget response's
    (fine-tuning from w̄ by that training, :mod:`setsens.filters`): ``u = φ_T(𝒢) ∇m`` and ``‖J_kᵀ u‖``, J the
    data Jacobian of the loss gradient — exact from ``factor`` on an exact path, else Lanczos.

    Cost: the factor, then per held-out point K reverse passes (its output Jacobian) and K adjoint products;
    with ``training`` also K − 1 reverse-over-forward passes over the training data (the certificate's main
    cost on a large network).  Memory bounded by ``chunk`` held-out points at a time.  ``progress``: stage
    ``"certificate"``, held-out points done.
    """
    deltas, norms = _checked(problem, deltas, points)
    factor = factor or GramFactor(problem)
    if training is None:
        A = input_jacobians(problem)  # (n, K, d), centred as G is

        def sensitivity(grads: Tensor) -> Tensor:  # (m, p) margin gradients → (m, n) per-point sensitivities
            u = (factor.T @ grads).reshape(len(grads), problem.n, -1)  # (Gᵀ)⁺ ∇m
            return torch.einsum("nkd,mnk->mnd", A, u).norm(dim=2)
    else:
        apply = budget_filter(problem, training, factor=factor)

        def sensitivity(grads: Tensor) -> Tensor:
            s = torch.zeros(len(grads), problem.n, dtype=torch.float64, device=grads.device)
            moving = grads.abs().amax(1) > 0  # the margin of c over itself is 0: no pass for it
            for i, u in zip(moving.nonzero().reshape(-1).tolist(), apply(grads[moving])):
                s[i] = data_jacobian_adjoint(problem, u).flatten(1).norm(dim=1).double()
            return s
    one = lambda w, x_: problem.outputs(w, x_[None]).reshape(-1)  # noqa: E731
    predictions, radii = [], []
    for xs in x.to(problem.params).split(chunk):
        with torch.no_grad():
            f = problem.outputs(problem.params, xs).reshape(len(xs), -1)
        c = f.argmax(1)
        jac = torch.func.vmap(torch.func.jacrev(one), (None, 0))(problem.params, xs)  # (b, K, p)
        grads = (jac[torch.arange(len(xs)), c][:, None] - jac).reshape(-1, problem.p)  # ∇ m_cj, (b·K, p)
        s = sensitivity(grads)
        worst = (s * norms.to(s)).topk(points, dim=1).values.sum(1).reshape(len(xs), -1)  # per unit δ
        m = f[torch.arange(len(xs)), c][:, None] - f
        ratio = torch.where(worst > 0, m / worst.to(m), torch.full_like(m, float("inf")))
        ratio[torch.arange(len(xs)), c] = float("inf")
        predictions.append(c)
        radii.append(ratio.amin(1))
        report(progress, "certificate", sum(map(len, predictions)), len(x))
    radius = torch.cat(radii)
    return Certificate(deltas, points, torch.cat(predictions), radius[None] > deltas[:, None], radius=radius)


def _checked(problem: Problem, deltas, points: int) -> tuple[Tensor, Tensor]:
    """The budgets δ as a tensor and the training points' norms ‖x_k‖, after checking both arguments."""
    if not 1 <= points <= problem.n:
        raise ValueError(f"points must be in [1, {problem.n}], got {points}")
    deltas = torch.as_tensor(deltas, dtype=torch.float64).reshape(-1)
    if (deltas < 0).any():
        raise ValueError("the budgets δ must be ≥ 0")
    x, _ = problem.points(torch.arange(problem.n))
    return deltas, x.reshape(problem.n, -1).norm(dim=1)
