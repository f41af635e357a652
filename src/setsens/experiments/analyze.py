"""``setsens analyze``: the set-valued estimate, its verdict and its effect on predictions, for any model.

Everything the user gives is loaded and checked before any work starts (specs, checkpoint, data
shapes, labels, indices, step); the work is :func:`setsens.analysis.analyze`; this module only
reads inputs and writes ``report.md``, ``results.json`` and figures.
"""

from __future__ import annotations

import json
from pathlib import Path

import click
import torch

from .bars import Bars
from .options import number_list
from .user_model import load_problem, model_options, polish_summary

SELECT_RULES = ("top-loss", "low-loss", "random")


#: the library's advice names parameters; the command line names its flags
FLAGS = {"SolveOptions.maxiter": "--maxiter", "relative_step": "--step", "float64 (Problem dtype)": "--dtype float64",
         "method 'training-tangent'": "--method training-tangent", "Training.lr": "--lr",
         "method 'training-secant'": "--method training-secant",
         "validity.step_max": "--step auto"}


def for_cli(advice: str) -> str:
    """The verdict's advice in the command line's words (:data:`FLAGS`)."""
    for name, flag in FLAGS.items():
        advice = advice.replace(name, flag)
    return advice


def _parse_step(step: str) -> float | None:
    """``--step``: a percentage in (0, 100], or ``auto`` (None)."""
    if step == "auto":
        return None
    try:
        value = float(step)
    except ValueError:
        value = float("nan")
    if not 0 < value <= 100:
        raise click.BadParameter(f"expected a percentage in (0, 100] or 'auto', got {step!r}", param_hint="--step")
    return value


def _parse_points(points: str | None, select: str | None) -> tuple[str, object]:
    if points and select:
        raise click.BadParameter("give --points or --select, not both", param_hint="--points")
    if points:
        return "points", list(number_list(points, "--points", int))
    rule, _, k = (select or "random:3").partition(":")
    if rule not in SELECT_RULES or not k.isdigit() or int(k) < 1:
        raise click.BadParameter(f"expected one of {', '.join(r + ':K' for r in SELECT_RULES)} with K ≥ 1, "
                                 f"got {select!r}", param_hint="--select")
    return rule, int(k)


def _select(problem, rule: str, arg, seed: int) -> torch.Tensor:
    if rule == "points":
        return problem.check_indices(arg)
    if arg > problem.n:
        raise click.BadParameter(f"{arg} points asked for, but there are {problem.n} training points",
                                 param_hint="--select")
    if rule == "random":
        return torch.randperm(problem.n, generator=torch.Generator().manual_seed(seed))[:arg]
    losses = torch.cat([problem.per_sample_loss(problem.params, x, y).detach().cpu()
                        for x, y in problem.batches()])
    return losses.argsort(descending=rule == "top-loss")[:arg]


def _direction(problem, idx, direction: str, step: float, seed: int):
    from ..perturb import gradient_perturbation, random_perturbation, scale_to_relative
    from ..problem import Perturbation

    if direction == "gradient":
        return gradient_perturbation(problem, idx, step)
    if direction == "random":
        return random_perturbation(problem, idx, step, torch.Generator().manual_seed(seed))
    import numpy as np

    d = torch.as_tensor(np.load(direction, allow_pickle=False))
    if tuple(d.shape) != (len(idx), *problem.input_shape):
        raise click.BadParameter(f"{direction} has shape {tuple(d.shape)}, expected {(len(idx), *problem.input_shape)}"
                                 " (one row per moved point)", param_hint="--direction")
    x, _ = problem.points(idx)
    return problem.check_perturbation(Perturbation(idx, scale_to_relative(x, d.to(x), step)))


def _figures(analysis, out: Path) -> list[str]:
    import matplotlib.pyplot as plt

    from ..report import save_figure

    names = []
    held = next(iter(analysis.predictions.values()))
    if "margins" in held:
        fig, ax = plt.subplots(figsize=(5, 4))
        m0, m1 = torch.tensor(held["margins"]["before"]), torch.tensor(held["margins"]["estimate"])
        ax.scatter(m0, m1 - m0, s=6, alpha=0.6)
        ax.axhline(0, color="k", lw=0.5)
        ax.set(xlabel="margin at w̄", ylabel="predicted margin change",
               title=f"{held['points']} points, {held['flips']['count']} flips")
        names.append(save_figure(fig, out / "margins.png").name)
    if analysis.changes:
        ref = analysis.changes["reference"].reshape(-1)
        fig, ax = plt.subplots(figsize=(5, 4))
        val = analysis.validation
        for name, label, score, colour in (("influence", "influence", val["influence_pearson"], "tab:orange"),
                                           ("estimate", analysis.method, val["pearson"], "tab:blue")):
            ax.scatter(ref, analysis.changes[name].reshape(-1), s=4, alpha=0.5, color=colour,
                       label=f"{label} (r = {score:.3f})")
        lim = float(ref.abs().max())
        ax.plot([-lim, lim], [-lim, lim], "k--", lw=0.7)
        ax.set(xlabel="retrained change of held-out outputs", ylabel="predicted change")
        ax.legend(fontsize=8)
        names.append(save_figure(fig, out / "validation.png").name)
    return names


