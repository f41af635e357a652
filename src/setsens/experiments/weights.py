"""``setsens weights``: certified robustness to weight perturbations, standard vs robust training."""

from __future__ import annotations

import json
import sys

import click

__all__ = ["command", "render_report"]


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
    L += ["", f"Clean-accuracy cost of the robust loss (standard − robust): {100 * s['clean_accuracy_cost']:.1f} points.",
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
            L.append(f"| {name} | {100 * r['budget']:g} % | {t['empirical_surrogate_loss']:.3f} | {t['rademacher']:.3g} | "
                     f"{t['confidence_term']:.3f} | {t['bound']:.3g} | {1 - r['attacked_accuracy']:.3f} | "
                     f"{1 - r['certified_accuracy']:.3f} | {m['train_test_gap']:.3f} | "
                     f"{r['certified_accuracy_train'] - r['certified_accuracy']:.3f} |")
    L += ["", "## Models", "", "| model | λ | μ | layer norms M_l | median largest certified ρ (test) | "
          "train s | eval s | final-epoch loss parts |", "|---|---|---|---|---|---|---|---|"]
    for name, m in results["models"].items():
        fe = {k: round(v, 4) for k, v in m["final_epoch"].items() if k != "epoch"}
        L.append(f"| {name} | {m['lam']:g} | {m['mu']:g} | {', '.join(f'{v:.3g}' for v in m['layer_norms'])} | "
                 f"{100 * m['max_certified_budget_median']:.3g} % | {m['train_seconds']:.1f} | {m['eval_seconds']:.1f} | {fe} |")
    L += ["", "Figure: `accuracy_vs_budget.png`.", ""]
    return "\n".join(L)


@click.command("weights")
@click.option("--dataset", type=click.Choice(["digits", "cifar10"]), default="digits", show_default=True)
@click.option("--data", "data_path", default="../shared/data/cifar10-subset.npz", show_default=True,
              help="CIFAR-10 subset .npz (for --dataset cifar10).")
@click.option("--out", default="setsens-weights-report", show_default=True,
              help="Report directory (its parent must exist; a killed run resumes from it).")
@click.option("--seed", type=click.IntRange(0), default=0, show_default=True)
@click.option("--quick", is_flag=True, help="Tiny configuration (for tests): few epochs, small grid, weak attacks.")
@click.option("--budgets", default="0,0.005,0.01,0.02,0.05", show_default=True, help="Fractions ρ of each layer's norm.")
@click.option("--lam", type=click.FloatRange(0), default=0.1, show_default=True, help="λ of the main robust model.")
@click.option("--mu", type=click.FloatRange(0), default=0.0, show_default=True, help="μ of the main robust model.")
@click.option("--grid-lams", default="0.03,0.1,0.3", show_default=True, help="λ grid of extra robust models ('' = none).")
@click.option("--grid-mus", default="0,0.001", show_default=True, help="μ grid of extra robust models.")
@click.option("--train-budget", type=click.FloatRange(0), default=0.01, show_default=True, help="Training budget ρ of the hinge.")
@click.option("--variant", type=click.Choice(["hinge", "hinge_normalized", "max_eta"]), default="hinge", show_default=True)
@click.option("--epochs", type=click.IntRange(1), default=None, help="Training epochs per model [60; quick 8].")
@click.option("--hidden", default="128", show_default=True, help="Hidden widths, comma-separated (e.g. 128,128).")
@click.option("--activation", type=click.Choice(["relu", "relu6", "clip1"]), default="relu", show_default=True)
@click.option("--lr", type=click.FloatRange(0, min_open=True), default=2e-3, show_default=True)
@click.option("--batch-size", type=click.IntRange(1), default=128, show_default=True)
@click.option("--attack-steps", type=click.IntRange(1), default=40, show_default=True)
@click.option("--attack-restarts", type=click.IntRange(1), default=2, show_default=True)
@click.option("--attack-targets", type=click.IntRange(1), default=None, help="Closest classes attacked per input (default all).")
@click.option("--weight-attack-points", type=click.IntRange(0), default=100, show_default=True,
              help="Test points for the weight-space PGD / Frank–Wolfe attacks (0 = skip).")
@click.option("--weight-attack-steps", type=click.IntRange(1), default=100, show_default=True)
@click.option("--random-samples", type=click.IntRange(1), default=20, show_default=True,
              help="Random boundary perturbations per budget (accuracy under random Ŵ).")
@click.option("--gamma-rel", type=click.FloatRange(0, min_open=True), default=0.05, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the summary JSON to stdout.")
def command(dataset, data_path, out, seed, quick, budgets, lam, mu, grid_lams, grid_mus, train_budget, variant,
            epochs, hidden, activation, lr, batch_size, attack_steps, attack_restarts, attack_targets,
            weight_attack_points, weight_attack_steps, random_samples, gamma_rel, as_json):
    """Certified margins, certified/attacked accuracy, Theorem 4 and robust training (weight perturbations)."""
    from tqdm import tqdm

    from ..report import prepare_out_dir, save_figure, write_json, write_text
    from ..weights.experiment import ExperimentConfig, plot_accuracy_curves, run_experiment
    from .options import npz_lengths, number_list
    from .state import RunState

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
    progress = (lambda it: tqdm(it, desc="epochs", leave=False, file=sys.stderr, disable=quick))
    results = run_experiment(cfg, progress=progress, log=log, state=RunState(out_dir, cfg))
    command_line = "setsens weights " + " ".join(sys.argv[2:]) if len(sys.argv) > 1 else "setsens weights"
    results["command"] = command_line
    write_json(out_dir / "results.json", results)
    write_text(out_dir / "report.md", render_report(results, command_line))
    save_figure(plot_accuracy_curves(results), out_dir / "accuracy_vs_budget.png")
    if as_json:
        click.echo(json.dumps(results["summary"], indent=2))
    else:
        click.echo(f"report written to {out_dir}/ (report.md, results.json, accuracy_vs_budget.png)")
