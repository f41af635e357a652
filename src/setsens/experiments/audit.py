"""``setsens audit``: which training points can move the model (the scan), many perturbation queries
at once, a targeted poisoning attack through the coderivative (``--attack``) and a poisoning
certificate (``--certify``), on a user's model or, by default, the digits demo network.

With ``--check`` every figure is measured against its reference in the same run: κ_k against the SVD
pseudo-inverse of G (not the Gram eigendecomposition the scan uses), the queries against
individually solved estimates, and the ranking against retraining (the 10 top-ranked points moved
along their worst directions against 10 random points moved the same distance).  The attack and the
certificate are always judged by retraining on the poisoned data from w̄: Levenberg–Marquardt onto
the exact fit for a squared error (tolerance-independent), else the same-budget response.
"""

from __future__ import annotations

import json
import math
import statistics
import time

import click
import torch

from .user_model import load_problem, model_options, polish_summary


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = a.argsort().argsort().double(), b.argsort().argsort().double()
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def _demo_problem(out, log):
    from ..data import load_digits_subset
    from .bars import Bars
    from .demo import LABELS, DemoConfig, demo_problem, train_stationary
    from .state import RunState

    cfg = DemoConfig()
    state = RunState(out, {"demo": cfg})
    _, _, x_test, _ = load_digits_subset(cfg.n, seed=cfg.seed, test=True)
    w = state.load("weights")
    if w is None:
        log(f"no --model: the digits demo network (n = {cfg.n}, widths {list(cfg.widths)}, seed {cfg.seed}), "
            "trained to an exact fit first…")
        with Bars(LABELS) as bars:
            problem = train_stationary(cfg, bars)
        state.save("weights", problem.params)
        return problem, x_test[:500]
    log(f"no --model: the digits demo network (n = {cfg.n}, widths {list(cfg.widths)}), weights from {state.dir}")
    return demo_problem(cfg, w), x_test[:500]


class _Retrainer:
    """Retraining on perturbed data from w̄, ``perturbation ↦ weights``: Levenberg–Marquardt onto the exact fit for
    a squared error, else w̄ plus the budget response's shift (``steps`` of full-batch Nesterov gradient descent,
    lr 1/λ_max(H) halved while a run diverges — settled by :meth:`training` before an attack, halved again if a
    later run diverges — one clean run per lr shared by all).  ``record()`` names the reference, how often its lr
    was halved (``lr_halvings``) and how much its answers still moved with the budget (``change_when_halved``)."""

    def __init__(self, problem, steps: int):
        self.problem, self.steps, self.lr, self.clean_runs, self.changes = problem, steps, None, {}, []
        self.settled, self.halvings = False, 0

    def _training(self):
        from ..finetune import Training

        return Training(lr=self.lr, steps=self.steps, momentum=0.9, nesterov=True)

    def training(self, probe=None):
        """The fine-tuning the budget response runs (an attack or a certificate following it needs it first), at the
        lr it really runs at: 1/λ_max(H), halved while a run diverges — settled once, before anything follows it, by
        the clean run and by ``probe`` (a perturbation as large as those to be judged: on ResNet-56 the clean run
        converges at 1/λ_max(H) and the perturbed ones only at a 32nd of it).  Later retrainings reuse the lr."""
        from ..retrain import budget_response

        if not self.settled:
            self._settle(budget_response(self.problem, probe, steps=self.steps, lr=self.lr,
                                         clean_runs=self.clean_runs))
            self.settled = True
        return self._training()

    def __call__(self, pert):
        from ..retrain import budget_response, levenberg_marquardt

        if self.problem.loss_is_squared_error:
            return levenberg_marquardt(self.problem, None, pert, gtol=1e-13).w
        ref = budget_response(self.problem, pert, steps=self.steps, lr=self.lr, clean_runs=self.clean_runs)
        self._settle(ref)
        self.changes.append(ref.change_when_halved)
        return self.problem.params + ref.shift

    def cached(self, state, name: str, compute) -> dict:
        """``state``'s record ``name``, else ``compute()`` saved with how much the reference's runs it made moved
        when their budget was halved and the lr the reference ran at after them (``lr``, ``lr_halvings``: it
        halves after a diverged run), which a resumed run takes back."""
        record = state.load(name)
        if record is None:
            start = len(self.changes)
            record = compute()
            record.update(reference_changes=self.changes[start:], lr=self.lr, lr_halvings=self.halvings)
            state.save(name, record)
        else:
            self.changes += record.get("reference_changes", [])  # absent from caches older than 2026-12-06
            if "lr_halvings" in record:
                self.lr, self.halvings = record["lr"], record["lr_halvings"]
        return record

    def _settle(self, ref):
        self.lr, self.halvings = ref.lr, self.halvings + ref.halvings

    def record(self) -> dict:
        if self.problem.loss_is_squared_error:
            return {"reference": "Levenberg–Marquardt onto the exact fit (gtol 1e-13)"}
        out = {"reference": f"budget response: {self._training().describe()}, from w̄ on the perturbed minus on the "
                            "clean data", "steps": self.steps, "lr": self.lr, "lr_halvings": self.halvings}
        if self.changes:
            c = sorted(self.changes)
            out["change_when_halved"] = {"median": statistics.median(c), "max": c[-1], "runs": len(c),
                                         "stable_fraction": sum(x <= 0.1 for x in c) / len(c)}
        return out


