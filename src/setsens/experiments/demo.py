"""The main job: the toy reproduction, then a real-data study judged against an exact reference.

Real-data study (no download): scikit-learn digits, an overparameterized bias-free ReLU MLP with
squared loss to one-hot targets, trained in float64 to a stationary point; 10 training points
moved along their loss gradient by 1 % of their norm.  Per seed, three estimates — the
Gauss–Newton form of DS(x̄|w̄)(Δx) (the estimated set), eq. 19 on H (minimum-norm MINRES), and the
damped influence function — are judged by their distance to the new solution set.

The reference.  At a zero-residual squared-error fit with a full-row-rank output Jacobian, the new
solution set near w̄ is the manifold {w : f(xᵖ_i, w) = y_i ∀i}.  Warm-started Levenberg–Marquardt
retraining converges quadratically onto it, to an exact point (its distance from the start does not
change when the tolerance is tightened 100×: checked and reported in every run), and every step
lies in the row space of the residual Jacobian, so it moves across the manifold, not along it.  That
distance is the reference "distance to the new solution set".  (L-BFGS stalls near ‖∇L‖ ≈ 1e-7 on
this problem and its end point moves with the tolerance.)

"Overparameterized" is checked, not assumed: the report gives the singular values of the n·K × p
output Jacobian.  Headline figures are reported over seeds (median, min, max): a single trained w̄
is one draw, and the figure moves with it.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass

import click
import torch

from ..data import load_digits_subset
from ..models import mlp
from ..operators import dense_output_jacobian
from ..perturb import gradient_perturbation
from ..problem import Problem, squared_error
from ..progress import ProgressFn, counted
from ..retrain import levenberg_marquardt, retrain
from ..solution_set import SolveOptions, estimate
from ..training import adam_steps
from .bars import Bars
from .seeds import distribution, parse_seeds

#: The demo's progress stages, as its bars name them.
LABELS = {"adam": "train (Adam)", "iteration": "solve", "candidate": "scored candidates", "reference": "reference",
          "members": "members"}


@dataclass
class DemoConfig:
    n: int = 100
    widths: tuple = (64, 64, 64, 10)
    points: int = 10
    step: float = 0.01
    seed: int = 0
    adam_steps: int = 1000
    lbfgs_iters: int = 3000
    maxiter: int = 1000  # Gauss–Newton (CGLS) iterations at most
    hessian_maxiter: int = 400  # MINRES iterations per solve at most (eq. 19, influence)
    members: int = 5  # members of the set retrained in the set-versus-retraining study
    influence_damping: float = 1e-4  # relative to λ_max


def demo_problem(cfg: DemoConfig, params=None) -> Problem:
    """The demo's problem: its digits and its network (seeded initialisation) at ``params`` (default:
    the initial ones).  Seeds torch's global generator, as training does."""
    torch.manual_seed(cfg.seed)
    x, y = load_digits_subset(cfg.n, seed=cfg.seed)
    return Problem(mlp(list(cfg.widths)).double(), squared_error, (x, y), params=params, batch_size=cfg.n)


def train_stationary(cfg: DemoConfig, progress: ProgressFn | None = None) -> Problem:
    """Adam, full-batch L-BFGS in float64, then Levenberg–Marquardt onto an exact interpolating fit.

    The last step matters: L-BFGS stops at a risk near 1e-8 whose residual, divided by the smallest
    singular value of the output Jacobian, is a move of the size of a 1 % perturbation's — a
    reference would then measure w̄'s own misfit, not the perturbation.  LM lands on S(x̄) itself
    (risk ~1e-23), the setting of the first-order theory.
    """
    problem = demo_problem(cfg)
    w = problem.params.clone().requires_grad_(True)
    batch = next(problem.batches())
    adam_steps([w], lambda: problem.batch_risk(w, *batch), cfg.adam_steps, progress=progress)
    fit = retrain(problem, w.detach(), gtol=1e-12, max_iter=cfg.lbfgs_iters)
    fit = levenberg_marquardt(problem, fit.w, gtol=1e-13)
    return Problem(problem.model, squared_error, (problem.inputs, problem.targets), params=fit.w, batch_size=cfg.n)


