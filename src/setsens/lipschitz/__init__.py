"""Lipschitz modulus of the solution map ``x ↦ S(x)``: closed form, coderivative, retraining.

Three estimates of how fast the solution set can move per unit of data perturbation
(paper: Theorems 1–3, Lemmas 5–6; DESIGN §1):

* :func:`closed_form_modulus` — Theorem 2 (and Theorem 3 by :func:`theorem3_modulus`) for a
  bias-free ReLU fully-connected network with squared loss (the DFCNN of eq. 8).  Per point k and
  layer h it is Lemma 6 applied to the *single-point interpolation constraint*
  ``f(x_k, w^{(h)}, w̄^{(−h)}) = y_k`` (the proof, eqs. 33–44)::

      κ_h,k = sup { ‖A_kᵀ v‖ : ‖G_{k,h}ᵀ v‖ ≤ 1 },   A_k = ∇_x f(x_k),  G_{k,h} = ∇_{w^{(h)}} f(x_k)

  which for a scalar output is the printed ``‖∇_x f‖ / ‖∇_{W^{(h)}} f‖_F``.
* :class:`DenseModulus` / :func:`matrix_free_modulus` — the coderivative (Mordukhovich) criterion
  ``Jᵀ y = 0 ∀ y ∈ ker H`` and the modulus ``κ = sup{‖Jᵀ y‖ : ‖H y‖ ≤ 1} = ‖Jᵀ H⁺‖``
  (whole network or one block of weights), with the numerical null space
  ``{|λ| ≤ τ·λ_max}``.
* :func:`empirical_modulus` — retrain on perturbed data and divide the set shift by ``‖Δx‖``.

Relationship between the closed form and the block-restricted numerical modulus (tested in
``tests/lipschitz``; derivation in ``docs/lipschitz.md``).  At an interpolating w̄ (zero
residuals, the paper's Assumption 1) the layer-h Hessian block is ``H_hh = c Σ_i G_{i,h}ᵀ G_{i,h}``
and ``J_{h,k} = c G_{k,h}ᵀ A_k``, hence

    κ^num_h({k}) = ‖A_kᵀ G_{k,h} M_h⁺‖,   M_h = Σ_i G_{i,h}ᵀ G_{i,h}   (exact J scale)
    κ_h,k        = the same with M_h replaced by G_{k,h}ᵀ G_{k,h}.

So (R1) the closed form *equals* the block modulus of the one-point problem {x_k}; (R2) if the
stacked per-sample Jacobians of the block have full row rank (the block alone can interpolate),
``κ^num_h({k}) ≥ κ_h,k`` — Theorem 2 is then a lower bound, smaller by the sine of the angle between
point k's constraint and the others'; (R3) otherwise (fewer parameters in the block than
residuals) no ordering holds in general.

The package, one concept a module: :mod:`.closed_form` (Theorems 2/3), :mod:`.criterion` (the coderivative
criterion and the modulus from matrices), :mod:`.numerical` (the dense and matrix-free moduli of a problem,
the toy), :mod:`.empirical` (retraining).  Every public name is importable from ``setsens.lipschitz``.
"""

from __future__ import annotations

from .closed_form import ClosedForm, DFCNNLayout, closed_form_modulus, parse_dfcnn, theorem3_modulus
from .criterion import DEFAULT_TAU, STABILITY_RTOL, ModulusResult, modulus_from_matrices
from .empirical import EmpiricalRecord, empirical_modulus
from .numerical import DenseModulus, matrix_free_modulus, toy_modulus

__all__ = [
    "DEFAULT_TAU",
    "STABILITY_RTOL",
    "DFCNNLayout",
    "parse_dfcnn",
    "ClosedForm",
    "closed_form_modulus",
    "theorem3_modulus",
    "ModulusResult",
    "DenseModulus",
    "matrix_free_modulus",
    "modulus_from_matrices",
    "EmpiricalRecord",
    "empirical_modulus",
    "toy_modulus",
]
