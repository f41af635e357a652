"""The main job: the toy reproduction, then a real-data study judged against retraining.

Real-data study (no download): scikit-learn digits, an overparameterized bias-free ReLU MLP with
squared loss to one-hot targets, trained in float64 to a stationary point; 10 training points
moved along their loss gradient by 1 % of their norm.  The matrix-free estimate of the new
solution set is compared with the damped influence function and with warm-started retraining.

"Overparameterized" is checked, not assumed: the report gives the singular values of the n·K × p
output Jacobian.  The first-order theory describes S(x̄) near w̄ as a smooth manifold of
codimension n·K, which needs that Jacobian to have full row rank; the default (100 digits,
64-64-64-10, p = 8832 ≫ n·K = 1000) has it, with σ_min/σ_max ≈ 2e-3.  With 300 digits and
64-32-32-10 the numerical rank is about 1000 of 3000 rows, the fit of most outputs is
ill-determined, and the best first-order estimate measured there stays at 0.36 of w̄'s distance
to the new set (see the README).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass

import click
import torch

from ..data import load_digits_subset
from ..influence import influence_shift
from ..models import mlp
from ..perturb import gradient_perturbation
from ..problem import Problem, squared_error
from ..retrain import retrain
from ..solution_set import estimate_solution_set, newton_corrector
from ..solvers import top_eigenvalue
from ..operators import Hessian, dense_output_jacobian


@dataclass
class DemoConfig:
    n: int = 100
    widths: tuple = (64, 64, 64, 10)
    points: int = 10
    step: float = 0.01
    seed: int = 0
    adam_steps: int = 1000
    lbfgs_iters: int = 3000
    retrain_iters: int = 3000
    retrain_gtol: float = 1e-10
    maxiter: int = 400
    corrector_steps: int = 1
    influence_damping: float = 1e-4  # relative to λ_max


def train_stationary(cfg: DemoConfig, progress: bool = True) -> Problem:
    """Adam, then full-batch L-BFGS in float64 towards a stationary point."""
    from tqdm.auto import tqdm

    torch.manual_seed(cfg.seed)
    x, y = load_digits_subset(cfg.n, seed=cfg.seed)
    model = mlp(list(cfg.widths)).double()
    problem = Problem(model, squared_error, (x, y), batch_size=cfg.n)
    w = problem.params.clone().requires_grad_(True)
    opt = torch.optim.Adam([w], lr=1e-2)
    batch = next(problem.batches())
    for _ in tqdm(range(cfg.adam_steps), desc="train (Adam)", disable=not progress, leave=False):
        opt.zero_grad()
        problem.batch_risk(w, *batch).backward()
        opt.step()
    fit = retrain(problem, w.detach(), gtol=1e-12, max_iter=cfg.lbfgs_iters)
    return Problem(model, squared_error, (x, y), params=fit.w, batch_size=cfg.n)


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
            "sigma_max": float(s[0]), "sigma_min": float(s[-1]), "sigma_ratio": float(s[-1] / s[0]),
            "rank_at_1e-4": int((s > 1e-4 * s[0]).sum())}


def run_demo(cfg: DemoConfig, progress: bool = True, log=print) -> dict:
    """Run the real-data study; returns every number of the report."""
    t0 = time.perf_counter()
    log("training the digits MLP to a stationary point (float64) …")
    problem = train_stationary(cfg, progress)
    stat = problem.stationarity(warn=False)
    K = movable_points(problem, cfg.points)
    pert = gradient_perturbation(problem, K, cfg.step)
    w_bar = problem.params
    log(f"  ‖∇L(w̄)‖ = {stat['grad_norm']:.2e}, risk {stat['risk']:.2e}; p = {problem.p}, n = {problem.n}")
    over = overparameterization(problem)
    if over is not None:
        log(f"  output Jacobian: rank {over['rank']} of {over['rows']} rows, σ_min/σ_max = {over['sigma_ratio']:.1e}")

    log("estimating the new solution set (matrix-free MINRES, validated rule) …")
    bar = _bar(progress, "solve")
    est = estimate_solution_set(problem, pert, method="krylov", maxiter=cfg.maxiter, progress=bar)
    if bar:
        bar.close()
    log(f"corrector: {cfg.corrector_steps} validated Newton step(s) on the perturbed problem …")
    corrected, corr = est.centre, {"hvp_count": 0, "selected": []}
    for _ in range(cfg.corrector_steps):
        corrected, info = newton_corrector(problem, pert, corrected, maxiter=cfg.maxiter)
        corr["hvp_count"] += info["hvp_count"]
        corr["selected"].append(info["selected"])
    lam_max = top_eigenvalue(Hessian(problem), iterations=30)
    infl = influence_shift(problem, pert, "damped", damping=cfg.influence_damping * lam_max, maxiter=cfg.maxiter)

    log("retraining (warm start, full-batch L-BFGS) from w̄, the estimate and the influence point …")
    candidates = {"original": w_bar, "estimate": est.centre, "corrected": corrected, "influence": w_bar + infl}
    rt = {}
    for name, w in _bar_iter(progress, candidates.items(), "retrain"):
        rt[name] = retrain(problem, w, pert, gtol=cfg.retrain_gtol, max_iter=cfg.retrain_iters)
    base = rt["original"]

    def row(name, w):
        return {
            "loss_perturbed_points": problem.loss_on(K, w, pert),
            "risk_perturbed_data": problem.risk(w, pert),
            "grad_norm_perturbed": float(problem.gradient(w, pert).norm()),
            "distance_to_new_set": rt[name].distance if name in rt else 0.0,
            "shift_norm": float((w - w_bar).norm()),
        }

    rows = {name: row(name, w) for name, w in candidates.items()}
    rows["retrained"] = row("retrained", base.w)
    d0 = rows["original"]["distance_to_new_set"]
    res = {
        "config": asdict(cfg),
        "p": problem.p,
        "n": problem.n,
        "stationarity": stat,
        "overparameterization": over,
        "perturbation_norm": pert.norm(),
        "estimate": est.summary(),
        "validation_path": est.path,
        "rows": rows,
        "retraining": {k: {"grad_norm": r.grad_norm, "iterations": r.iterations, "seconds": r.seconds}
                       for k, r in rt.items()},
        "distance_ratio": rows["estimate"]["distance_to_new_set"] / d0,
        "corrector": {"hvp_count": corr["hvp_count"], "selected": corr["selected"]},
        "corrected_distance_ratio": rows["corrected"]["distance_to_new_set"] / d0,
        "corrected_loss_reduction": rows["original"]["loss_perturbed_points"] / rows["corrected"]["loss_perturbed_points"],
        "influence_distance_ratio": rows["influence"]["distance_to_new_set"] / d0,
        "loss_reduction": rows["original"]["loss_perturbed_points"] / rows["estimate"]["loss_perturbed_points"],
        "influence_loss_reduction": rows["original"]["loss_perturbed_points"] / rows["influence"]["loss_perturbed_points"],
        "lambda_max": lam_max,
        "seconds": time.perf_counter() - t0,
    }
    return res


def _bar(progress: bool, desc: str):
    if not progress:
        return None
    from tqdm.auto import tqdm

    bar = tqdm(desc=desc, unit="check", leave=False)

    def update(rec):
        bar.update(1)
        bar.set_postfix({k: f"{v:.3g}" for k, v in rec.items() if isinstance(v, float)})

    update.close = bar.close
    return update


def _bar_iter(progress, items, desc):
    from tqdm.auto import tqdm

    return tqdm(list(items), desc=desc, disable=not progress, leave=False)


def demo_markdown(r: dict) -> str:
    rows = r["rows"]
    lines = ["| solution | loss on perturbed points | risk on perturbed data | ‖∇L(xᵖ, w)‖ | ‖w − w̄‖ | distance to new set |",
             "|---|---|---|---|---|---|"]
    for name in ("original", "estimate", "corrected", "influence", "retrained"):
        x = rows[name]
        lines.append(f"| {name} | {x['loss_perturbed_points']:.3e} | {x['risk_perturbed_data']:.3e} | "
                     f"{x['grad_norm_perturbed']:.3e} | {x['shift_norm']:.4f} | {x['distance_to_new_set']:.4f} |")
    e = r["estimate"]
    c = r["config"]
    o = r.get("overparameterization")
    over = ("" if o is None else
            f"Output Jacobian ∂f/∂w ({o['rows']} × {o['p']}): rank {o['rank']} "
            f"({'full row rank' if o['full_row_rank'] else 'NOT full row rank'}), "
            f"σ_max = {o['sigma_max']:.3g}, σ_min = {o['sigma_min']:.3g} (ratio {o['sigma_ratio']:.1e}).\n")
    return f"""# setsens demo — digits MLP, {c['points']} points moved {100 * c['step']:g} % along their loss gradient