def movable_points(problem: Problem, k: int) -> torch.Tensor:
    """The first ``k`` training points whose loss has a non-zero input gradient (so they can move)."""
    x, y = problem.points(torch.arange(problem.n))
    g = torch.func.grad(lambda x: problem.per_sample_loss(problem.params, x, y).sum())(x)
    ok = torch.nonzero(g.reshape(problem.n, -1).norm(dim=1) > 0).reshape(-1)
    if ok.numel() < k:
        raise ValueError(f"only {ok.numel()} training points have a non-zero loss gradient; asked for {k}")
    return ok[:k]


def overparameterization(problem: Problem, max_entries: float = 5e7) -> dict | None:
    """Singular values of the n·K × p output Jacobian at w̄ (None if it has > ``max_entries``).

    ``rank`` uses NumPy's default tolerance (σ > σ_max·max(nK, p)·eps); ``full_row_rank`` says
    whether S(x̄) is, to first order, a manifold of codimension n·K near w̄.
    """
    with torch.no_grad():
        rows = problem.n * problem.outputs(problem.params, problem.points([0])[0]).numel()
    if rows * problem.p > max_entries:
        return None
    s = torch.linalg.svdvals(dense_output_jacobian(problem))
    tol = float(s[0]) * max(rows, problem.p) * torch.finfo(s.dtype).eps
    rank = int((s > tol).sum())
    return {"rows": rows, "p": problem.p, "rank": rank, "full_row_rank": rank == rows,
            "sigma_max": float(s[0]), "sigma_min": float(s[-1]), "sigma_ratio": float(s[-1] / s[0])}


def run_seed(cfg: DemoConfig, progress: ProgressFn | None = None, log=print) -> dict:
    """One seed of the real-data study; returns every number of its report."""
    t0 = time.perf_counter()
    log(f"seed {cfg.seed}: training the digits MLP to a stationary point (float64) …")
    problem = train_stationary(cfg, progress)
    stat = problem.stationarity(warn=False)
    K = movable_points(problem, cfg.points)
    pert = gradient_perturbation(problem, K, cfg.step)
    w_bar = problem.params
    over = overparameterization(problem)

    log("  estimating: Gauss–Newton set, eq. 19 (minimum-norm MINRES), damped influence function …")
    ests = {
        "estimate": estimate(problem, pert, "gauss-newton", progress=progress,
                             solve=SolveOptions(maxiter=cfg.maxiter, check_every=10, patience=10)),
        "hessian": estimate(problem, pert, "hessian", solve=SolveOptions(maxiter=cfg.hessian_maxiter),
                            progress=progress),
        "influence": estimate(problem, pert, "influence", solve=SolveOptions(
            maxiter=cfg.hessian_maxiter, influence_damping=cfg.influence_damping)),
    }
    est = ests["estimate"]

    log("  reference: warm-started Levenberg–Marquardt retraining from each candidate …")
    candidates = {"original": w_bar, **{name: e.centre for name, e in ests.items()}}
    ref = {name: levenberg_marquardt(problem, w, pert, gtol=1e-11)
           for name, w in counted(progress, list(candidates.items()), "reference")}
    loose = levenberg_marquardt(problem, w_bar, pert, gtol=1e-9)
    d0 = ref["original"].distance
    reference = {"method": "warm-started Levenberg–Marquardt retraining (gtol 1e-11)",
                 "converged": all(r.converged for r in ref.values()),
                 "change_when_tolerance_tightened_100x": abs(loose.distance - d0) / d0}

    log(f"  set versus retraining: Levenberg–Marquardt from {cfg.members} members of the set …")
    members = est.sample(cfg.members, torch.Generator().manual_seed(cfg.seed))
    study = []
    for m in counted(progress, members, "members"):
        landed = levenberg_marquardt(problem, m, pert, gtol=1e-11)
        study.append({"member_to_centre": float((m - est.centre).norm()),
                      "retrained_to_set": est.distance(landed.w),
                      "retrained_to_centre": float((landed.w - est.centre).norm()),
                      "member_to_new_set": landed.distance})
    ratios = [s["retrained_to_set"] / s["retrained_to_centre"] for s in study]

    def row(name, w):
        return {"loss_perturbed_points": problem.loss_on(K, w, pert), "risk_perturbed_data": problem.risk(w, pert),
                "shift_norm": float((w - w_bar).norm()),
                "distance_to_new_set": ref[name].distance if name in ref else 0.0}

    rows = {name: row(name, w) for name, w in candidates.items()}
    rows["retrained"] = row("retrained", ref["original"].w)
    loss0 = rows["original"]["loss_perturbed_points"]
    res = {
        "config": asdict(cfg), "p": problem.p, "n": problem.n, "stationarity": stat,
        "overparameterization": over, "perturbation_norm": pert.norm(),
        "estimates": {name: e.summary() for name, e in ests.items()},
        "validation_path": est.path, "rows": rows, "reference": reference,
        "set_vs_retraining": {"members": study, "distance_to_set_over_distance_to_centre": statistics.median(ratios),
                              "null_radius": est.null_radius, "radius": est.radius},
        "seconds": 0.0,
    }
    for name, prefix in (("estimate", ""), ("hessian", "hessian_"), ("influence", "influence_")):
        res[prefix + "distance_ratio"] = rows[name]["distance_to_new_set"] / d0
        res[prefix + "loss_reduction"] = loss0 / max(rows[name]["loss_perturbed_points"], 1e-300)
    res["set_vs_retraining_ratio"] = statistics.median(ratios)
    res["seconds"] = time.perf_counter() - t0
    return res