def _retrained_move(problem, retrain, perturbation, x_eval) -> float:
    """How far retraining from w̄ on the perturbed data moves the outputs at ``x_eval``."""
    with torch.no_grad():
        x_eval = x_eval.to(problem.params)
        return float((problem.outputs(retrain(perturbation), x_eval) - problem.outputs(problem.params, x_eval)).norm())


def _along_worst(problem, result, points, step):
    from ..perturb import scale_to_relative
    from ..problem import Perturbation

    x, _ = problem.points(points)
    return Perturbation(points, scale_to_relative(x, result.direction[points].to(x), step))


def _check_scan(problem, factor, pinv, result, x_eval, top: int, step: float, seed: int, retrain, log) -> dict:
    """κ_k against the pseudo-inverse; retraining after moving the top points along their worst
    directions against random points moved along theirs (the ranking alone) and along random
    directions (neither ranking nor direction), 5 draws each."""
    from ..audit import input_jacobians
    from ..perturb import random_perturbation

    log("check: κ_k against the SVD pseudo-inverse of G…")
    A = input_jacobians(problem)
    exact = torch.stack([torch.linalg.matrix_norm(pinv[:, k * factor.k:(k + 1) * factor.k] @ A[k].to(pinv), ord=2)
                         for k in range(problem.n)])
    best = exact.argsort(descending=True)[:20]
    log(f"check: retraining after moving the top {top} points, and 2 × 5 draws of {top} random points…")
    move = lambda pert: _retrained_move(problem, retrain, pert, x_eval)
    top_move = move(_along_worst(problem, result, result.top(top), step))
    g = torch.Generator().manual_seed(seed)
    draws = [torch.randperm(problem.n, generator=g)[:top] for _ in range(5)]
    random_moves = [move(_along_worst(problem, result, points, step)) for points in draws]
    random_directions = [move(random_perturbation(problem, points, step, g)) for points in draws]
    return {"spearman_vs_exact": _spearman(result.kappa, exact),
            "top20_max_relative_error": float(((result.kappa[best] - exact[best]).abs() / exact[best]).max()),
            "retrained_held_out_move": {"top": top_move, "random": random_moves,
                                        "random_directions": random_directions},
            "top_vs_random_ratio": top_move / statistics.median(random_moves),
            "top_vs_random_direction_ratio": top_move / statistics.median(random_directions)}


def _with_response(audit, options, retrain, budget: float):
    """The attack's options with the training it follows when it follows the budget response.  Where the judge is
    the budget response, its lr is first settled on the largest move it will judge: the scan's top points moved
    along their own loss gradient by ``budget``."""
    from dataclasses import replace

    from ..perturb import gradient_perturbation

    if audit.problem.loss_is_squared_error:  # judged by Levenberg–Marquardt: no lr
        return options
    probe = None if retrain.settled else gradient_perturbation(audit.problem, audit.scan().top(options.points), budget)
    training = retrain.training(probe)
    return replace(options, training=training) if options.response == "budget" else options


def _attack_row(audit, x_eval, t: int, options, seed: int, retrain) -> dict:
    """The attack on target ``t``'s margin and the two baselines on the same points, each judged by ``retrain``."""
    from ..poisoning import baselines, margin

    phi = margin(audit.problem, x_eval[t])
    result = audit.attack(phi, options, retrain=retrain)
    points = result.perturbation.indices
    row = {"target": t, "start": result.start, "predicted": result.predicted, "attack": result.retrained[-1],
           "points": points.tolist()}
    moves = baselines(audit.problem, points, options.budget, torch.Generator().manual_seed(seed + t))
    row.update({kind: float(phi(retrain(move))) for kind, move in moves.items()})
    return row


