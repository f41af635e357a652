"""The "What to measure" experiment of WEIGHT-PERTURBATION.md: standard vs theory-driven training.

:func:`run_experiment` trains bias-free MLPs (standard, then the robust loss for every (λ, μ) in
the grid), and for every budget ε_l = ρ ‖Wˡ‖_∞ in the grid measures on the test set: clean,
certified, attacked (per-input box attack on the weights) and random-perturbation accuracy; the
soundness and tightness of the bound against several attacks; and the Theorem 4 bound next to the
measured train–test gaps.  Pure: returns a JSON-able dict; files are written by the CLI.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch

from .attacks import (
    attacked_robust,
    box_attack,
    random_boundary_perturbation,
    random_perturbation_accuracy,
    runner_up,
    weight_attack,
)
from .bounds import margin_change_bound, relative_budget
from .certify import certified_accuracy, max_certified_budget
from .generalization import theorem4_bound
from .network import forward, forward_perturbed, layer_norms, margins
from .training import TrainConfig, model_weights, train_mlp

__all__ = ["ExperimentConfig", "run_experiment", "evaluate_model", "plot_accuracy_curves"]


@dataclass(frozen=True)
class ExperimentConfig:
    """Every hyper-parameter of the experiment (all of them are written to the report)."""

    dataset: str = "digits"
    data_path: str = "../shared/data/cifar10-subset.npz"
    seed: int = 0
    hidden: tuple = (128,)
    activation: str = "relu"
    epochs: int = 60
    lr: float = 2e-3
    batch_size: int = 128
    budgets: tuple = (0.0, 0.005, 0.01, 0.02, 0.05)
    lam: float = 0.1
    mu: float = 0.0
    train_budget: float = 0.01
    ramp_epochs: int = 10
    variant: str = "hinge"
    grid_lams: tuple = (0.03, 0.1, 0.3)
    grid_mus: tuple = (0.0, 1e-3)
    attack_steps: int = 40
    attack_restarts: int = 2
    attack_targets: int | None = None  # None = all K-1 classes
    random_samples: int = 20
    weight_attack_points: int = 100
    weight_attack_steps: int = 100
    gamma_rel: float = 0.05
    delta: float = 0.05

    def __post_init__(self):
        if self.dataset not in ("digits", "cifar10"):
            raise ValueError(f"dataset must be 'digits' or 'cifar10', got {self.dataset!r}")
        if not self.budgets or any(not (b >= 0 and math.isfinite(b)) for b in self.budgets):
            raise ValueError(f"budgets must be non-negative finite fractions, got {self.budgets}")
        if not self.gamma_rel > 0 or not 0 < self.delta < 1:
            raise ValueError("gamma_rel must be > 0 and delta in (0, 1)")
        if self.attack_steps < 1 or self.attack_restarts < 1 or self.random_samples < 1:
            raise ValueError("attack_steps, attack_restarts and random_samples must be ≥ 1")

    def train_config(self, lam: float, mu: float) -> TrainConfig:
        return TrainConfig(hidden=tuple(self.hidden), activation=self.activation, epochs=self.epochs, lr=self.lr,
                           batch_size=self.batch_size, lam=lam, mu=mu, train_budget=self.train_budget,
                           ramp_epochs=self.ramp_epochs, variant=self.variant)

    def as_dict(self) -> dict:
        d = asdict(self)
        for k in ("hidden", "budgets", "grid_lams", "grid_mus"):
            d[k] = list(d[k])
        return d


def _soundness_tightness(W, x, y, eps, cfg: ExperimentConfig, gen: torch.Generator) -> dict:
    """Attack the (label, runner-up) pair of correctly classified inputs; compare with η."""
    with torch.no_grad():
        logits = forward(W, x, cfg.activation)
    keep = logits.argmax(1) == y
    x, y, logits = x[keep], y[keep], logits[keep]
    if x.shape[0] == 0 or float(eps.sum()) == 0:
        return {}
    t = runner_up(logits, y)
    eta = margin_change_bound(W, x, y, eps).gather(1, t[:, None]).squeeze(1)
    out = {}
    _, ch = box_attack(W, x, y, t, eps, activation=cfg.activation, steps=cfg.attack_steps,
                       restarts=cfg.attack_restarts, generator=gen)
    changes = {"box": ch}
    sub = slice(0, min(cfg.weight_attack_points, x.shape[0]))
    if cfg.weight_attack_points > 0:
        for method in ("pgd", "fw"):
            _, c = weight_attack(W, x[sub], y[sub], t[sub], eps, activation=cfg.activation, method=method,
                                 steps=cfg.weight_attack_steps, generator=gen)
            changes[f"weight_{method}"] = c
    # random boundary perturbations, one per input, several draws; largest |change| over all pairs
    m = margins(logits, y)
    eta_all = margin_change_bound(W, x, y, eps)
    worst_random = torch.zeros(x.shape[0], dtype=x.dtype)
    viol_random = 0
    with torch.no_grad():
        for _ in range(5):
            dl = random_boundary_perturbation(W, eps, n=None, generator=gen)
            mh = margins(forward_perturbed(W, dl, x, cfg.activation), y)
            ratio = ((m - mh).abs() / eta_all.clamp_min(1e-30)).masked_fill(eta_all == 0, 0.0)
            viol_random += int(((m - mh).abs() > eta_all * (1 + 1e-5) + 1e-6).sum())
            worst_random = torch.maximum(worst_random, ratio.amax(1))
    for name, c in changes.items():
        e = eta[sub] if name.startswith("weight") else eta
        r = c / e.clamp_min(1e-30)
        out[name] = {
            "points": int(c.shape[0]),
            "violations": int((c > e * (1 + 1e-5) + 1e-6).sum()),
            "ratio_mean": float(r.mean()),
            "ratio_median": float(r.median()),
            "ratio_max": float(r.max()),
        }
    out["random"] = {"points": int(x.shape[0]), "draws": 5, "violations": viol_random,
                     "ratio_mean": float(worst_random.mean()), "ratio_max": float(worst_random.max())}
    return out


def evaluate_model(W, data, cfg: ExperimentConfig, gen: torch.Generator, detailed: bool = True) -> dict:
    """Clean/certified/attacked/random accuracy over the budget grid, tightness and Theorem 4."""
    xtr, ytr, xte, yte = data
    W = [w.detach() for w in W]
    with torch.no_grad():
        clean = float((forward(W, xte, cfg.activation).argmax(1) == yte).double().mean())
        clean_train = float((forward(W, xtr, cfg.activation).argmax(1) == ytr).double().mean())
    rows = []
    for rho in cfg.budgets:
        eps = relative_budget(W, rho)
        row = {"budget": rho, "eps": eps.tolist(), "clean_accuracy": clean}
        row["certified_accuracy"] = certified_accuracy(W, xte, yte, eps, activation=cfg.activation)
        row["certified_accuracy_train"] = certified_accuracy(W, xtr, ytr, eps, activation=cfg.activation)
        if rho == 0:
            row["attacked_accuracy"] = clean
            row["random_accuracy_mean"] = row["random_accuracy_min"] = clean
        else:
            rob = attacked_robust(W, xte, yte, eps, activation=cfg.activation, n_targets=cfg.attack_targets,
                                  steps=cfg.attack_steps, restarts=cfg.attack_restarts, generator=gen)
            row["attacked_accuracy"] = float(rob.double().mean())
            rnd = random_perturbation_accuracy(W, xte, yte, eps, activation=cfg.activation,
                                               samples=cfg.random_samples, generator=gen)
            row["random_accuracy_mean"] = float(rnd.mean())
            row["random_accuracy_min"] = float(rnd.min())
            if detailed:
                row["soundness_tightness"] = _soundness_tightness(W, xte, yte, eps, cfg, gen)
        scale = float(torch.prod(layer_norms(W)) * xtr.abs().max())
        gamma = cfg.gamma_rel * scale
        row["theorem4"] = theorem4_bound(W, xtr, ytr, eps, gamma, cfg.delta, cfg.activation)
        row["theorem4"]["gamma_rel"] = cfg.gamma_rel
        rows.append(row)
    tstar = max_certified_budget(W, xte, yte, activation=cfg.activation)
    return {
        "clean_accuracy": clean,
        "clean_accuracy_train": clean_train,
        "train_test_gap": clean_train - clean,
        "layer_norms": layer_norms(W).tolist(),
        "max_certified_budget_median": float(tstar.median()),
        "max_certified_budget_mean_correct": float(tstar[tstar > 0].mean()) if (tstar > 0).any() else 0.0,
        "budgets": rows,
    }


def _load(cfg: ExperimentConfig):
    from .data import load_cifar10_subset, load_digits_split

    if cfg.dataset == "digits":
        xtr, ytr, xte, yte, classes = load_digits_split(cfg.seed)
    else:
        xtr, ytr, xte, yte, classes = load_cifar10_subset(cfg.data_path)
    return (xtr, ytr, xte, yte), classes


def run_experiment(cfg: ExperimentConfig, progress=None, log=print, state=None) -> dict:
    """Train standard + robust models, evaluate each; ``progress`` wraps epoch iterators (tqdm).

    ``state`` (an :class:`~setsens.experiments.state.RunState` keyed by ``cfg``) makes the run
    resumable: training is checkpointed every epoch and each model's evaluation is cached.
    """
    torch.manual_seed(cfg.seed)
    data, classes = _load(cfg)
    xtr, ytr, xte, yte = data
    K = len(classes)
    runs = [("standard", 0.0, 0.0)]
    runs.append(("robust", cfg.lam, cfg.mu))
    for lam in cfg.grid_lams:
        for mu in cfg.grid_mus:
            if (lam, mu) != (cfg.lam, cfg.mu):
                runs.append((f"robust_lam{lam:g}_mu{mu:g}", lam, mu))
    models = {}
    for i, (name, lam, mu) in enumerate(runs):
        if state is not None and (cached := state.load(f"model-{name}")) is not None:
            models[name] = cached
            log(f"[{cfg.dataset}] {name}: cached in {state.dir}")
            continue
        t0 = time.time()
        tc = cfg.train_config(lam, mu)
        checkpoint = state.path(f"train-{name}") if state is not None else None
        if checkpoint is not None and checkpoint.exists():
            log(f"[{cfg.dataset}] {name}: training resumes from {checkpoint}")
        model, history = train_mlp(xtr, ytr, K, tc, seed=cfg.seed, progress=progress, checkpoint=checkpoint)
        t_train = time.time() - t0
        gen = torch.Generator().manual_seed(cfg.seed + 1000 + i)
        res = evaluate_model(model_weights(model), data, cfg, gen, detailed=name in ("standard", "robust"))
        res.update({"name": name, "lam": lam, "mu": mu, "train_config": tc.as_dict(),
                    "train_seconds": t_train, "eval_seconds": time.time() - t0 - t_train,
                    "final_epoch": history[-1]})
        models[name] = res
        if state is not None:
            state.save(f"model-{name}", res)
        c1 = next((r["certified_accuracy"] for r in res["budgets"] if r["budget"] == 0.01), float("nan"))
        log(f"[{cfg.dataset}] {name}: clean {res['clean_accuracy']:.3f}, certified@1% {c1:.3f} "
            f"({t_train:.1f}s train, {res['eval_seconds']:.1f}s eval)")
    std, rob = models["standard"], models["robust"]
    summary = {
        "dataset": cfg.dataset,
        "n_train": int(xtr.shape[0]),
        "n_test": int(xte.shape[0]),
        "input_dim": int(xtr.shape[1]),
        "classes": K,
        "budgets": list(cfg.budgets),
    }
    for key, res in (("standard", std), ("robust", rob)):
        summary[key] = {
            "clean_accuracy": res["clean_accuracy"],
            "certified_accuracy": {str(r["budget"]): r["certified_accuracy"] for r in res["budgets"]},
            "attacked_accuracy": {str(r["budget"]): r["attacked_accuracy"] for r in res["budgets"]},
            "random_accuracy_mean": {str(r["budget"]): r["random_accuracy_mean"] for r in res["budgets"]},
        }
    summary["clean_accuracy_cost"] = std["clean_accuracy"] - rob["clean_accuracy"]
    summary["certified_gain"] = {str(a["budget"]): b["certified_accuracy"] - a["certified_accuracy"]
                                 for a, b in zip(std["budgets"], rob["budgets"])}
    return {"config": cfg.as_dict(), "summary": summary, "models": models}


def plot_accuracy_curves(results: dict):
    """Accuracy (clean, certified, attacked, random) vs budget, standard vs robust; returns a figure."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, name in zip(axes, ("standard", "robust")):
        res = results["models"][name]
        b = [100 * r["budget"] for r in res["budgets"]]
        for key, style, label in (("certified_accuracy", "o-", "certified (Thm 2)"),
                                  ("attacked_accuracy", "s--", "box attack (per input)"),
                                  ("random_accuracy_mean", "^:", "random boundary Ŵ (mean)")):
            ax.plot(b, [100 * r[key] for r in res["budgets"]], style, label=label)
        ax.axhline(100 * res["clean_accuracy"], color="gray", lw=0.8, label="clean")
        ax.set_xticks(b)
        ax.set_xticklabels([f"{v:g}" for v in b])
        ax.set_xlabel("budget ε_l / ‖W_l‖_∞  (%)")
        title = "standard training" if name == "standard" else f"robust loss (λ={res['lam']:g}, μ={res['mu']:g})"
        ax.set_title(f"{results['config']['dataset']}: {title}")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy (%)")
    axes[1].legend(loc="lower left", fontsize=8)
    return fig