def run_demo(cfg: DemoConfig, seeds: list[int], progress: ProgressFn | None = None, log=print) -> dict:
    """The study for every seed, and each headline figure as a distribution over the seeds."""
    per_seed = [run_seed(DemoConfig(**{**asdict(cfg), "seed": s}), progress, log) for s in seeds]
    keys = [k for k in per_seed[0]
            if k.endswith(("distance_ratio", "loss_reduction")) or k == "set_vs_retraining_ratio"]
    return {"seeds": seeds, "headlines": {k: distribution([r[k] for r in per_seed]) for k in keys},
            "per_seed": per_seed}


def _fmt(d: dict, spec: str) -> str:
    return f"**{d['median']:{spec}}** ({d['min']:{spec}} – {d['max']:{spec}})"


def demo_markdown(result: dict) -> str:
    """The report: headline distributions, then one table per seed."""
    h, first = result["headlines"], result["per_seed"][0]
    c = first["config"]
    lines = [f"# setsens demo — digits MLP, {c['points']} points moved {100 * c['step']:g} % along their loss gradient",
             "",
             f"Network {list(c['widths'])} (bias-free ReLU, squared loss to one-hot targets), n = {first['n']} digits, "
             f"p = {first['p']} weights, float64; seeds {', '.join(map(str, result['seeds']))}.",
             "",
             "Headline figures over seeds: **median** (min – max).  distance ratio = distance of the estimate to the",
             "new solution set ÷ that of w̄ (warm-started Levenberg–Marquardt retraining); "
             "loss reduction = loss on the moved",
             "points at w̄ ÷ at the estimate.",
             "",
             "| estimate | distance ratio | loss reduction |", "|---|---|---|"]
    for label, prefix in (("Gauss–Newton set (centre)", ""), ("eq. 19 on H (min-norm MINRES)", "hessian_"),
                          ("damped influence function", "influence_")):
        lines.append(f"| {label} | {_fmt(h[prefix + 'distance_ratio'], '.3f')} | "
                     f"{_fmt(h[prefix + 'loss_reduction'], '.1f')}× |")
    lines += ["", f"Set versus retraining (Levenberg–Marquardt warm-started from {c['members']} members of the set):",
              "distance of the retrained point to the estimated set ÷ to its centre: "
              f"{_fmt(h['set_vs_retraining_ratio'], '.3f')}.", ""]
    for r in result["per_seed"]:
        lines.append(_seed_markdown(r))
    return "\n".join(lines)