CHECK_NAMES = {"jump": "jump ratio", "secant": "secant residual"}


def markdown(summary: dict, figures: list[str]) -> str:
    from ..analysis import CHECK_FIGURES

    v, lp = summary["verdict"], summary["loss_on_points"]
    lines = [f"# setsens analyze — verdict: **{v['status'].upper()}**", "",
             "| check | status | value | what to do |", "|---|---|---|---|"]
    lines += [f"| {c['name']} | {c['status']} | {c['value']:.3g} | {c['advice']} |" for c in v["checks"]]
    if summary.get("polish"):
        lines += ["", f"w̄ was first polished: {polish_summary(summary['polish'])}; everything below is about the "
                  "polished weights."]
    lines += ["", f"Method: **{summary['method']}** ({summary['method_reason']}).", ""]
    if "estimate" in summary:
        e, va = summary["estimate"], summary["validity"]
        lines += ["## The estimate", "", f"- predicts: {e['predicts']}",
                  f"- predicted change of the end weights ‖w′‖ = {e['shift_norm']:.4g}; the replayed clean run moves "
                  f"{e['replay_weight_drift']:.4g} from w̄ (risk {e['replay_risk']['start']:.4g} → "
                  f"{e['replay_risk']['end']:.4g}, diverged: {e['diverged']}), lr {e['lr']:.3g}",
                  f"- validity at this step ({summary['perturbation']['step_percent']:.3g} %): second-order term / "
                  f"first {va['ratio']:.3g} (threshold {va['threshold']:g}), {CHECK_NAMES[va['check']]} "
                  f"{va[CHECK_FIGURES[va['check']]]['median']:.3g} (threshold {va['check_threshold']:g})"
                  + (f", predicted change over its floor {va['above_floor']:.3g} (threshold {va['floor_threshold']:g}),"
                     f" its growth over the step's {va['growth']:.3g}" if va["check"] == "secant" else "")
                  + f"; **step_max = {va['step_max']:.3g} %** (0: no graded step is inside); graded (ratio, "
                  f"{CHECK_NAMES[va['check']]}" + (", change over floor" if va["check"] == "secant" else "") + "): "
                  + ", ".join(f"{p['step']:g} % ({p['ratio']:.2g}, " + ("—" if p[va["check"]] is None else
                                                                      f"{p[va['check']]:.2g}")
                              + (f", {p['above_floor']:.2g}" if "above_floor" in p else "") + ")" for p in va["curve"]),
                  f"- moved points {summary['perturbation']['indices']}, ‖Δx‖ = {summary['perturbation']['norm']:.4g}; "
                  f"their loss after the clean run {lp['clean']:.4g}, moved {lp['original']:.4g}, after the "
                  f"predicted perturbed run {lp['estimate']:.4g}", "", "## Predictions", ""]
    else:
        lines += _set_lines(summary)
    lines += _prediction_lines(summary) + [""] + [f"![{f}]({f})" for f in figures]
    return "\n".join(lines) + "\n"


def _set_lines(summary: dict) -> list[str]:
    s, lp = summary["set"], summary["loss_on_points"]
    return ["## The estimated set", "",
            f"- shift ‖v₀‖ = {s['shift_norm']:.4g}, radius r = {s['radius']:.4g} (null reach ρ = "
            f"{s['null_radius']:.4g}, determined: {s['radius_determined']}), {s['members']} members sampled",
            f"- residuals: output {s['output_residual']:.3g}, eq. 19 feasibility {s['feasibility_residual']:.3g}; "
            f"stationarity ‖∇L‖/‖JΔx‖ = {s['stationarity']:.3g}",
            f"- cost: {s['cost']['hvp']} H v, {s['cost']['jvp_vjp_passes']} JVP+VJP passes, "
            f"{s['cost']['seconds']:.1f} s",
            f"- moved points {summary['perturbation']['indices']}, ‖Δx‖ = {summary['perturbation']['norm']:.4g}; "
            f"their loss: clean {lp['clean']:.4g}, moved {lp['original']:.4g}, at the estimate {lp['estimate']:.4g}",
            "", "## Predictions", ""]


