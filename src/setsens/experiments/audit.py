"""``setsens audit``: which training points can move the model (the scan) and many perturbation
queries at once, on a user's model or, by default, the digits demo network.

With ``--check`` every figure is measured against its reference in the same run: κ_k against the SVD
pseudo-inverse of G (not the Gram eigendecomposition the scan uses), the queries against
individually solved estimates, and the ranking against retraining (the 10 top-ranked points moved
along their worst directions against 10 random points moved the same distance).
"""

from __future__ import annotations

import json
import statistics
import time

import click
import torch

from .user_model import load_problem, model_options


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = a.argsort().argsort().double(), b.argsort().argsort().double()
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def _demo_problem(log):
    from ..data import load_digits_subset
    from .demo import DemoConfig, train_stationary

    cfg = DemoConfig()
    log(f"no --model: the digits demo network (n = {cfg.n}, widths {list(cfg.widths)}, seed {cfg.seed}), "
        "trained to an exact fit first…")
    problem = train_stationary(cfg)
    _, _, x_test, _ = load_digits_subset(cfg.n, seed=cfg.seed, test=True)
    return problem, x_test[:500]


def _retrained_move(problem, perturbation, x_eval) -> float:
    """How far retraining from w̄ on the perturbed data moves the outputs at ``x_eval``: Levenberg–
    Marquardt onto the exact fit for a squared error, else the same-budget response."""
    from ..retrain import budget_response, levenberg_marquardt

    with torch.no_grad():
        before = problem.outputs(problem.params, x_eval.to(problem.params))
    if problem.loss_is_squared_error:
        w = levenberg_marquardt(problem, None, perturbation, gtol=1e-13).w
        with torch.no_grad():
            return float((problem.outputs(w, x_eval.to(w)) - before).norm())
    ref = budget_response(problem, perturbation)
    with torch.no_grad():
        return float((problem.outputs(ref.perturbed, x_eval.to(ref.perturbed)) -
                      problem.outputs(ref.clean, x_eval.to(ref.clean))).norm())


def _along_worst(problem, result, points, step):
    from ..problem import Perturbation

    x, _ = problem.points(points)
    scale = step * x.reshape(len(points), -1).norm(dim=1)
    return Perturbation(points, result.direction[points] * scale.reshape(-1, *[1] * (x.ndim - 1)))


def _check_scan(problem, factor, pinv, result, x_eval, top: int, step: float, seed: int, log) -> dict:
    from ..audit import input_jacobians

    log("check: κ_k against the SVD pseudo-inverse of G…")
    A = input_jacobians(problem)
    exact = torch.stack([torch.linalg.matrix_norm(pinv[:, k * factor.k:(k + 1) * factor.k] @ A[k], ord=2)
                         for k in range(problem.n)])
    best = exact.argsort(descending=True)[:20]
    log(f"check: retraining after moving the top {top} points, and 5 draws of {top} random points…")
    top_move = _retrained_move(problem, _along_worst(problem, result, result.top(top), step), x_eval)
    g = torch.Generator().manual_seed(seed)
    random_moves = [_retrained_move(problem, _along_worst(problem, result, torch.randperm(problem.n, generator=g)[:top],
                                                          step), x_eval) for _ in range(5)]
    return {"spearman_vs_exact": _spearman(result.kappa, exact),
            "top20_max_relative_error": float(((result.kappa[best] - exact[best]).abs() / exact[best]).max()),
            "retrained_held_out_move": {"top": top_move, "random": random_moves},
            "top_vs_random_ratio": top_move / statistics.median(random_moves)}


def _queries(problem, count: int, step: float, seed: int, pinv, t_one: float, log) -> dict:
    """``count`` one-point queries from a fresh factorisation (timed with it); with the pseudo-inverse
    ``pinv`` of G (``--check``) also against it and against 10 individually solved estimates."""
    from ..audit import GramFactor, answer_queries
    from ..function_space import output_shift
    from ..perturb import gradient_perturbation
    from ..solution_set import SolveOptions, estimate

    g = torch.Generator().manual_seed(seed + 1)
    queries = [gradient_perturbation(problem, [int(i)], step) for i in torch.randint(0, problem.n, (count,),
                                                                                         generator=g)]
    t0 = time.perf_counter()
    factor = GramFactor(problem)
    shifts = answer_queries(problem, queries, factor)
    seconds = time.perf_counter() - t0
    record = {"count": count, "seconds": seconds, f"time_{count}_over_1": seconds / t_one}
    if pinv is not None:
        log("check: 10 queries solved one by one, all against the SVD pseudo-inverse…")
        errors = [float((v - estimate(problem, q, solve=SolveOptions(rule="fixed", rtol=1e-13, maxiter=1000)).shift)
                        .norm() / v.norm()) for q, v in list(zip(queries, shifts))[:10]]
        exact = -factor.rows(torch.stack([output_shift(problem, q) for q in queries])) @ pinv.T
        record.update(max_relative_error_vs_individual=max(errors), checked=len(errors),
                      max_relative_error_vs_pinv=float(((shifts - exact).norm(dim=1) / exact.norm(dim=1)).max()))
    return record