def _seed_markdown(r: dict) -> str:
    o, e, ref = r.get("overparameterization"), r["estimates"]["estimate"], r["reference"]
    over = ("" if o is None else f"Output Jacobian {o['rows']} × {o['p']}: rank {o['rank']} "
            f"({'full row rank' if o['full_row_rank'] else 'NOT full row rank'}), "
            f"σ_min/σ_max = {o['sigma_ratio']:.1e}.  ")
    lines = [f"## seed {r['config']['seed']}", "",
             f"At w̄: ‖∇L‖ = {r['stationarity']['grad_norm']:.2e}, risk {r['stationarity']['risk']:.2e}.  {over}"
             f"‖Δx‖ = {r['perturbation_norm']:.4f}.", "",
             "| solution | loss on moved points | risk on perturbed data | ‖w − w̄‖ | distance to new set |",
             "|---|---|---|---|---|"]
    for name, x in r["rows"].items():
        lines.append(f"| {name} | {x['loss_perturbed_points']:.3e} | {x['risk_perturbed_data']:.3e} | "
                     f"{x['shift_norm']:.4f} | {x['distance_to_new_set']:.4f} |")
    sv = r["set_vs_retraining"]
    lines += ["",
              f"* distance ratio {r['distance_ratio']:.3f} (eq. 19: {r['hessian_distance_ratio']:.3f}, influence: "
              f"{r['influence_distance_ratio']:.3f}); loss reduction {r['loss_reduction']:.1f}×",
              f"* the set: ‖v₀‖ = {e['shift_norm']:.4f}, members reach ρ = {e['null_radius']:.4f} along the null space "
              f"of G (r = {e['radius']:.4f}); output residual {e['output_residual']:.1e}, eq.-19 feasibility residual "
              f"{e['feasibility_residual']:.1e}; {e['cost']['jvp_vjp_passes']} JVP/VJP passes, {e['selected']}",
              "* retrained from members: to the set / to the centre = "
              + ", ".join(f"{s['retrained_to_set']:.4f} / {s['retrained_to_centre']:.4f}" for s in sv["members"]),
              f"* reference: {ref['method']}; converged {ref['converged']}; "
              f"moves {ref['change_when_tolerance_tightened_100x']:.1e} "
              f"(relative) when its tolerance is tightened 100×.  {r['seconds']:.0f} s.", ""]
    return "\n".join(lines)