def _prediction_lines(summary: dict) -> list[str]:
    lines = []
    for name, p in summary["predictions"].items():
        lines.append(f"- **{name.replace('_', ' ')}** ({p['points']} points): output change mean "
                     f"{p['output_change']['mean']:.3g}, max {p['output_change']['max']:.3g}")
        if "flips" in p:
            lines.append(f"  - accuracy {p['accuracy']['before']:.4f} → {p['accuracy']['estimate']:.4f}; "
                         f"{p['flips']['count']} flips; margin change median {p['margin_change']['median']:.3g} "
                         f"[{p['margin_change']['min']:.3g}, {p['margin_change']['max']:.3g}]"
                         + (f"; {p['undetermined_by_set']['count']} predictions not determined by the set"
                            if "set" in summary else ""))
    val = summary.get("validation")
    if val:
        ref = val["reference_run"]
        if ref["kind"] == "training_response":
            how = (ref["training"] + f" from w̄ (lr {ref['lr']:.3g}; diverged: {ref['diverged']})",
                   "above its noise floor",
                   f"{ref['change_over_floor']:.3g}× the change at a {ref['floor_factor']:g}× smaller step; its "
                   f"self-consistency, the Pearson correlation with 3× its change at a third of the step, is "
                   f"{ref['self_consistency']:.3f}: no first-order answer can do much better")
        elif ref["kind"] == "budget_response":
            halved = f", halved {ref['lr_halvings']}× after a divergence" if ref.get("lr_halvings") else ""
            how = (f"gradient descent from w̄, {ref['steps']} steps (lr {ref['lr']:.3g}{halved})", "budget-stable",
                   f"change when halved {ref['change_when_halved']:.2f}")
        else:
            how = (f"L-BFGS from w̄ to ‖∇L‖ ≤ {ref['gtol']:.2g} (a thousandth of the gradient the move creates; "
                   f"at most {ref['max_iter']} iterations, converged: {ref['converged']})", "tolerance-independent",
                   f"change at a 100× tighter tolerance {ref['change_when_tightened']:.2g}")
        lines += ["", "## Validation against retraining", "",
                  f"Reference: {how[0]} on perturbed and on clean data; their difference changes the held-out "
                  f"outputs by {ref['output_change_norm']:.3g} (the clean run itself drifts "
                  f"{ref['output_drift_norm']:.3g}); {how[1]}: {ref['stable']} ({how[2]}).", "",
                  "| | Pearson | relative error |", "|---|---|---|",
                  f"| {summary['method']} | {val['pearson']:.3f} | {val['relative_error']:.3f} |",
                  f"| influence (damped) | {val['influence']['pearson']:.3f} | "
                  f"{val['influence']['relative_error']:.3f} |"]
    if summary["notes"]:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in summary["notes"]]
    return lines


def _analyze_training(problem, pert, training, step, test, validate, secant, progress, log):
    """:func:`setsens.analysis.analyze_training`; with ``--step auto`` (``step`` None) at the step its validity
    range chooses, the tangent taken at ``pert`` (1 %)."""
    from ..analysis import analyze_training

    analysis = analyze_training(problem, pert, training, test=test, validate=validate, secant=secant,
                                auto_step=step is None, progress=progress)
    if step is None:
        chosen = analysis.validity["auto"]
        log(f"validity: step {chosen['step']:g} %" +
            (" (step_max, the largest step inside the range)" if chosen["inside"] else
             " — no step is inside the range; this one is the closest to it"))
    return analysis


@click.command("analyze")
@model_options
@click.option("--points", help="Indices of the training points to move, e.g. 3,17,42.")
@click.option("--select", help="Or choose them: top-loss:K, low-loss:K or random:K [default: random:3].")
@click.option("--direction", default="gradient", show_default=True,
              help="gradient (loss ascent), random, or an .npy of Δx (one row per point).")
@click.option("--step", default="1", show_default=True,
              help="Size of each move in % of the point's norm; auto (training-tangent/-secant): the largest of "
                   "10, 3, 1, 0.3, … % inside the validity range, found without retraining.")
