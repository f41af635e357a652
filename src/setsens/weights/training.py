"""The theory-driven loss and trainers for standard vs robust training of bias-free MLPs.

L(W) = (1/n) Σ_j [ CE(f(x_j|W), y_j) + λ · max_{i≠y_j} max(0, η_{y_j i}(x_j; W) − m_{y_j i}(x_j|W)) ]
       + μ Σ_l ‖Wˡ‖_∞

with the training budget ε_l = ρ · ‖Wˡ‖_∞ (a fraction ρ of each layer's norm, differentiable, so
the hinge asks for the certificate that is evaluated afterwards).  ``variant="max_eta"`` replaces
the hinge by λ · max_{i≠y} η_{yi} (no margin term); ``variant="hinge_normalized"`` divides the
hinge of each input by Π_l ‖Wˡ‖_∞ · ‖x‖_∞ (the largest possible margin scale), which makes it
invariant to rescaling the layers — the certificate is invariant too, but the plain hinge can be
lowered by shrinking all weights, which fights the cross-entropy.  λ = μ = 0 is standard training.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
import torch
from torch import Tensor, nn

from ..models.mlp import mlp
from ..progress import ProgressFn, report
from ..report import atomic_torch_save
from .bounds import margin_change_bound, relative_budget
from .network import check_batch, check_labels, forward, layer_norms, margins

VARIANTS = ("hinge", "hinge_normalized", "max_eta")

__all__ = ["VARIANTS", "TrainConfig", "robust_loss", "train_mlp", "model_weights"]


@dataclass(frozen=True)
class TrainConfig:
    """Every hyper-parameter of one training run (reported verbatim)."""

    hidden: tuple = (256, 256)
    activation: str = "relu"
    epochs: int = 60
    lr: float = 1e-3
    batch_size: int = 64
    lam: float = 0.0
    mu: float = 0.0
    train_budget: float = 0.01
    ramp_epochs: int = 10
    variant: str = "hinge"

    def __post_init__(self):
        if self.epochs < 1 or self.batch_size < 1 or not self.lr > 0:
            raise ValueError("epochs and batch_size must be ≥ 1 and lr > 0")
        if self.lam < 0 or self.mu < 0 or self.train_budget < 0 or self.ramp_epochs < 0:
            raise ValueError("lam, mu, train_budget and ramp_epochs must be non-negative")
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {self.variant!r}")
        if any(int(h) < 1 for h in self.hidden):
            raise ValueError(f"hidden widths must be ≥ 1, got {self.hidden}")

    @property
    def robust(self) -> bool:
        return self.lam > 0 or self.mu > 0

    def as_dict(self) -> dict:
        d = asdict(self)
        d["hidden"] = list(self.hidden)
        return d


def robust_loss(weights, x: Tensor, y: Tensor, lam: float, mu: float, budget: float,
                activation="relu", variant: str = "hinge") -> tuple[Tensor, dict]:
    """The theory-driven loss (scalar, differentiable) and its parts (floats).

    ``budget`` is the fraction ρ with ε_l = ρ ‖Wˡ‖_∞.  Cost: one forward pass plus the bound,
    O(N Σ n_l n_{l-1} + K² n_{d-1}).
    """
    weights, x, y = check_batch(weights, x, y)
    K = weights[-1].shape[0]
    logits = forward(weights, x, activation)
    ce = nn.functional.cross_entropy(logits, y)
    loss = ce
    parts = {"ce": float(ce.detach())}
    if lam > 0:
        eta = margin_change_bound(weights, x, y, relative_budget(weights, budget))
        own = nn.functional.one_hot(y, K).bool()
        if variant == "hinge":
            term = (eta - margins(logits, y)).clamp(min=0).masked_fill(own, 0.0).amax(dim=1).mean()
        elif variant == "hinge_normalized":
            scale = torch.prod(layer_norms(weights)) * x.abs().amax(dim=1).clamp_min(1e-12)
            hinge = (eta - margins(logits, y)) / scale[:, None]
            term = hinge.clamp(min=0).masked_fill(own, 0.0).amax(dim=1).mean()
        elif variant == "max_eta":
            term = eta.masked_fill(own, 0.0).amax(dim=1).mean()
        else:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        loss = loss + lam * term
        parts["robust_term"] = float(term.detach())
    if mu > 0:
        norm = layer_norms(weights).sum()
        loss = loss + mu * norm
        parts["norm_term"] = float(norm.detach())
    parts["loss"] = float(loss.detach())
    return loss, parts


def model_weights(model: nn.Sequential) -> list[Tensor]:
    """The weight matrices of a bias-free ``nn.Sequential`` MLP (live parameters)."""
    return [m.weight for m in model if isinstance(m, nn.Linear)]


def train_mlp(x: Tensor, y: Tensor, num_classes: int, config: TrainConfig, seed: int = 0,
              progress: ProgressFn | None = None, checkpoint: Path | None = None) -> tuple[nn.Sequential, list[dict]]:
    """Train a bias-free MLP with Adam on the theory-driven loss (standard training if λ = μ = 0).

    The training budget ρ is ramped linearly from 0 over the first ``ramp_epochs`` epochs.
    ``progress``: ``Progress("epoch", e, epochs, {loss parts})`` after each epoch.  Returns the model (eval mode) and a
    per-epoch history of the mean loss parts.  Deterministic given ``seed``.  With ``checkpoint``
    (a file) the model, optimiser and shuffling state are saved there after every epoch and
    training resumes from it: a killed run ends with the same weights as an uninterrupted one.
    """
    if x.ndim != 2 or x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise ValueError(f"x must be (n, n0) with one label per row, got {tuple(x.shape)} and {tuple(y.shape)}")
    gen = torch.Generator().manual_seed(seed)
    model = mlp([x.shape[1], *config.hidden, num_classes], activation=config.activation, generator=gen, dtype=x.dtype)
    opt = torch.optim.Adam(model.parameters(), lr=config.lr)
    weights = model_weights(model)
    check_labels(y, x.shape[0], num_classes)
    n = x.shape[0]
    history, start = [], 0
    if checkpoint is not None and Path(checkpoint).exists():
        saved = torch.load(checkpoint, weights_only=False)
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        gen.set_state(saved["generator"])
        history, start = saved["history"], saved["epoch"]
    for epoch in range(start, config.epochs):
        rho = config.train_budget
        if config.ramp_epochs:
            rho = rho * min(1.0, (epoch + 1) / config.ramp_epochs)
        perm = torch.randperm(n, generator=gen)
        sums: dict[str, float] = {}
        for s in range(0, n, config.batch_size):
            idx = perm[s : s + config.batch_size]
            loss, parts = robust_loss(weights, x[idx], y[idx], config.lam, config.mu, rho, config.activation,
                                      config.variant)
            opt.zero_grad()
            loss.backward()
            opt.step()
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v * len(idx)
        history.append({"epoch": epoch + 1, "budget": rho, **{k: v / n for k, v in sums.items()}})
        report(progress, "epoch", epoch + 1, config.epochs, **{k: v / n for k, v in sums.items()})
        if checkpoint is not None:
            atomic_torch_save({"epoch": epoch + 1, "model": model.state_dict(), "optimizer": opt.state_dict(),
                               "generator": gen.get_state(), "history": history}, checkpoint)
    model.eval()
    return model, history