def demo_figures(result: dict, out) -> list:
    """Distance ratios per method over seeds; set versus retraining."""
    import matplotlib.pyplot as plt

    from ..report import save_figure

    h = result["headlines"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    labels = ["Gauss–Newton set", "eq. 19 (H)", "influence"]
    for i, key in enumerate(("distance_ratio", "hessian_distance_ratio", "influence_distance_ratio")):
        vals = h[key]["per_seed"]
        axes[0].plot([i] * len(vals), vals, "o", alpha=0.7)
        axes[0].plot([i - 0.2, i + 0.2], [h[key]["median"]] * 2, "k-")
    axes[0].set(xticks=range(3), xticklabels=labels, ylabel="distance to new set ÷ w̄'s",
                title=f"over seeds {result['seeds']} (bar: median)")
    to_set = [s["retrained_to_set"] for r in result["per_seed"] for s in r["set_vs_retraining"]["members"]]
    to_centre = [s["retrained_to_centre"] for r in result["per_seed"] for s in r["set_vs_retraining"]["members"]]
    axes[1].plot(to_centre, to_set, "o")
    top = max(to_centre + to_set) * 1.05
    axes[1].plot([0, top], [0, top], "k--", lw=1, label="equal")
    axes[1].set(xlabel="retrained member → centre", ylabel="retrained member → estimated set",
                title="retraining from members of the set")
    axes[1].legend()
    return [save_figure(fig, out / "demo_distributions.png")]


@click.command("demo")
@click.option("--out", default="setsens-report", show_default=True, type=click.Path(),
              help="Report directory (its parent must exist).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON on stdout.")
@click.option("--points", default=10, show_default=True, type=click.IntRange(1),
              help="Number of perturbed training points.")
@click.option("--step", default=0.01, show_default=True, type=click.FloatRange(0, 0.5, min_open=True),
              help="Step as a fraction of each point's norm.")
@click.option("--seeds", default="0,1,2,3,4", show_default=True,
              help="Comma-separated seeds; headline figures are reported as median, min and max over them.")
@click.option("--n", "n", default=100, show_default=True, type=click.IntRange(10, 1797),
              help="Number of training digits.")
@click.option("--widths", default="64,64,64,10", show_default=True,
              help="Layer widths of the bias-free ReLU MLP (input 64, output 10).")
@click.option("--quick", is_flag=True, help="A small configuration (for tests): 40 digits, 64-32-10, one seed.")
def command(out, as_json, n, points, step, seeds, widths, quick):
    """Toy reproduction, then the digits study over seeds, judged against the exact new solution set."""
    from ..report import prepare_out_dir, to_jsonable, write_json, write_text
    from .toy import figures as toy_figures, toy_markdown, toy_study

    seeds = parse_seeds(seeds)
    try:
        widths = tuple(int(w) for w in widths.split(","))
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {widths!r}", param_hint="--widths") from None
    if len(widths) < 2 or widths[0] != 64 or widths[-1] != 10 or min(widths) < 1:
        raise click.BadParameter("widths must start with 64 (digit pixels), end with 10 (classes), all ≥ 1",
                                 param_hint="--widths")
    if points > n:
        raise click.BadParameter(f"{points} points asked for, but there are only {n} training digits",
                                 param_hint="--points")
    cfg = DemoConfig(n=n, widths=widths, points=points, step=step)
    if quick:
        cfg = DemoConfig(n=40, widths=(64, 32, 10), points=min(points, 5), step=step, adam_steps=300,
                         lbfgs_iters=1000, maxiter=300, hessian_maxiter=100, members=2)
        seeds = seeds[:1]
    out = prepare_out_dir(out)
    log = (lambda *a: click.echo(*a, err=True)) if as_json else click.echo
    toy = toy_study()
    toy["figures"] = [str(p) for p in toy_figures(toy, out)]
    write_json(out / "toy.json", toy)
    write_text(out / "toy.md", toy_markdown(toy))
    log(f"toy: ‖v₀‖ = {toy['min_norm_shift']:.6f}, risk {toy['risk_original']:.4f} → {toy['risk_min_norm']:.6f}")
    with Bars(LABELS, enabled=not as_json, units={"candidate": "check"}) as bars:
        result = run_demo(cfg, seeds, progress=bars, log=log)
    result["figures"] = [str(p) for p in demo_figures(result, out)]
    write_json(out / "results.json", {"toy": toy, "digits": result})
    write_text(out / "report.md", toy_markdown(toy) + "\n\n" + demo_markdown(result))
    h = result["headlines"]
    summary = {
        "seeds": seeds,
        "distance_ratio": h["distance_ratio"],
        "loss_reduction": h["loss_reduction"],
        "hessian_distance_ratio": h["hessian_distance_ratio"],
        "influence_distance_ratio": h["influence_distance_ratio"],
        "influence_loss_reduction": h["influence_loss_reduction"],
        "set_vs_retraining": {"distance_to_set_over_distance_to_centre": h["set_vs_retraining_ratio"]["median"],
                              "per_seed": h["set_vs_retraining_ratio"]["per_seed"]},
        "reference_change_when_tightened_100x": max(r["reference"]["change_when_tolerance_tightened_100x"]
                                                   for r in result["per_seed"]),
        "output_jacobian": result["per_seed"][0]["overparameterization"],
        "toy_min_norm_shift": toy["min_norm_shift"],
        "report": str(out / "report.md"),
    }
    if as_json:
        click.echo(json.dumps(to_jsonable(summary), indent=2))
    else:
        click.echo(demo_markdown(result))
        click.echo(f"report written to {out / 'report.md'}")