def _attack(audit, x_eval, targets, budgets, options, seed, retrain, state, log) -> dict:
    """The staged coderivative attack on the margins of ``targets`` held-out points at each budget,
    and the two baselines on the same points, all judged by ``retrain``; cached per target."""
    from dataclasses import replace

    from ..progress import counted
    from .bars import Bars

    chosen = torch.randperm(len(x_eval), generator=torch.Generator().manual_seed(seed + 2))[:targets].tolist()
    options, passes = _with_response(audit, options, retrain, max(budgets)), 0
    while True:  # again while the judge halves its lr: every target follows, and is judged at, one lr
        lr, passes, table = retrain.lr, passes + 1, {}
        tag = "" if lr is None else f"-lr{lr:.6g}"
        for budget in budgets:
            table[budget] = []
            for t in counted(Bars(), chosen, f"attack (budget {100 * budget:g} %)"):
                table[budget].append(retrain.cached(state, f"attack-{budget:g}-{t}{tag}", lambda: _attack_row(
                    audit, x_eval, t, replace(options, budget=budget), seed, retrain)))
                if retrain.lr != lr:  # the rest of this pass would be redone: stop it here
                    break
            if retrain.lr != lr:
                break
        if retrain.lr == lr:
            break
        log(f"attack: a retraining diverged and the reference halved its lr ({lr:.3g} → {retrain.lr:.3g}): every "
            "target again at the new lr")
        options = replace(options, training=retrain.training()) if options.training else options
    per_budget = []
    for budget, rows in table.items():
        drop = {kind: [r["start"] - r[kind] for r in rows] for kind in ("attack", "random", "loss-gradient")}
        mean = {kind: statistics.fmean(d) for kind, d in drop.items()}
        best = max(mean["random"], mean["loss-gradient"])
        per_budget.append({
            "budget": budget, "flip_rate": statistics.fmean(r["attack"] < 0 for r in rows),
            "baseline_flip_rate": {k: statistics.fmean(r[k] < 0 for r in rows) for k in ("random", "loss-gradient")},
            "margin_drop": {k: {"mean": mean[k], "median": statistics.median(d), "min": min(d), "max": max(d)}
                            for k, d in drop.items()},
            "predicted_drop_mean": statistics.fmean(r["start"] - r["predicted"] for r in rows),
            "predicted_drop_median": statistics.median(r["start"] - r["predicted"] for r in rows),
            "margin_drop_over_best_baseline": mean["attack"] / best if best > 0 else math.inf,
            "targets": rows})
        log(f"attack at {100 * budget:g} %: flips {per_budget[-1]['flip_rate']:.0%} of {len(rows)} targets, "
            f"mean margin drop {mean['attack']:.3f} (random {mean['random']:.3f}, loss gradient "
            f"{mean['loss-gradient']:.3f})")
    flipping = [b for b in per_budget if b["flip_rate"] >= 0.5]
    head = flipping[0] if flipping else per_budget[-1]
    return {"targets": len(chosen), "points": options.points, "stages": options.stages, "steps": options.steps,
            "response": options.response, "passes": passes,
            "budget": head["budget"], "flip_rate": head["flip_rate"],
            "margin_drop_over_best_baseline": head["margin_drop_over_best_baseline"],
            "smallest_budget_flipping_half": flipping[0]["budget"] if flipping else None, "budgets": per_budget}


def _certify(audit, x_eval, deltas, options, checks, seed, retrain, state, log) -> dict:
    """Both certificates at each δ — margin bounds (bias-free ReLU networks) and first order — then
    the attack on certified (and as many uncertified) targets at that δ, judged by retraining: a
    certified prediction that changes is a violation.  Attacks are cached per (δ, target, lr).  If a check's
    retraining halves the judge's lr, the certificates and every check are made again at the new lr (the first
    order certificate follows the training the judge runs)."""
    from dataclasses import replace

    options, passes = _with_response(audit, options, retrain, max(deltas)), 0
    while True:
        lr, passes = retrain.lr, passes + 1
        kinds = _certificate_pass(audit, x_eval, deltas, options, checks, seed, retrain, state, log)
        if kinds is not None:
            break
        log(f"certificate: a check's retraining diverged and the reference halved its lr ({lr:.3g} → "
            f"{retrain.lr:.3g}): the certificates and their checks again at the new lr")
        options = replace(options, training=retrain.training()) if options.training else options
    main = kinds.get("margin bounds", kinds["first order"])
    return {"points": options.points, "response": options.response, "deltas": list(deltas), "passes": passes,
            "certified_fraction": main["certified_fraction"],
            "violations": sum(k["violations"] for k in kinds.values()), "kinds": kinds}


