"""``setsens weights``: certified robustness to weight perturbations, standard vs robust training.

(With ``--model`` the command certifies a user's own network instead: :mod:`.weights_user`.)

The "What to measure" experiment of WEIGHT-PERTURBATION.md. :func:`run_experiment` trains bias-free
MLPs (standard, then the robust loss for every (λ, μ) in the grid), and for every budget
ε_l = ρ ‖Wˡ‖_∞ in the grid measures on the test set: clean, certified, attacked (per-input box
attack on the weights) and random-perturbation accuracy; the soundness and tightness of the bound
against several attacks; and the Theorem 4 bound next to the measured train–test gaps.  It
returns a JSON-able dict; the command writes the files.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass

import click
import torch

from ..data.cifar import load_cifar10_flat
from ..data.digits import load_digits_split
from ..progress import ProgressFn
from ..weights import (
    TrainConfig,
    attacked_robust,
    box_attack,
    certified_accuracy,
    forward,
    forward_perturbed,
    layer_norms,
    margin_change_bound,
    margins,
    max_certified_budget,
    model_weights,
    random_boundary_perturbation,
    random_perturbation_accuracy,
    relative_budget,
    runner_up,
    theorem4_bound,
    train_mlp,
    weight_attack,
)
from .bars import Bars

__all__ = ["ExperimentConfig", "run_experiment", "evaluate_model", "plot_accuracy_curves", "command",
           "render_report", "load_split"]


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


def load_split(cfg: ExperimentConfig):
    """``((x_train, y_train, x_test, y_test), class names)`` of the experiment's dataset."""
    if cfg.dataset == "digits":
        xtr, ytr, xte, yte, classes = load_digits_split(cfg.seed)
    else:
        xtr, ytr, xte, yte, classes = load_cifar10_flat(cfg.data_path)
    return (xtr, ytr, xte, yte), classes


def run_experiment(cfg: ExperimentConfig, progress: ProgressFn | None = None, log=print, state=None) -> dict:
    """Train standard + robust models, evaluate each; ``progress`` receives each training's epochs
    (:func:`setsens.weights.train_mlp`).

    ``state`` (an :class:`~setsens.experiments.state.RunState` keyed by ``cfg``) makes the run
    resumable: training is checkpointed every epoch and each model's evaluation is cached.
    """
    torch.manual_seed(cfg.seed)
    data, classes = load_split(cfg)
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


def _num(v):
    return "—" if v is None else f"{v:.3f}"


def _pct(v):
    return "n/a" if v is None else f"{100 * v:.1f}"