@click.option("--method", default="auto", show_default=True,
              type=click.Choice(["auto", "gauss-newton", "hessian", "influence", "training-tangent",
                                 "training-secant"]),
              help="training-tangent: the derivative of the fine-tuning run (--optimizer, --lr, --steps, …) along "
                   "Δx, judged against that fine-tuning; training-secant: the same with each ReLU's derivative "
                   "replaced by its secant over the move (follows ReLU units that change sides); the others: the "
                   "set after retraining to a stationary point.")
@click.option("--optimizer", default="sgd", show_default=True, type=click.Choice(["sgd", "adam", "adamw"]),
              help="training-tangent: the fine-tuning it differentiates (and --validate runs).")
@click.option("--lr", type=click.FloatRange(0, min_open=True),
              help="training-tangent: its learning rate [default: 1/λ_max(H) for sgd, 1e-3 for adam].")
@click.option("--momentum", default=0.9, show_default=True, type=click.FloatRange(0, 1, max_open=True),
              help="training-tangent, sgd: momentum (Nesterov unless --no-nesterov).")
@click.option("--nesterov/--no-nesterov", default=True, show_default=True)
@click.option("--train-batch", type=click.IntRange(1),
              help="training-tangent: minibatch size, in a fixed seeded order [default: full batch].")
@click.option("--train-weight-decay", default=0.0, show_default=True, type=click.FloatRange(0),
              help="training-tangent: the optimiser's weight decay (decoupled for adamw).")
@click.option("--maxiter", default=200, show_default=True, type=click.IntRange(1),
              help="Krylov iterations at most, per solve (the estimate and each null projection).")
@click.option("--preconditioner", default="none", show_default=True, type=click.Choice(["none", "diagonal", "nystrom"]),
              help="Gauss–Newton only: precondition the estimate and every null projection (CG on GGᵀ, still "
                   "minimum norm); nystrom pays when the set must be accurate (benchmarks/preconditioner.py).")
@click.option("--sketch", default=100, show_default=True, type=click.IntRange(1),
              help="The preconditioner's rank (nystrom) or samples (diagonal), paid once.")
@click.option("--members", default=8, show_default=True, type=click.IntRange(0), help="Set members to sample.")
@click.option("--validate", is_flag=True,
              help="Retrain on perturbed and on clean data (see --reference) and score the estimate.")
@click.option("--steps", type=click.IntRange(2),
              help="training-tangent: the fine-tuning's steps T [default: 200]; the other methods: the retraining "
                   "budget of --validate (gradient steps; converged reference: L-BFGS iterations at most) "
                   "[default: 1000].")
@click.option("--reference", default="auto", show_default=True, type=click.Choice(["auto", "budget", "converged"]),
              help="What --validate retrains: same-budget gradient descent, or L-BFGS to stationarity (needs "
                   "--weight-decay: an isolated minimiser); auto: converged with weight decay, else budget.")