def _certificate_pass(audit, x_eval, deltas, options, checks, seed, retrain, state, log) -> dict | None:
    """:func:`_certify`'s certificates and checks at the judge's present lr; None as soon as a check halves it."""
    from dataclasses import replace

    from ..poisoning import margin
    from ..progress import counted
    from .bars import Bars

    problem, lr = audit.problem, retrain.lr
    tag = "" if lr is None else f"-lr{lr:.6g}"
    with Bars({"certificate": "first-order certificate (held-out points)"}) as bars:
        computed = audit.certificates(x_eval, deltas, options.points, options.training, progress=bars)
    if computed.skipped is not None:
        log(f"certificate: margin bounds skipped ({computed.skipped})")

    def flipped(delta: float, t: int) -> bool:
        def attacked():
            attack = audit.attack(margin(problem, x_eval[t]), replace(options, budget=delta), retrain=retrain)
            return {"flipped": attack.retrained[-1] < 0, "margin": attack.retrained[-1]}

        return retrain.cached(state, f"certify-{delta:g}-{t}{tag}", attacked)["flipped"]

    g = torch.Generator().manual_seed(seed + 3)
    kinds = {}
    for kind, cert in computed.kinds().items():
        rows = []
        for i, delta in enumerate(cert.deltas.tolist()):
            row = {"delta": delta, "certified_fraction": float(cert.fraction[i])}
            if cert.budgets is not None:
                row["layer_budgets"] = cert.budgets[i].tolist()
            if delta > 0 and checks:
                flips = {}
                for label, pool in (("certified", cert.certified[i]), ("uncertified", ~cert.certified[i])):
                    candidates = pool.nonzero().reshape(-1)
                    chosen = candidates[torch.randperm(len(candidates), generator=g)[:checks]].tolist()
                    desc = f"{kind} certificate check (δ = {100 * delta:g} %, {label})"
                    flips[label] = []
                    for t in counted(Bars(), chosen, desc):
                        flips[label].append(flipped(delta, t))
                        if retrain.lr != lr:  # the rest would be redone at the new lr
                            return None
                row.update(attacked={k: len(v) for k, v in flips.items()}, violations=sum(flips["certified"]),
                           uncertified_flipped=sum(flips["uncertified"]))
            rows.append(row)
            log(f"{kind} certificate at δ = {100 * delta:g} %: {row['certified_fraction']:.0%} certified"
                + (f", {row['violations']} violations in {row['attacked']['certified']} attacked"
                   if "violations" in row else ""))
        kinds[kind] = {"certified_fraction": cert.fraction.tolist(), "largest_delta_half_certified":
                       cert.largest_delta(0.5), "violations": sum(r.get("violations", 0) for r in rows), "checks": rows}
        if cert.kappa is not None:
            kinds[kind]["kappa"] = cert.kappa
        if cert.radius is not None:
            r = cert.radius
            kinds[kind]["radius"] = {"median": float(r.median()), "min": float(r.min()), "max": float(r.max())}
    return kinds

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


def _attack_figure(attack: dict, out) -> str:
    """The attack against its baselines after retraining: per budget (median, min–max drop, flip rates), or with
    one budget every target's margin before and after."""
    import matplotlib.pyplot as plt

    from ..report import save_figure

    budgets = attack["budgets"]
    pct = [100 * b["budget"] for b in budgets]
    follows = {"set": "solution set", "budget": "budget response"}[attack.get("response", "set")]
    kinds = (("attack", f"attack (along the {follows})"), ("loss-gradient", "own loss gradient"),
             ("random", "random directions"))
    rate = lambda b, kind: b["flip_rate"] if kind == "attack" else b["baseline_flip_rate"][kind]  # noqa: E731
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
    if len(budgets) == 1:  # one budget: every target's margin before and after, and the flip rates as bars
        rows = budgets[0]["targets"]
        at = range(len(rows))
        ax.plot(at, [r["start"] for r in rows], "k_", markersize=12, label="before (w̄)")
        for i, (kind, label) in enumerate(kinds):
            ax.plot([t + 0.15 * (i - 1) for t in at], [r[kind] for r in rows], "o", label=label)
        ax.axhline(0, color="grey", lw=0.8)
        top = max(max(r["start"], r["attack"], r["random"], r["loss-gradient"]) for r in rows)
        ax.set_ylim(top=1.45 * top if top > 0 else None)
        ax.set(xticks=list(at), xticklabels=[r["target"] for r in rows], xlabel="held-out target",
               ylabel=f"margin after retraining\n(budget {pct[0]:g} % per point; < 0: flipped)")
        ax.legend(fontsize=7, ncol=2, loc="upper left")
        ax2.bar(["attack", "own loss\ngradient", "random\ndirections"], [rate(budgets[0], k) for k, _ in kinds],
                color=["C0", "C1", "C2"])
        ax2.set(ylabel="targets flipped after retraining", ylim=(0, 1.05))
    else:
        for kind, label in kinds:
            drop = [b["margin_drop"][kind] for b in budgets]
            spread = [[d["median"] - d["min"] for d in drop], [d["max"] - d["median"] for d in drop]]
            ax.errorbar(pct, [d["median"] for d in drop], yerr=spread, marker="o", label=label, capsize=3)
        ax.set(xlabel="budget per point (% of ‖x_k‖)", ylabel="margin drop after retraining\n(median, min–max)")
        ax.legend(fontsize=7)
        for kind, label in kinds:
            ax2.plot(pct, [rate(b, kind) for b in budgets], marker="o", label=label)
        ax2.set(xlabel="budget per point (% of ‖x_k‖)", ylabel="targets flipped after retraining",
                ylim=(-0.05, 1.05))
    return save_figure(fig, out / "attack.png").name