def render_report(results: dict, command_line: str) -> str:
    """Markdown report: every hyper-parameter, then the measured tables."""
    cfg, s = results["config"], results["summary"]
    L = [f"# Weight perturbations: {cfg['dataset']}", "", f"Command: `{command_line}`", "",
         f"Data: {s['n_train']} training and {s['n_test']} test points, {s['input_dim']} inputs "
         f"(pixels scaled to [0, 1]), {s['classes']} classes.  Bias-free MLP "
         f"{s['input_dim']}-{'-'.join(str(h) for h in cfg['hidden'])}-{s['classes']}, activation {cfg['activation']}.",
         "", "## Hyper-parameters", "", "| parameter | value |", "|---|---|"]
    for k, v in cfg.items():
        L.append(f"| {k} | {v} |")
    L += ["", "Budgets are fractions ρ: ε_l = ρ ‖W_l‖_∞ for every layer, all layers perturbed.  Certified: "
          "m_{yi} > η_{yi} for all i ≠ y (Theorem 2).  Attacked: per-input box attack on the weights "
          "(exact reduced form of the per-input weight attack) towards the attack_targets closest classes.  "
          "Random: one Ŵ drawn with every row of ΔW_l on the ℓ1 sphere of radius ε_l, accuracy averaged "
          "over random_samples draws.", ""]
    L += ["## Accuracy (%) on the test set", "",
          "| model | λ | μ | budget ρ | clean | certified | attacked | random (mean) | random (min) |",
          "|---|---|---|---|---|---|---|---|---|"]
    for name, m in results["models"].items():
        for r in m["budgets"]:
            L.append(f"| {name} | {m['lam']:g} | {m['mu']:g} | {100 * r['budget']:g} % | {_pct(r['clean_accuracy'])} | "
                     f"{_pct(r['certified_accuracy'])} | {_pct(r['attacked_accuracy'])} | "
                     f"{_pct(r['random_accuracy_mean'])} | {_pct(r['random_accuracy_min'])} |")
    L += ["", "Clean-accuracy cost of the robust loss (standard − robust): "
          f"{100 * s['clean_accuracy_cost']:.1f} points.",
          "Certified-accuracy gain (robust − standard): "
          + ", ".join(f"{100 * float(b):g} %: {100 * g:+.1f}" for b, g in s["certified_gain"].items()), ""]
    L += ["## Soundness and tightness of the bound", "",
          "Correctly classified test points, pair (label, runner-up class); ratio = margin change found by the "
          "attack ÷ bound η.  A violation is a change above η (must be 0).  Random: largest ratio over all pairs "
          "for 5 shared random boundary perturbations.", "",
          "| model | budget ρ | attack | points | violations | ratio mean | ratio median | ratio max |",
          "|---|---|---|---|---|---|---|---|"]
    for name in ("standard", "robust"):
        for r in results["models"][name]["budgets"]:
            for att, v in r.get("soundness_tightness", {}).items():
                L.append(f"| {name} | {100 * r['budget']:g} % | {att} | {v['points']} | {v['violations']} | "
                         f"{v['ratio_mean']:.3f} | {_num(v.get('ratio_median'))} | {v['ratio_max']:.3f} |")
    L += ["", "## Theorem 4 (generalization) vs the measured gaps", "",
          "γ = gamma_rel · Π_l M_l · B (M_l the model's norms, B = max ‖x‖_∞ on the training set); δ = "
          f"{cfg['delta']}.  The bound is on Pr[∃ Ŵ ∈ B_ε misclassifying x]; beside it the measured test "
          "robust error (1 − attacked accuracy, a lower estimate) and certified error (an upper estimate), and "
          "the clean and certified train–test gaps.", "",
          "| model | budget ρ | emp. surrogate loss | R_S bound | confidence | Thm 4 bound | test error (attacked) | "
          "test error (uncertified) | clean gap | certified gap |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name in ("standard", "robust"):
        m = results["models"][name]
        for r in m["budgets"]:
            t = r["theorem4"]
            L.append(f"| {name} | {100 * r['budget']:g} % | {t['empirical_surrogate_loss']:.3f} | "
                     f"{t['rademacher']:.3g} | "
                     f"{t['confidence_term']:.3f} | {t['bound']:.3g} | {1 - r['attacked_accuracy']:.3f} | "
                     f"{1 - r['certified_accuracy']:.3f} | {m['train_test_gap']:.3f} | "
                     f"{r['certified_accuracy_train'] - r['certified_accuracy']:.3f} |")
    L += ["", "## Models", "", "| model | λ | μ | layer norms M_l | median largest certified ρ (test) | "
          "train s | eval s | final-epoch loss parts |", "|---|---|---|---|---|---|---|---|"]
    for name, m in results["models"].items():
        fe = {k: round(v, 4) for k, v in m["final_epoch"].items() if k != "epoch"}
        L.append(f"| {name} | {m['lam']:g} | {m['mu']:g} | {', '.join(f'{v:.3g}' for v in m['layer_norms'])} | "
                 f"{100 * m['max_certified_budget_median']:.3g} % | {m['train_seconds']:.1f} | "
                 f"{m['eval_seconds']:.1f} | {fe} |")
    L += ["", "Figure: `accuracy_vs_budget.png`.", ""]
    return "\n".join(L)


@click.command("weights")
@click.option("--model", "model_spec", help="Certify your own network instead of running the paper's experiment: "
              "FILE.py:FUNCTION or package.module:FUNCTION returning an nn.Module (as for `setsens analyze`).")
@click.option("--checkpoint", type=click.Path(dir_okay=False), help="With --model: its state dict (or a trusted "
              "pickled module).")
@click.option("--trust-checkpoint", is_flag=True, help="With --model: allow unpickling a whole module (runs its code).")
@click.option("--epsilons", default="1e-6,1e-5,1e-4,1e-3,1e-2", show_default=True,
              help="With --model: relative budgets ε (‖ΔW_l‖_∞ ≤ ε ‖W_l‖_∞ for every layer), comma-separated, > 0.")
@click.option("--points", type=click.IntRange(1), default=500, show_default=True,
              help="With --model: at most this many held-out points (training points if the data has none).")
@click.option("--attack-points", type=click.IntRange(0), default=20, show_default=True,
              help="With --model: certified (and as many uncertified) points attacked at each ε (0 = no attack).")
@click.option("--dtype", type=click.Choice(["float32", "float64"]),
              help="With --model: the precision of the network [default: the model's]; float64 reaches budgets "
              "below float32's range (1e-38), which a deep network's bound may need.")
@click.option("--dataset", type=click.Choice(["digits", "cifar10"]), default="digits", show_default=True)
@click.option("--data", "data_path", default="../shared/data/cifar10-subset.npz", show_default=True,
              help="CIFAR-10 subset .npz (for --dataset cifar10); with --model your data, as for `setsens analyze`: "
              ".npz (x, y[, x_test, y_test]), an image folder or FILE.py:FUNCTION.")
@click.option("--out", default="setsens-weights-report", show_default=True,
              help="Report directory (its parent must exist; a killed run resumes from it).")
@click.option("--seed", type=click.IntRange(0), default=0, show_default=True)
@click.option("--quick", is_flag=True, help="Tiny configuration (for tests): few epochs, small grid, weak attacks.")
@click.option("--budgets", default="0,0.005,0.01,0.02,0.05", show_default=True,
              help="Fractions ρ of each layer's norm.")
@click.option("--lam", type=click.FloatRange(0), default=0.1, show_default=True, help="λ of the main robust model.")
@click.option("--mu", type=click.FloatRange(0), default=0.0, show_default=True, help="μ of the main robust model.")
@click.option("--grid-lams", default="0.03,0.1,0.3", show_default=True,
              help="λ grid of extra robust models ('' = none).")
@click.option("--grid-mus", default="0,0.001", show_default=True, help="μ grid of extra robust models.")
@click.option("--train-budget", type=click.FloatRange(0), default=0.01, show_default=True,
              help="Training budget ρ of the hinge.")
@click.option("--variant", type=click.Choice(["hinge", "hinge_normalized", "max_eta"]), default="hinge",
              show_default=True)
@click.option("--epochs", type=click.IntRange(1), default=None, help="Training epochs per model [60; quick 8].")
@click.option("--hidden", default="128", show_default=True, help="Hidden widths, comma-separated (e.g. 128,128).")
@click.option("--activation", type=click.Choice(["relu", "relu6", "clip1"]), default="relu", show_default=True)
@click.option("--lr", type=click.FloatRange(0, min_open=True), default=2e-3, show_default=True)
@click.option("--batch-size", type=click.IntRange(1), default=128, show_default=True,
              help="Training minibatch; with --model the points evaluated (and attacked) at once.")
@click.option("--attack-steps", type=click.IntRange(1), default=40, show_default=True,
              help="Box-attack steps; with --model the weight-space PGD steps of the attack check.")
@click.option("--attack-restarts", type=click.IntRange(1), default=2, show_default=True)
@click.option("--attack-targets", type=click.IntRange(1), default=None,
              help="Closest classes attacked per input (default all).")
@click.option("--weight-attack-points", type=click.IntRange(0), default=100, show_default=True,
              help="Test points for the weight-space PGD / Frank–Wolfe attacks (0 = skip).")
@click.option("--weight-attack-steps", type=click.IntRange(1), default=100, show_default=True)
@click.option("--random-samples", type=click.IntRange(1), default=20, show_default=True,
              help="Random boundary perturbations per budget (accuracy under random Ŵ).")
@click.option("--gamma-rel", type=click.FloatRange(0, min_open=True), default=0.05, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the summary JSON to stdout.")
def command(model_spec, checkpoint, trust_checkpoint, epsilons, points, attack_points, dtype, dataset, data_path, out,
            seed, quick, budgets, lam, mu, grid_lams, grid_mus, train_budget, variant, epochs, hidden, activation, lr,
            batch_size, attack_steps, attack_restarts, attack_targets, weight_attack_points, weight_attack_steps,
            random_samples, gamma_rel, as_json):
    """Certified margins, certified/attacked accuracy, Theorem 4 and robust training (weight perturbations); with
    --model, certified fraction against ε, dominant layers and the attack check for your own network."""
    from ..report import prepare_out_dir, save_figure, write_json, write_text
    from . import weights_user
    from .options import npz_lengths, number_list
    from .state import RunState

    eps = weights_user.check_options(click.get_current_context(), model_spec, epsilons)
    if model_spec is not None:
        return weights_user.run(model_spec, checkpoint, trust_checkpoint, data_path, eps, points, attack_points,
                                attack_steps, seed, batch_size, out, as_json, dtype)
    if dataset == "cifar10":
        npz_lengths(data_path, ("train_x", "train_y", "test_x", "test_y"), "--data")
    kw = dict(dataset=dataset, data_path=data_path, seed=seed, hidden=number_list(hidden, "--hidden", int, 1),
              activation=activation, epochs=epochs if epochs is not None else (8 if quick else 60), lr=lr,
              batch_size=batch_size, budgets=number_list(budgets, "--budgets", float, 0), lam=lam, mu=mu,
              train_budget=train_budget, variant=variant,
              grid_lams=number_list(grid_lams, "--grid-lams", float, 0) if grid_lams.strip() else (),
              grid_mus=number_list(grid_mus, "--grid-mus", float, 0), attack_steps=attack_steps,
              attack_restarts=attack_restarts, attack_targets=attack_targets, weight_attack_points=weight_attack_points,
              weight_attack_steps=weight_attack_steps, random_samples=random_samples, gamma_rel=gamma_rel)
    if quick:
        if budgets == "0,0.005,0.01,0.02,0.05":
            kw["budgets"] = (0.0, 0.01)
        kw.update(hidden=(16,), grid_lams=(), attack_steps=5, attack_restarts=1, attack_targets=2, random_samples=2,
                  weight_attack_points=10, weight_attack_steps=5, ramp_epochs=2)
    cfg = ExperimentConfig(**kw)
    out_dir = prepare_out_dir(out)
    log = (lambda msg: click.echo(msg, err=True))
    with Bars({"epoch": "epochs"}, enabled=not quick) as bars:
        results = run_experiment(cfg, progress=bars, log=log, state=RunState(out_dir, cfg))
    command_line = "setsens weights " + " ".join(sys.argv[2:]) if len(sys.argv) > 1 else "setsens weights"
    results["command"] = command_line
    write_json(out_dir / "results.json", results)
    write_text(out_dir / "report.md", render_report(results, command_line))
    save_figure(plot_accuracy_curves(results), out_dir / "accuracy_vs_budget.png")
    if as_json:
        click.echo(json.dumps(results["summary"], indent=2))
    else:
        click.echo(f"report written to {out_dir}/ (report.md, results.json, accuracy_vs_budget.png)")