@click.option("--test-points", default=1000, show_default=True, type=click.IntRange(1),
              help="Held-out points used at most.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--out", default="setsens-analyze", show_default=True, type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON on stdout.")
def command(points, select, direction, step, method, optimizer, lr, momentum, nesterov, train_batch,
            train_weight_decay, maxiter, preconditioner, sketch, members, validate, steps, reference, test_points, seed,
            out, as_json, **inputs):
    """Estimate how your trained model's solution set moves when some training points move."""
    from ..analysis import analyze
    from ..report import atomic_torch_save, prepare_out_dir, to_jsonable, write_json, write_text
    from ..solution_set import RadiusOptions, SolveOptions

    from ..finetune import Training

    log = (lambda *a: click.echo(*a, err=True)) if as_json else click.echo
    rule, arg = _parse_points(points, select)
    step = _parse_step(step)
    tangent = method in ("training-tangent", "training-secant")
    if step is None and not tangent:
        raise click.BadParameter("auto needs --method training-tangent or training-secant (their validity range)",
                                 param_hint="--step")
    if not tangent:
        for name, value, default in (("--optimizer", optimizer, "sgd"), ("--lr", lr, None),
                                     ("--momentum", momentum, 0.9), ("--no-nesterov", nesterov, True),
                                     ("--train-batch", train_batch, None), ("--train-weight-decay", train_weight_decay,
                                                                            0.0)):
            if value != default:
                raise click.BadParameter(f"applies to --method training-tangent or training-secant only, not {method}",
                                         param_hint=name)
    elif reference != "auto":
        raise click.BadParameter(f"{method} is judged against the fine-tuning it differentiates",
                                 param_hint="--reference")
    try:
        training = Training(optimizer=optimizer, lr=lr, steps=steps or 200, momentum=momentum, nesterov=nesterov,
                            weight_decay=train_weight_decay, batch_size=train_batch, seed=seed)
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="--optimizer") from None
    steps = steps or 1000
    if direction not in ("gradient", "random") and not Path(direction).is_file():
        raise click.BadParameter(f"expected gradient, random or an existing .npy file, got {direction!r}",
                                 param_hint="--direction")
    if inputs["data_spec"] is None:
        raise click.UsageError("give --data (and --model, usually --checkpoint)")
    if preconditioner != "none" and method in ("hessian", "influence"):
        raise click.BadParameter(f"applies to --method gauss-newton only, not {method}", param_hint="--preconditioner")
    if reference == "converged" and not inputs.get("weight_decay"):
        raise click.BadParameter("needs --weight-decay (else the minimiser need not be finite)",
                                 param_hint="--reference")
    out = prepare_out_dir(out)
    problem, data, polished = load_problem(log=log, **inputs)
    idx = _select(problem, rule, arg, seed)
    pert = _direction(problem, idx, direction, (step or 1.0) / 100, seed)
    test = None if data.test is None else (data.x_test[:test_points], data.y_test[:test_points])
    along = direction if direction in ('gradient', 'random') else 'the given Δx'
    log(f"model: {type(problem.model).__name__}, p = {problem.p}, n = {problem.n}, {problem.dtype}; moving points "
        f"{idx.tolist()} " + (f"by {step:g} % along {along}" if step else f"along {along}, the step chosen by its "
                              "validity range"))

    runs = "(perturbed, clean, noise floor)" if tangent else "(perturbed, clean)"
    bars = Bars({"retrain": f"retrain {runs}", "tangent": "tangent of the training run",
                 "iteration": "estimate (Krylov iterations)", "candidate": "estimate (scored candidates)"},
                units={"candidate": "check"})

    def progress(event):
        if event.stage == "verdict":
            bars.close()
            verdict = event.info["verdict"]
            log(f"verdict: {verdict.status.upper()}")
            for line in verdict.lines():
                log("  " + for_cli(line))
        elif event.stage in ("predictions", "validate"):
            log(f"{event.stage}…")
        elif event.stage == "estimate":
            bars.close()  # a second tangent (the secant after the validity range's) gets a bar of its own
            log(f"estimate ({event.info['method']})…")
        else:
            bars(event)

    import warnings

    from ..problem import NotStationaryWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotStationaryWarning)  # the verdict reports it
        if tangent:
            analysis = _analyze_training(problem, pert, training, step, test, validate,
                                         method == "training-secant", progress, log)
        else:
            analysis = analyze(problem, pert, method, test=test, members=members, seed=seed, validate=validate,
                               solve=SolveOptions(maxiter=maxiter, preconditioner=preconditioner,
                                                  **({"sketch": sketch} if preconditioner != "none" else {})),
                               steps=steps, reference=reference, progress=progress,
                               radius=RadiusOptions(projection_maxiter=maxiter, seed=seed))
    bars.close()
    summary = analysis.summary()
    for check in summary["verdict"]["checks"]:
        check["advice"] = for_cli(check["advice"])
    summary["polish"] = polished
    summary["inputs"] = {"model": inputs["model_spec"], "checkpoint": inputs["checkpoint"],
                         "data": inputs["data_spec"], "loss": inputs["loss_spec"], "step_percent": step,
                         "direction": direction, "seed": seed, "step_auto": step is None}
    figures = _figures(analysis, out)
    est = analysis.estimate
    moved = {"indices": est.perturbation.indices, "delta": est.perturbation.delta}
    if tangent:
        atomic_torch_save({"w_bar": est.w_bar, "base": est.base, "shift": est.shift, "second": est.second} | moved,
                          out / "tangent.pt")
    else:
        atomic_torch_save({"w_bar": est.w_bar, "shift": est.shift, "radius": est.radius, "members": analysis.members}
                          | moved, out / "set.pt")
    write_json(out / "results.json", summary)
    write_text(out / "report.md", markdown(summary, figures))  # raw floats: NaN prints as nan
    if as_json:
        compact = to_jsonable(summary)
        for part in compact["predictions"].values():
            part.pop("margins", None)
        click.echo(json.dumps(compact, indent=2))
    else:
        if validate:
            v = analysis.validation
            click.echo(f"validation: Pearson {v['pearson']:.3f} (influence {v['influence_pearson']:.3f}), relative "
                       f"error {v['relative_error']:.3f}; reference {v['reference']} stable: {v['reference_stable']}")
        click.echo(f"report written to {out / 'report.md'}")