def _figures(problem, result, summary, out, top: int) -> list[str]:
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
        fig, axes = plt.subplots(2, top, figsize=(1.1 * top, 2.6), squeeze=False)
        for r, (label, points) in enumerate(rows):
            for c, k in enumerate(points.tolist()):
                axes[r, c].imshow(x[k].reshape(side, side).cpu().numpy(), cmap="gray_r")
                axes[r, c].set_title(f"{k}\nκ={float(result.kappa[k]):.2g}", fontsize=6)
                axes[r, c].axis("off")
            axes[r, 0].text(-0.5, 0.5, label, transform=axes[r, 0].transAxes, ha="right", fontsize=7)
        names.append(save_figure(fig, out / "points.png").name)
    if "attack" in summary:
        names.append(_attack_figure(summary["attack"], out))
    if "certificate" in summary:
        c = summary["certificate"]
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for kind, k in c["kinds"].items():
            pairs = [(100 * d, f) for d, f in zip(c["deltas"], k["certified_fraction"]) if d > 0]
            ax.plot(*zip(*pairs), marker="o", label=kind)
        ax.set(xscale="log", xlabel=f"δ: budget per point for any {c['points']} points (% of ‖x_k‖)",
               ylabel="held-out predictions certified", ylim=(-0.05, 1.05))
        ax.legend(fontsize=7)
        names.append(save_figure(fig, out / "certificate.png").name)
    return names


@click.command("audit")
@model_options
@click.option("--queries", "n_queries", default=100, show_default=True, type=click.IntRange(0),
              help="One-point perturbation queries answered from the factorisation (0: none).")
@click.option("--top", default=10, show_default=True, type=click.IntRange(1), help="Points shown and retrained.")
@click.option("--step", default=1.0, show_default=True, type=click.FloatRange(0, 100, min_open=True),
              help="Size of each move in % of the point's norm (queries and --check).")
@click.option("--check", is_flag=True, help="Measure scan and queries against their references (slow).")
@click.option("--attack", "targets", default=0, show_default=True, type=click.IntRange(0),
              help="Attack the margins of this many held-out points through the coderivative, judged by retraining.")
@click.option("--budget", "budget_text", default="5,10,20", show_default=True,
              help="Attack budgets per point, in % of the point's norm (comma-separated).")
@click.option("--points", default=10, show_default=True, type=click.IntRange(1),
              help="Training points the attacker moves (and the certificate covers).")
@click.option("--stages", default=4, show_default=True, type=click.IntRange(1),
              help="The attack spends its budget in this many stages, retraining after each.")
@click.option("--attack-steps", default=10, show_default=True, type=click.IntRange(1),
              help="Projected-gradient steps of the attack per stage (1: the linearised optimum only).")
@click.option("--response", default="auto", show_default=True, type=click.Choice(["auto", "set", "budget"]),
              help="The first-order move of the weights the attack follows: the solution set's (retraining to "
                   "convergence) or the budget response's (linearised fine-tuning, --retrain-steps); auto: the one "
                   "that judges it (set for a squared error, else budget).")
@click.option("--certify", is_flag=True, help="Certify held-out predictions against any poisoning of --points points "
              "(first order; with margin bounds for bias-free ReLU networks — both first order in the set: they "
              "assume the set moves as its first-order estimate says, and only the margin step is proved).")
@click.option("--delta", "delta_text", default="1e-4,1e-3,1,3,10", show_default=True,
              help="Certificate budgets δ per point, in % of the point's norm (comma-separated).")
@click.option("--certify-checks", default=10, show_default=True, type=click.IntRange(0),
              help="Certified (and as many uncertified) held-out points attacked at each δ.")
@click.option("--retrain-steps", default=1000, show_default=True, type=click.IntRange(2),
              help="Steps of the budget response that judges --check, --attack and --certify (a loss other than "
                   "squared error: full-batch Nesterov SGD from w̄ on the perturbed minus on the clean data).")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0))