Network {list(c['widths'])} (bias-free ReLU, squared loss to one-hot targets), n = {r['n']} digits,
p = {r['p']} weights, float64.  At w̄: ‖∇L‖ = {r['stationarity']['grad_norm']:.2e}, risk {r['stationarity']['risk']:.2e}.
{over}‖Δx‖ = {r['perturbation_norm']:.4f}.

{chr(10).join(lines)}

* **distance_ratio** (estimate's distance to the new solution set ÷ w̄'s): **{r['distance_ratio']:.3f}**
  (damped influence function, λ = {c['influence_damping']:g}·λ_max: {r['influence_distance_ratio']:.3f})
* **loss_reduction** on the perturbed points (w̄ ÷ estimate): **{r['loss_reduction']:.1f}×**
  (influence: {r['influence_loss_reduction']:.1f}×)
* with {c['corrector_steps']} validated Newton corrector step(s) on the perturbed problem ({r['corrector']['hvp_count']} more H v):
  distance ratio {r['corrected_distance_ratio']:.3f}, loss reduction {r['corrected_loss_reduction']:.1f}×
* estimator: {e['method']} / MINRES, {e['hvp_count']} Hessian-vector products, {e["risk_evaluations"]} risk evaluations,
  selected {e['selected']}; feasibility residual ‖Hv₀ + JΔx‖/‖JΔx‖ = {e['feasibility_residual']:.3e};
  radius of U = ‖v₀‖ = {e['radius']:.4f}.