def _figures(problem, result, out, top: int) -> list[str]:
    import matplotlib.pyplot as plt

    from ..report import save_figure

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.hist(result.kappa.numpy(), bins=30)
    ax.set(xlabel="κ_k (first-order move of the set per unit ‖Δx_k‖)", ylabel="training points", yscale="log")
    names = [save_figure(fig, out / "kappa.png").name]
    x, _ = problem.points(torch.arange(problem.n))
    side = int(round(x[0].numel() ** 0.5))
    if side * side == x[0].numel():  # greyscale square images (digits)
        rows = (("most sensitive", result.top(top)), ("least sensitive", result.ranking.flip(0)[:top]))
        fig, axes = plt.subplots(2, top, figsize=(1.1 * top, 2.6))
        for r, (label, points) in enumerate(rows):
            for c, k in enumerate(points.tolist()):
                axes[r, c].imshow(x[k].reshape(side, side).cpu().numpy(), cmap="gray_r")
                axes[r, c].set_title(f"{k}\nκ={float(result.kappa[k]):.2g}", fontsize=6)
                axes[r, c].axis("off")
            axes[r, 0].text(-0.5, 0.5, label, transform=axes[r, 0].transAxes, ha="right", fontsize=7)
        names.append(save_figure(fig, out / "points.png").name)
    return names


@click.command("audit")
@model_options
@click.option("--queries", "n_queries", default=100, show_default=True, type=click.IntRange(0),
              help="One-point perturbation queries answered from the factorisation (0: none).")
@click.option("--top", default=10, show_default=True, type=click.IntRange(1), help="Points shown and retrained.")
@click.option("--step", default=1.0, show_default=True, type=click.FloatRange(0, 100, min_open=True),
              help="Size of each move in % of the point's norm (queries and --check).")
@click.option("--check", is_flag=True, help="Measure scan and queries against their references (slow).")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--out", default="setsens-audit", show_default=True, type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON on stdout.")
def command(n_queries, top, step, check, seed, out, as_json, **inputs):
    """Rank the training points by how far they can move the solution set (Gauss–Newton form)."""
    from ..audit import GramFactor, scan
    from ..perturb import gradient_perturbation
    from ..report import prepare_out_dir, to_jsonable, write_json, write_text
    from ..solution_set import estimate

    log = (lambda *a: click.echo(*a, err=True)) if as_json else click.echo
    if inputs["weight_decay"]:
        raise click.BadParameter("the audit uses the Gauss–Newton form, which has no weight-decay term",
                                 param_hint="--weight-decay")
    out = prepare_out_dir(out)
    if inputs["model_spec"] is None and inputs["checkpoint"] is None:
        problem, x_eval = _demo_problem(log)
    else:
        if inputs["data_spec"] is None:
            raise click.UsageError("give --data with --model")
        problem, data, _ = load_problem(log=log, **inputs)
        x_eval = data.x_test if data.x_test is not None else data.x
    if top > problem.n:
        raise click.BadParameter(f"{top} points asked for, but there are {problem.n}", param_hint="--top")
    rows = problem.n * problem.outputs(problem.params, problem.points([0])[0]).numel()
    if rows * problem.p > 2e8:
        raise click.UsageError(f"the scan factorises the {rows} × {problem.p} output Jacobian, too large here; "
                               "use a subset of the training data")
    log(f"one estimate (the unit of cost), p = {problem.p}, n = {problem.n}…")
    t0 = time.perf_counter()
    estimate(problem, gradient_perturbation(problem, [0], step / 100))
    t_one = time.perf_counter() - t0
    log("scan: factorising G Gᵀ and every point's modulus…")
    t0 = time.perf_counter()
    factor = GramFactor(problem)
    result = scan(problem, factor)
    t_scan = time.perf_counter() - t0
    summary = {"model": inputs["model_spec"] or "digits demo network", "p": problem.p, "n": problem.n,
               "one_estimate_seconds": t_one,
               "scan": {"seconds": t_scan, "seconds_over_one_estimate": t_scan / t_one, "factor_rank": factor.rank,
                        "kappa": {"min": float(result.kappa.min()), "median": float(result.kappa.median()),
                                  "max": float(result.kappa.max())},
                        "ranking": result.ranking[:20].tolist(), "kappa_top": result.kappa[result.top(20)].tolist()}}
    pinv = torch.linalg.pinv(factor.G) if check else None  # the independent reference of every check
    if check:
        summary["scan"].update(_check_scan(problem, factor, pinv, result, x_eval, top, step / 100, seed, log))
    if n_queries:
        log(f"queries: {n_queries} one-point perturbations…")
        summary["queries"] = _queries(problem, n_queries, step / 100, seed, pinv, t_one, log)
    figures = _figures(problem, result, out, top)
    write_json(out / "results.json", summary)
    s = summary["scan"]
    lines = ["# setsens audit", "", f"{summary['model']}: p = {problem.p}, n = {problem.n}.", "",
             f"- scan of all {problem.n} points in {s['seconds']:.2f} s = {s['seconds_over_one_estimate']:.2f}× one "
             f"estimate ({t_one:.2f} s); κ_k median {s['kappa']['median']:.3g}, range "
             f"[{s['kappa']['min']:.3g}, {s['kappa']['max']:.3g}]; most sensitive points {s['ranking'][:top]}"]
    if check:
        lines.append(f"- against the SVD pseudo-inverse: Spearman {s['spearman_vs_exact']:.4f}, largest relative "
                     f"error on the top 20 {s['top20_max_relative_error']:.1e}; retraining moves held-out outputs "
                     f"{s['top_vs_random_ratio']:.1f}× more after moving the top {top} than {top} random points")
    if n_queries:
        q = summary["queries"]
        error = f"; largest relative error against individual solves {q['max_relative_error_vs_individual']:.1e}"
        lines.append(f"- {n_queries} queries in {q['seconds']:.2f} s = {q[f'time_{n_queries}_over_1']:.2f}× one "
                     f"estimate" + (error if check else ""))
    lines += [""] + [f"![{f}]({f})" for f in figures]
    write_text(out / "report.md", "\n".join(lines) + "\n")
    if as_json:
        click.echo(json.dumps(to_jsonable(summary), indent=2))
    else:
        click.echo("\n".join(lines[4:-len(figures) - 1]))
        click.echo(f"report written to {out / 'report.md'}")