@click.option("--out", default="setsens-audit", show_default=True, type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON on stdout.")
def command(n_queries, top, step, check, targets, budget_text, points, stages, attack_steps, response, certify,
            delta_text, certify_checks, retrain_steps, seed, out, as_json, **inputs):
    """Rank the training points by how far they can move the solution set (Gauss–Newton form); with
    --attack, poison them against held-out predictions; with --certify, certify predictions."""
    from ..audit import Audit, GramFactor
    from ..gram import REFINE_POINTS, REFINE_SAMPLE, problem_key
    from ..perturb import gradient_perturbation
    from ..poisoning import AttackOptions
    from ..report import prepare_out_dir, to_jsonable, write_json, write_text
    from ..solution_set import estimate
    from .bars import Bars
    from .state import RunState

    log = (lambda *a: click.echo(*a, err=True)) if as_json else click.echo
    budgets, deltas = _check_options(inputs, targets, certify, check, budget_text, delta_text)
    polished = None
    if inputs["model_spec"] is None and inputs["checkpoint"] is None:
        from .demo import DemoConfig

        _check_counts(DemoConfig().n, top, points if targets or certify else None)
        _check_response(response, squared_error=True)
        out = prepare_out_dir(out)
        problem, x_eval = _demo_problem(out, log)
    else:
        def before_work(problem, data):
            _check_counts(problem.n, top, points if targets or certify else None)
            _check_problem(problem, held_out(data), targets, certify, check)
            _check_response(response, problem.loss_is_squared_error)
            prepare_out_dir(out)

        held_out = lambda data: data.x_test if data.x_test is not None else data.x  # noqa: E731
        problem, data, polished = load_problem(log=log, check=before_work, **inputs)
        x_eval, out = held_out(data), prepare_out_dir(out)
    state = RunState(out, {"model": inputs, "seed": seed, "stages": stages, "points": points,
                           "attack_steps": attack_steps, "response": response, "retrain_steps": retrain_steps,
                           "problem": problem_key(problem)})
    retrain = _Retrainer(problem, retrain_steps)
    t_one = None  # the unit of cost of the scan and the queries, timed only when queries are asked for
    if n_queries:
        log(f"one estimate (the unit of cost), p = {problem.p}, n = {problem.n}…")
        t0 = time.perf_counter()
        estimate(problem, gradient_perturbation(problem, [0], step / 100))
        t_one = time.perf_counter() - t0
    plan = _gram_plan(problem, check)
    how = {"dense": "G held", "streamed": f"Jacobians in panels of {plan.panel} points, G never held",
           "nystrom": f"the exact Gram matrix does not fit: a rank-{plan.rank} Nyström sketch, approximate, its top "
                      f"{REFINE_POINTS} points, {REFINE_SAMPLE} at random and those they show it may underrate then "
                      "solved exactly"}[plan.path]
    log(f"scan: factorising G Gᵀ ({plan.path}: {how}, about {plan.bytes / 1e9:.1f} GB) and every point's modulus…")
    t0 = time.perf_counter()
    with Bars({"gram": "Gram matrix (points)", "sketch": "Nyström sketch (Jacobian passes)",
               "refine": "exact top points (CG iterations)"}) as bars:
        audit = Audit(problem, GramFactor(problem, progress=bars, checkpoint=state.path("gram")))  # resumes per panel
        factor, result = audit.factor, audit.scan(progress=bars)
    t_scan = time.perf_counter() - t0
    summary = {"model": inputs["model_spec"] or "digits demo network", "p": problem.p, "n": problem.n,
               "polish": polished, "one_estimate_seconds": t_one,
               "scan": {"seconds": t_scan, "seconds_over_one_estimate": t_one and t_scan / t_one,
                        "factor_rank": factor.rank,
                        "factor": {"path": factor.plan.path, "panel": factor.plan.panel, "bytes": factor.plan.bytes,
                                   "sketch_rank": factor.plan.rank},
                        "exact_points": len(result.exact_points), "refine_error": result.refine_error,
                        "unresolved": result.unresolved.tolist(),
                        "kappa": {"min": float(result.kappa.min()), "median": float(result.kappa.median()),
                                  "max": float(result.kappa.max())},
                        "ranking": result.ranking[:20].tolist(), "kappa_top": result.kappa[result.top(20)].tolist()}}
    g = torch.Generator().manual_seed(seed + 4)
    group = lambda points: audit.group_modulus(points)[0]
    summary["scan"]["group"] = {"size": top, "kappa_top": group(result.top(top)), "kappa_random": statistics.median(
        group(torch.randperm(problem.n, generator=g)[:top]) for _ in range(5))}
    # the independent reference of every check: an SVD of G in float64, dropping what the factor drops
    pinv = torch.linalg.pinv(factor.G.double(), rtol=factor.rcond ** 0.5) if check else None
    if check:
        summary["scan"].update(_check_scan(problem, factor, pinv, result, x_eval, top, step / 100, seed, retrain, log))
    if n_queries:
        log(f"queries: {n_queries} one-point perturbations…")
        summary["queries"] = _queries(problem, n_queries, step / 100, seed, pinv, t_one, log)
    if response == "auto":
        response = "set" if problem.loss_is_squared_error else "budget"
    options = AttackOptions(points=points, stages=stages, steps=attack_steps, response=response)
    if targets:
        log(f"attack: {targets} held-out targets, {points} points, budgets {budget_text} %, "
            f"{stages} stage{'s' * (stages != 1)}…")
        summary["attack"] = _attack(audit, x_eval, targets, budgets, options, seed, retrain, state, log)
    if certify:
        log(f"certificate: any {points} points, δ = {delta_text} %…")
        summary["certificate"] = _certify(audit, x_eval, deltas, options, certify_checks, seed, retrain, state,
                                          log)
    if check or targets or certify:
        summary["retraining"] = retrain.record()
    figures = _figures(problem, result, summary, out, top)
    write_json(out / "results.json", summary)
    lines = ["# setsens audit", "", f"{summary['model']}: p = {problem.p}, n = {problem.n}.", ""]
    if polished:
        lines += [f"w̄ was first polished: {polish_summary(polished)}; everything below is about the polished weights.",
                  ""]
    body = len(lines)
    lines += _report_lines(summary, top, check, n_queries)
    lines += [""] + [f"![{f}]({f})" for f in figures]
    write_text(out / "report.md", "\n".join(lines) + "\n")
    if as_json:
        click.echo(json.dumps(to_jsonable(summary), indent=2))
    else:
        click.echo("\n".join(lines[body:-len(figures) - 1]))
        click.echo(f"report written to {out / 'report.md'}")


def _given(*names: str) -> list[str]:
    """The flags of those parameters of the running command that the user set (not left at their default)."""
    from click.core import ParameterSource

    ctx = click.get_current_context()
    flags = {p.name: p.opts[0] for p in ctx.command.params}
    return [flags[n] for n in names if ctx.get_parameter_source(n) not in (ParameterSource.DEFAULT, None)]


def _check_options(inputs: dict, targets: int, certify: bool, check: bool, budget_text: str,
                   delta_text: str) -> tuple:
    """Every option that can be checked before anything is loaded: the budgets and δ (as fractions), the options of
    a user's model only with ``--model``, those of the attack and of the certificate only with them."""
    from .options import number_list

    budgets = tuple(b / 100 for b in number_list(budget_text, "--budget", minimum=0, open_min=True))
    deltas = tuple(d / 100 for d in number_list(delta_text, "--delta", minimum=0))
    for hint, values in (("--budget", budgets), ("--delta", deltas)):
        if max(values) > 1:
            raise click.BadParameter("a budget above 100 % of the point's norm", param_hint=hint)
    if inputs["weight_decay"]:
        raise click.BadParameter("the audit uses the Gauss–Newton form, which has no weight-decay term",
                                 param_hint="--weight-decay")
    if inputs["model_spec"] is None and inputs["checkpoint"] is None:
        for flag in _given(*inputs)[:1]:
            raise click.BadParameter("describes your model: give --model too (without it the audit runs on the "
                                     "digits demo network)", param_hint=flag)
    elif inputs["data_spec"] is None:
        raise click.UsageError("give --data with --model")
    for names, needs, what in ((("budget_text",), targets, "--attack"),
                               (("delta_text", "certify_checks"), certify, "--certify"),
                               (("points", "stages", "attack_steps", "response"), targets or certify,
                                "--attack or --certify"),
                               (("retrain_steps",), targets or certify or check, "--attack, --certify or --check")):
        for flag in [] if needs else _given(*names)[:1]:
            raise click.BadParameter(f"applies with {what} only", param_hint=flag)
    return budgets, deltas


def _check_counts(n: int, top: int, points: int | None) -> None:
    for option, value in (("--top", top), ("--points", points)):
        if value is not None and value > n:
            raise click.BadParameter(f"{value} points asked for, but there are {n}", param_hint=option)


def _check_response(response: str, squared_error: bool) -> None:
    if response == "budget" and squared_error:
        raise click.BadParameter("a squared-error fit is judged by retraining to the exact fit, which the solution "
                                 "set predicts: the budget response applies to other losses", param_hint="--response")


def _check_problem(problem, x_eval, targets: int, certify: bool, check: bool) -> None:
    """What the loaded model must allow: margins (a classifier) for the attack and the certificate, as many
    held-out targets as asked for, and an output Jacobian that fits in memory."""
    out = problem.outputs(problem.params, problem.points([0])[0])
    if (targets or certify) and (out.ndim != 2 or out.shape[1] < 2):
        raise click.BadParameter(f"needs a classifier (margins between ≥ 2 outputs); the model's outputs have shape "
                                 f"{tuple(out.shape[1:])}", param_hint="--attack" if targets else "--certify")
    if targets > len(x_eval):
        raise click.BadParameter(f"{targets} held-out targets asked for, but there are {len(x_eval)} held-out points",
                                 param_hint="--attack")
    _gram_plan(problem, check)


def _gram_plan(problem, check: bool):
    """How the scan will factorise GGᵀ (:func:`setsens.gram.plan`); refused when it cannot fit, and with
    ``--check`` when G cannot be held for the SVD reference."""
    from ..gram import output_width, plan

    k = output_width(problem)
    try:
        chosen = plan(problem.n, k, problem.p, torch.finfo(problem.dtype).bits // 8)
    except ValueError as err:
        raise click.UsageError(str(err)) from None
    if check and chosen.path != "dense":
        raise click.UsageError(f"--check compares with the pseudo-inverse of G, {problem.n * k} × {problem.p}, which "
                               "does not fit here (the streamed factor is exact: tests/core/test_gram.py); "
                               "check on a subset of the training data")
    return chosen


def _sketch_note(s: dict) -> str:
    """What a Nyström scan's κ are (empty for the exact paths): which points were refined, and which it names but
    did not refine."""
    if s["factor"]["path"] != "nystrom":
        return ""
    head = f" (approximate: a rank-{s['factor']['sketch_rank']} Nyström sketch of GGᵀ; "
    if not s["exact_points"]:
        return (head + "its refinement of the top points did not converge (estimated κ error "
                f"{s['refine_error']:.1e}): every κ is the sketch's)")
    left = (f"; {len(s['unresolved'])} more may belong to the top but were not refined: {s['unresolved'][:10]}"
            if s["unresolved"] else "")
    return (head + f"κ refined for the {s['exact_points']} points it ranks highest or may underrate, from below, "
            f"estimated within {s['refine_error']:.1e} relative{left})")


def _size_verdict(b: dict) -> str:
    """Where the predicted drop is off by more than 10× the measured one (medians), say so: the first-order model
    is then outside its range at this budget, and only its direction is used."""
    measured = b["margin_drop"]["attack"]["median"]
    ratio = b["predicted_drop_median"] / measured if measured > 0 else math.nan
    if not math.isfinite(ratio) or 0.1 <= ratio <= 10:
        return ""
    return f", {ratio:.2g}× the measured drop (medians): outside its range at this budget, only its direction is used"


def _report_lines(summary: dict, top: int, check: bool, n_queries: int) -> list[str]:
    s, t_one = summary["scan"], summary["one_estimate_seconds"]
    unit = "" if t_one is None else f" = {s['seconds_over_one_estimate']:.2f}× one estimate ({t_one:.2f} s)"
    lines = [f"- scan of all {summary['n']} points in {s['seconds']:.2f} s{unit}; κ_k median "
             f"{s['kappa']['median']:.3g}, range "
             f"[{s['kappa']['min']:.3g}, {s['kappa']['max']:.3g}]; most sensitive points {s['ranking'][:top]}"
             + _sketch_note(s),
             f"- moved together, the top {top} points move the set up to {s['group']['kappa_top']:.3g} per unit ‖Δx‖ "
             f"(group modulus), {top} random points {s['group']['kappa_random']:.3g} (median of 5 draws)"]
    if check:
        lines.append(f"- against the SVD pseudo-inverse: Spearman {s['spearman_vs_exact']:.4f}, largest relative "
                     f"error on the top 20 {s['top20_max_relative_error']:.1e}; retraining moves held-out outputs "
                     f"{s['top_vs_random_ratio']:.1f}× more after moving the top {top} than {top} random points along "
                     f"their worst directions, {s['top_vs_random_direction_ratio']:.1f}× more than along random ones")
    if n_queries:
        q = summary["queries"]
        error = q.get("max_relative_error_vs_individual")  # measured with --check only
        lines.append(f"- {n_queries} queries in {q['seconds']:.2f} s = {q[f'time_{n_queries}_over_1']:.2f}× one "
                     f"estimate" + ("" if error is None else
                                    f"; largest relative error against individual solves {error:.1e}"))
    if "retraining" in summary:
        r = summary["retraining"]
        moved = r.get("change_when_halved")
        halved = f" (1/λ_max(H) halved {r['lr_halvings']}× after diverged runs)" if r.get("lr_halvings") else ""
        lines.append(f"- retraining (the reference of the checks below): {r['reference']}{halved}" + (
            "" if moved is None else f"; its answer moved by {moved['median']:.0%} (median; max {moved['max']:.0%}) "
            f"when its budget was halved, {moved['stable_fraction']:.0%} of {moved['runs']} runs within 10 %"))
    if "attack" in summary:
        a = summary["attack"]
        follows, predictor = {"set": ("the solution set", "the last stage's first-order set (its reference: "
                                                       "converged retraining)"),
                              "budget": ("the budget response", "the last stage's linearised fine-tuning (its "
                                                                "reference: the budget response)")}[a["response"]]
        stages = f"{a['stages']} stage{'s' * (a['stages'] != 1)}"
        lines.append(f"- attack ({a['points']} points, {stages}, following {follows}, judged by retraining) on "
                     f"{a['targets']} held-out targets:")
        for b in a["budgets"]:
            d = b["margin_drop"]
            lines.append(f"  - budget {100 * b['budget']:g} %: flips {b['flip_rate']:.0%} (random "
                         f"{b['baseline_flip_rate']['random']:.0%}, loss gradient "
                         f"{b['baseline_flip_rate']['loss-gradient']:.0%}); mean margin drop {d['attack']['mean']:.3f}"
                         f" = {b['margin_drop_over_best_baseline']:.1f}× the best baseline (random "
                         f"{d['random']['mean']:.3f}, loss gradient {d['loss-gradient']['mean']:.3f}); drop "
                         f"predicted by {predictor} {b['predicted_drop_mean']:.3g} (median "
                         f"{b['predicted_drop_median']:.3g}){_size_verdict(b)}")
        if a.get("passes", 1) > 1:
            lines.append(f"  - {a['passes']} passes: a retraining diverged and the reference halved its lr, so every "
                         "target was attacked and judged again at the new lr")
    if "certificate" in summary:
        c = summary["certificate"]
        for kind, k in c["kinds"].items():
            fractions = zip(c["deltas"], k["certified_fraction"])
            predicts = {"set": "the solution set", "budget": "the budget response"}[c.get("response", "set")]
            lines.append(f"- certificate ({kind}, of {predicts}) against any {c['points']} poisoned points: certified "
                         + ", ".join(f"{f:.0%} at δ = {100 * d:g} %" for d, f in fractions)
                         + f"; {k['violations']} violations after attacking certified points and retraining")
        if c.get("passes", 1) > 1:
            lines.append(f"  - {c['passes']} passes: a check's retraining diverged and the reference halved its lr, so "
                         "the certificates and every check were made again at the new lr")
    return lines