"Distance to the new set" is how far warm-started L-BFGS retraining on the perturbed data moves
from that point (see `setsens.retrain`).  Total time {r['seconds']:.0f} s.
"""


def demo_figures(r: dict, out) -> list:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..report import save_figure

    paths = []
    path = r["validation_path"]
    if path:
        fig, ax = plt.subplots(figsize=(5.5, 4))
        ax.semilogy([p["shift_norm"] for p in path], [p["perturbed_risk"] for p in path], "o-")
        sel = r["estimate"]["selected"]
        ax.axvline(sel["shift_norm"], color="r", ls="--", label=f"selected: radius of U = {sel['shift_norm']:.3f}")
        ax.set(xlabel="‖v_k‖ along the MINRES path", ylabel="L(xᵖ, w̄ + v_k)",
               title="Null-space rule: validate the linear model on the perturbed problem")
        ax.legend()
        paths.append(save_figure(fig, out / "demo_validation_path.png"))
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    names = ["original", "estimate", "corrected", "influence", "retrained"]
    axes[0].bar(names, [r["rows"][n]["loss_perturbed_points"] for n in names], color=["k", "r", "m", "orange", "g"])
    axes[0].set_yscale("log")
    axes[0].set_title("loss on the perturbed points")
    axes[1].bar(names[:4], [r["rows"][n]["distance_to_new_set"] for n in names[:4]], color=["k", "r", "m", "orange"])
    axes[1].set_title("distance to the new solution set (retraining)")
    paths.append(save_figure(fig, out / "demo_comparison.png"))
    return paths


@click.command("demo")
@click.option("--out", default="setsens-report", show_default=True, type=click.Path(),
              help="Report directory (its parent must exist).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON on stdout.")
@click.option("--points", default=10, show_default=True, help="Number of perturbed training points.")
@click.option("--step", default=0.01, show_default=True, help="Step as a fraction of each point's norm.")
@click.option("--seed", default=0, show_default=True)
@click.option("--n", "n", default=100, show_default=True, type=click.IntRange(10, 1797),
              help="Number of training digits.")
@click.option("--widths", default="64,64,64,10", show_default=True,
              help="Layer widths of the bias-free ReLU MLP (input 64, output 10).")
@click.option("--corrector-steps", default=1, show_default=True, type=click.IntRange(0),
              help="Validated Newton corrector steps on the perturbed problem (0: none).")
@click.option("--quick", is_flag=True, help="A small configuration (for tests): 100 digits, 64-32-10.")
def command(out, as_json, n, points, step, seed, widths, corrector_steps, quick):
    """Toy reproduction, then the digits study judged against retraining."""
    from ..report import prepare_out_dir, to_jsonable, write_json, write_text
    from .toy import figures as toy_figures, toy_markdown, toy_study

    out = prepare_out_dir(out)
    log = (lambda *a: click.echo(*a, err=True)) if as_json else click.echo
    toy = toy_study()
    toy["figures"] = [str(p) for p in toy_figures(toy, out)]
    write_json(out / "toy.json", toy)
    write_text(out / "toy.md", toy_markdown(toy))
    log(f"toy: ‖v₀‖ = {toy['min_norm_shift']:.6f}, risk {toy['risk_original']:.4f} → {toy['risk_min_norm']:.6f}")
    try:
        widths = tuple(int(w) for w in widths.split(","))
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {widths!r}", param_hint="--widths") from None
    if len(widths) < 2 or widths[0] != 64 or widths[-1] != 10 or min(widths) < 1:
        raise click.BadParameter("widths must start with 64 (digit pixels), end with 10 (classes), all ≥ 1",
                                 param_hint="--widths")
    cfg = DemoConfig(n=n, widths=widths, points=points, step=step, seed=seed, corrector_steps=corrector_steps)
    if quick:
        cfg = DemoConfig(n=100, widths=(64, 32, 10), points=min(points, 5), step=step, seed=seed,
                         adam_steps=300, lbfgs_iters=500, retrain_iters=500, maxiter=100,
                         corrector_steps=corrector_steps)
    result = run_demo(cfg, progress=not as_json, log=log)
    result["figures"] = [str(p) for p in demo_figures(result, out)]
    write_json(out / "results.json", {"toy": toy, "digits": result})
    write_text(out / "report.md", toy_markdown(toy) + "\n\n" + demo_markdown(result))
    summary = {
        "distance_ratio": result["distance_ratio"],
        "loss_reduction": result["loss_reduction"],
        "corrected_distance_ratio": result["corrected_distance_ratio"],
        "corrected_loss_reduction": result["corrected_loss_reduction"],
        "influence_distance_ratio": result["influence_distance_ratio"],
        "influence_loss_reduction": result["influence_loss_reduction"],
        "grad_norm_at_w_bar": result["stationarity"]["grad_norm"],
        "output_jacobian": result["overparameterization"],
        "hvp_count": result["estimate"]["hvp_count"],
        "feasibility_residual": result["estimate"]["feasibility_residual"],
        "toy_min_norm_shift": toy["min_norm_shift"],
        "report": str(out / "report.md"),
    }
    if as_json:
        click.echo(json.dumps(to_jsonable(summary), indent=2))
    else:
        click.echo(demo_markdown(result))
        click.echo(f"report written to {out / 'report.md'}")
