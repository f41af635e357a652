"""Theorem 2 (and Theorem 3) in closed form for the paper's DFCNN (eq. 8): per point k and layer h, Lemma 6
applied to the single-point interpolation constraint ``f(x_k, w^{(h)}, w̄^{(−h)}) = y_k`` (see
:mod:`setsens.lipschitz` for how it relates to the numerical modulus)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..models.mlp import mlp_layers
from ..problem import Problem


@dataclass(frozen=True)
class DFCNNLayout:
    """Where the weight matrices ``W^{(1)} … W^{(H)}, a`` of a DFCNN sit in the flat vector."""

    names: tuple[str, ...]
    slices: tuple[slice, ...]
    shapes: tuple[tuple[int, int], ...]

    @property
    def depth(self) -> int:
        """Number of hidden (ReLU) layers H; the last matrix is the output layer ``a``."""
        return len(self.names) - 1

    def labels(self) -> list[str]:
        return [f"W{h + 1}" for h in range(self.depth)] + ["a (output)"]

    def weights(self, w: Tensor) -> list[Tensor]:
        return [w[s].view(shape) for s, shape in zip(self.slices, self.shapes)]


def parse_dfcnn(problem: Problem) -> DFCNNLayout:
    """Check that ``problem`` is the paper's DFCNN (eq. 8) and locate its weight matrices.

    Required: squared loss (``setsens.problem.squared_error``), an ``nn.Sequential`` of
    ``Linear(bias=False)`` layers separated by ``nn.ReLU`` and ending in a ``Linear``, flat inputs.
    Anything else raises ``ValueError`` naming the offending part.

    >>> import torch
    >>> from setsens.models.mlp import mlp
    >>> from setsens.problem import squared_error
    >>> net = mlp([3, 4, 2]).double()
    >>> x, y = torch.rand(5, 3, dtype=torch.float64), torch.zeros(5, 2, dtype=torch.float64)
    >>> pb = Problem(net, squared_error, (x, y))
    >>> parse_dfcnn(pb).labels()
    ['W1', 'a (output)']
    """
    if not problem.loss_is_squared_error:
        raise ValueError(
            "the closed form (Theorems 2-3) is derived for the squared loss ½‖f(x) − y‖² "
            f"(setsens.problem.squared_error); this problem uses {getattr(problem.loss, '__name__', problem.loss)!r}"
        )
    model = problem.model
    linears, activation = mlp_layers(model, flatten=False)
    if len(problem.input_shape) != 1:
        raise ValueError(f"the DFCNN takes flat inputs, the data have point shape {problem.input_shape}")
    if activation != "relu":
        raise ValueError(f"the activation is {activation}; Theorem 2 needs ReLU between the Linear layers")
    names = tuple(f"{i}.weight" for i, m in enumerate(model) if isinstance(m, nn.Linear))
    for name, m in zip(names, linears):
        if m.bias is not None:
            raise ValueError(f"layer {name.split('.')[0]} (Linear) has a bias; the paper's DFCNN is bias-free (eq. 8)")
    blocks = dict(problem.blocks())
    extra = set(blocks) - set(names)
    if extra:
        raise ValueError(f"unexpected parameters {sorted(extra)} in the DFCNN")
    shapes = tuple(tuple(m.weight.shape) for m in linears)
    if shapes[0][1] != problem.input_shape[0]:
        raise ValueError(f"first layer expects {shapes[0][1]} inputs, the data have {problem.input_shape[0]}")
    return DFCNNLayout(names, tuple(blocks[n] for n in names), shapes)


@dataclass
class ClosedForm:
    """Theorem 2 for each point k (rows) and weight matrix h (columns; the last is the output a).

    ``kappa[k, h]`` — Lemma 6 for the vector constraint ``f(x_k, w) = y_k`` (equals the printed
    formula for a scalar output); ``printed[k, h, j]`` — the printed scalar formula
    ``‖∇_x f_j‖ / ‖∇_{W^{(h)}} f_j‖_F`` for output coordinate j; ``network[k]`` — Lemma 6 with all
    layers free at once.  ``inf`` where ∇_{w^{(h)}} f is rank deficient in a direction that
    moves ∇_x f (Lemma 6's surjectivity fails: dead ReLU units).
    """

    indices: Tensor
    labels: list[str]
    kappa: Tensor
    printed: Tensor
    network: Tensor
    input_grad_norm: Tensor

    def theorem3(self) -> Tensor:
        """Theorem 3 over these points: ``(Σ_k κ_h,k²)^{1/2}`` per layer (see :func:`theorem3_modulus`)."""
        return theorem3_modulus(self.kappa)


def _lemma6(A: Tensor, Gram: Tensor) -> Tensor:
    """``sup{‖Aᵀv‖ : vᵀ Gram v ≤ 1}`` batched: A (b, c, d), Gram (b, c, c) PSD."""
    s, V = torch.linalg.eigh(0.5 * (Gram + Gram.transpose(-1, -2)))
    smax = s.amax(dim=-1, keepdim=True).clamp_min(1e-300)
    keep = s > 1e-12 * smax
    AtV = A.transpose(-1, -2) @ V  # (b, d, c)
    scaled = AtV / s.clamp_min(1e-300).sqrt().unsqueeze(-2)
    scaled = torch.where(keep.unsqueeze(-2), scaled, torch.zeros_like(scaled))
    kappa = torch.linalg.matrix_norm(scaled, ord=2)
    leak = torch.where(keep.unsqueeze(-2), torch.zeros_like(AtV), AtV).norm(dim=(-1, -2))
    anorm = A.norm(dim=(-1, -2))
    bad = leak > 1e-9 * anorm.clamp_min(1e-300)
    kappa = torch.where(bad, torch.full_like(kappa, math.inf), kappa)
    return torch.where((anorm == 0) & (smax[..., 0] <= 1e-300), torch.full_like(kappa, math.nan), kappa)


def closed_form_modulus(problem: Problem, indices=None, w: Tensor | None = None) -> ClosedForm:
    """Theorem 2's κ_h for every point in ``indices`` (default: all) and every weight matrix.

    Reading of the printed formula (documented in docs/lipschitz.md): numerator ``‖∇_{x_k} f‖``
    with the product ``W^{(1)ᵀ}D^{(1)} ⋯ W^{(H)ᵀ}D^{(H)} a`` taken left to right; denominator the
    Frobenius norm of ``∇_{W^{(h)}} f = D^{(h)} W^{(h+1)ᵀ}D^{(h+1)} ⋯ a · x_k^{(h−1)ᵀ}``; all
    activation patterns ``D^{(l)} = diag(1[W^{(l)} x_k^{(l−1)} > 0])`` at the perturbed point x_k.
    The output layer ``a`` (not covered by the theorem) gets the same Lemma-6 formula with
    ``∇_a f = x_k^{(H)}``.  The 1/n or 1/|K| factors cancel: κ_h is scale-free.
    Cost: one forward and one backward sweep per point, no Hessian.
    """
    layout = parse_dfcnn(problem)
    idx = torch.arange(problem.n) if indices is None else problem.check_indices(indices)
    w = problem.params if w is None else w
    Ws = layout.weights(w.detach())
    x, _ = problem.points(idx)
    x = x.reshape(x.shape[0], -1).to(w)
    acts, masks = [x], []
    for W in Ws[:-1]:
        z = acts[-1] @ W.T
        masks.append((z > 0).to(w))
        acts.append(torch.relu(z))
    a = Ws[-1]  # (c, m_H)
    c = a.shape[0]
    b = x.shape[0]
    # back[h] = ∂f/∂z^{(h)}: (b, c, m_h)
    back = [None] * len(masks)
    cur = a.expand(b, *a.shape)
    for h in range(len(masks) - 1, -1, -1):
        cur = cur * masks[h].unsqueeze(1)
        back[h] = cur
        cur = cur @ Ws[h]
    A = cur  # (b, c, d) = ∇_x f
    grams, printed = [], []
    for h in range(len(masks)):
        xn2 = (acts[h] ** 2).sum(dim=1)[:, None, None]
        grams.append(back[h] @ back[h].transpose(-1, -2) * xn2)
    xn2 = (acts[-1] ** 2).sum(dim=1)
    grams.append(torch.eye(c, dtype=w.dtype, device=w.device).expand(b, c, c) * xn2[:, None, None])
    rownorm_A = A.norm(dim=2)  # (b, c)
    kappa = torch.stack([_lemma6(A, g) for g in grams], dim=1)
    for g in grams:
        den = g.diagonal(dim1=-2, dim2=-1).clamp_min(0).sqrt()
        printed.append(torch.where(den > 0, rownorm_A / den.clamp_min(1e-300), torch.full_like(den, math.inf)))
    network = _lemma6(A, sum(grams))
    return ClosedForm(
        indices=idx, labels=layout.labels(), kappa=kappa, printed=torch.stack(printed, dim=1),
        network=network, input_grad_norm=torch.linalg.matrix_norm(A, ord=2),
    )


def theorem3_modulus(kappa_points: Tensor) -> Tensor:
    """Theorem 3 (many perturbed points) from the per-point moduli ``κ_{·,k}`` (rows = points).

    ``(Σ_k κ_k²)^{1/2}`` bounds the multi-point modulus of the linearised map when the κ_k are the
    true per-point moduli (``‖Σ_k M_k Δx_k‖ ≤ Σ_k κ_k ‖Δx_k‖ ≤ (Σ_k κ_k²)^{1/2} ‖Δx‖``; tested with
    the numerical ones).  Fed Theorem 2's closed form, which is no bound on κ_k, it is the paper's
    heuristic, not a bound (measured: exceeded by 1.4–5.7×; docs/lipschitz.md).

    >>> theorem3_modulus(torch.tensor([[3.0], [4.0]]))
    tensor([5.])
    """
    return kappa_points.pow(2).sum(dim=0).sqrt()
