"""``setsens lipschitz``: training-stability report (Algorithm 1 + Theorems 2–3) for a DFCNN.

Trains the digits DFCNN of the demo (or a smaller one), then reports side by side

* Theorem 2's closed-form κ_h per layer (max / median over points, Theorem 3's combination),
* the block-restricted numerical modulus for the same single points (relation R1–R3 of
  :mod:`setsens.lipschitz`),
* the numerical modulus ‖Jᵀ H⁺‖ of the whole network and of every layer, the coderivative
  criterion figure and the stability of κ over τ/10 … 10τ,
* the empirical modulus: warm-started retraining along ≥ 20 directions (worst case, next
  singular directions, loss gradient, single points, random), set shift ÷ ‖Δx‖,

and writes ``lipschitz.json``, ``lipschitz.md`` and figures into ``--out``.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, replace

import click
import numpy as np
import torch

from ..lipschitz import (
    DEFAULT_TAU,
    DenseModulus,
    EmpiricalRecord,
    closed_form_modulus,
    empirical_modulus,
    matrix_free_modulus,
)
from ..problem import Perturbation, Problem, squared_error
from ..progress import ProgressFn, report
from ..report import prepare_out_dir, save_figure, write_json, write_text
from .bars import Bars
from .options import number_list
from .seeds import distribution, parse_seeds
from .state import RunState

__all__ = ["LipschitzConfig", "train_dfcnn", "retraining_sweep", "run", "format_report", "expected_minutes",
           "command"]


@dataclass
class LipschitzConfig:
    points: int = 300
    depth: int = 2
    width: int = 32
    seed: int = 0
    adam_steps: int = 3000
    lbfgs_gtol: float = 1e-5
    lbfgs_max_iter: int = 3000
    directions: int = 20
    steps: tuple[float, ...] = (1e-3,)
    worst_steps: tuple[float, ...] = (1e-4, 1e-2)
    tau: float = DEFAULT_TAU
    scale: str = "exact"
    matrix_free: bool = False
    retrain: str = "auto"
    retrain_rtol: float = 1e-3
    retrain_floor: float = 0.3
    retrain_iter: int = 2000
    polish: str = "auto"


#: Settings that change no cached retraining (records are stored per direction and step).
UNCACHED = ("directions", "steps", "worst_steps", "matrix_free")
#: The dense modulus holds a few p × p float64 matrices: this many weights is about 4 GB.
MAX_DENSE_WEIGHTS = 10_000


def weight_count(cfg: LipschitzConfig, inputs: int = 64, outputs: int = 10) -> int:
    """p of the digits DFCNN ``inputs``-``width``×depth-``outputs`` (bias-free)."""
    return cfg.width * (inputs + (cfg.depth - 1) * cfg.width + outputs)


def train_dfcnn(cfg: LipschitzConfig, log=print) -> Problem:
    """The demo's digits DFCNN: bias-free ReLU MLP, squared loss, float64, Adam then L-BFGS."""
    from ..data.digits import load_digits_subset
    from ..models.mlp import mlp
    from ..retrain import retrain
    from ..training import adam_steps

    x, y = load_digits_subset(cfg.points, seed=cfg.seed)
    torch.manual_seed(cfg.seed)
    net = mlp([x.shape[1], *([cfg.width] * cfg.depth), 10]).double()
    target = torch.nn.functional.one_hot(y, 10).double()
    adam_steps(net.parameters(), lambda: 0.5 * ((net(x) - target) ** 2).sum(1).mean(), cfg.adam_steps)
    pb = Problem(net, squared_error, (x, y))
    res = retrain(pb, pb.params, None, gtol=cfg.lbfgs_gtol, max_iter=cfg.lbfgs_max_iter)
    log(f"trained: risk {res.risk:.3e}, ‖∇L‖ {res.grad_norm:.2e} ({res.iterations} L-BFGS iterations)")
    w = res.w
    if cfg.polish == "lm" or (cfg.polish == "auto" and pb.p * pb.n < 2e5):
        # small problems: Levenberg–Marquardt to exact interpolation (the paper's Assumption 1), so
        # that w̄ lies on the same zero-loss set the LM distance measurement projects onto
        from ..retrain import levenberg_marquardt

        lm = levenberg_marquardt(pb, w, None)
        log(f"polished (LM): risk {lm.risk:.3e}, ‖∇L‖ {lm.grad_norm:.2e}")
        w = lm.w
    return Problem(pb.model, squared_error, (x, y), params=w)


def _distance_fn(cfg: LipschitzConfig, problem: Problem):
    """Distance to a solution set, the foundation way, with a tolerance tied to ‖J Δx‖.

    L-BFGS stops at ``‖∇L‖ ≤ max(retrain_rtol · ‖∇L(w, xᵖ)‖, retrain_floor · ‖∇L(w̄)‖)`` or after
    ``retrain_iter`` iterations: no tighter than a fraction of w̄'s own stationarity (against a
    floor of 0.1 and 5000 iterations, 0.3 and 2000 move the headline ratios by 1.6–3.2 % at a
    quarter of the cost, while they differ by 47 % over seeds: docs/runs/lipschitz-tolerance.txt).
    """
    from ..retrain import distance_to_solution_set, retrain

    if cfg.retrain == "lm" or (cfg.retrain == "auto" and problem.p * problem.n < 2e5):
        return lambda pb, w, pert: distance_to_solution_set(pb, w, pert)
    g0 = float(problem.gradient().norm())

    def fn(pb, w, pert):
        # tolerance relative to the size of the optimality violation the perturbation causes
        scale = float(pb.gradient(w, pert).norm())
        return retrain(pb, w, pert, gtol=max(cfg.retrain_rtol * scale, cfg.retrain_floor * g0),
                       max_iter=cfg.retrain_iter)

    return fn


def _directions(problem: Problem, dm: DenseModulus, worst, cfg: LipschitzConfig, cf) -> dict:
    """Unit Δx over K = all points: worst case, next singular directions, gradient, single points, random."""
    g = torch.Generator().manual_seed(cfg.seed + 1)
    idx = dm.indices
    x, y = problem.points(idx)
    out: dict[str, Perturbation] = {}

    def add(name, delta, indices=idx):
        n = float(delta.norm())
        if n > 0 and len(out) < cfg.directions:
            out[name] = Perturbation(indices, delta / n)

    add("worst", worst.direction)
    for j, d in enumerate(worst.next_directions):
        add(f"singular-{j + 2}", d)
    grad_x = torch.func.grad(lambda xx: problem.per_sample_loss(problem.params, xx, y).sum())(x)
    add("gradient", grad_x)
    top = torch.argsort(cf.kappa[:, 0].nan_to_num(0, 0, 0), descending=True)[:4]
    for k in top.tolist():
        add(f"point-{k}-grad", grad_x[k : k + 1], idx[k : k + 1])
    r = 0
    while len(out) < cfg.directions:
        add(f"random-{r}", torch.randn(x.shape, generator=g, dtype=x.dtype))
        r += 1
    return out


def _fingerprint(w: torch.Tensor) -> str:
    return hashlib.sha256(w.detach().cpu().numpy().tobytes()).hexdigest()[:16]


def retraining_sweep(problem: Problem, dirs: dict, plan: list, reference_norm: float, distance, predicted: dict,
                     state: RunState | None = None, log=print, progress: ProgressFn | None = None
                     ) -> list[EmpiricalRecord]:
    """The empirical modulus over ``plan`` ((direction, step) pairs): the run's longest step.

    ``progress``: ``Progress("retraining", i, len(plan), {direction, step, ratio})`` after each retraining
    (without it, a log line each).

    Each record is cached in ``state`` as soon as it is measured, so a killed run resumes after the
    last one; cached records of another w̄ (another training) are discarded.  Runs on one thread:
    L-BFGS on tensors this small gains nothing from a second one, which only waits — on a loaded
    2-core machine each retraining took 9× the CPU time and wall time with two threads
    (docs/runs/lipschitz-default.txt); the figures are the same.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _sweep(problem, dirs, plan, reference_norm, distance, predicted, state, log, progress)
    finally:
        torch.set_num_threads(threads)


def _sweep(problem, dirs, plan, reference_norm, distance, predicted, state, log, progress) -> list[EmpiricalRecord]:
    w_bar = _fingerprint(problem.params)
    saved = state.load("retrainings") if state is not None else None
    if saved is None or saved["w_bar"] != w_bar:
        saved = {"w_bar": w_bar, "records": {}}
    done = saved["records"]
    cached = sum(f"{n}@{s!r}" in done for n, s in plan)
    if cached:
        log(f"resumed: {cached} of {len(plan)} retrainings cached in {state.dir}")
    records = []
    for name, step in plan:
        key = f"{name}@{step!r}"
        if key not in done:
            rec = empirical_modulus(problem, {name: dirs[name]}, [step], reference_norm, distance=distance,
                                    predicted=predicted)[0]
            done[key] = rec.as_dict()
            if state is not None:
                state.save("retrainings", saved)
            cached += 1
            report(progress, "retraining", cached, len(plan), direction=name, step=step, ratio=rec.ratio)
            if progress is None:
                log(f"{name:>14s} step {step:.0e}: ratio {rec.ratio:.4g}")
        records.append(EmpiricalRecord(**done[key]))
    return records


def run(cfg: LipschitzConfig, problem: Problem | None = None, log=print, state: RunState | None = None,
        progress: ProgressFn | None = None) -> dict:
    """The whole report as a JSON-able dict; ``state`` caches the retrainings (resumable)."""
    t_start = time.perf_counter()
    problem = train_dfcnn(cfg, log) if problem is None else problem
    stat = problem.stationarity(warn=False)
    cf = closed_form_modulus(problem)
    log(f"closed form: {cf.kappa.shape[0]} points × {len(cf.labels)} layers")
    dm = DenseModulus(problem, scale=cfg.scale, per_point=True, tau=cfg.tau)
    log(f"dense Hessian {dm.seconds_hessian:.1f}s, Jacobian Gram {dm.seconds_jacobian:.1f}s")
    blocks = list(dm.blocks)
    moduli = {b: dm.modulus(b, cfg.tau, n_directions=3 if b == "network" else 1) for b in blocks}
    net = moduli["network"]
    labels = ["network", *cf.labels]
    # closed form vs block-restricted numerical modulus, point by point (exact J scale)
    side = []
    layer_blocks = [n for n, _ in problem.blocks()]
    for h, (name, label) in enumerate(zip(layer_blocks, cf.labels)):
        kc = cf.kappa[:, h]
        kn = dm.point_kappa[name]
        finite = torch.isfinite(kc) & (kc > 0)
        ratio = (kn[finite] / kc[finite])
        side.append({
            "layer": label, "block": name, "size": problem.blocks()[h][1].stop - problem.blocks()[h][1].start,
            "closed_form_max": float(kc[finite].max()), "closed_form_median": float(kc[finite].median()),
            "theorem3": float(cf.theorem3()[h]) if torch.isfinite(cf.theorem3()[h]) else math.inf,
            "numerical_point_max": float(kn.max()), "numerical_point_median": float(kn.median()),
            "numerical_all_points": moduli[name].kappa,
            "ratio_numerical_to_closed_median": float(ratio.median()),
            "ratio_numerical_to_closed_min": float(ratio.min()),
            "ratio_numerical_to_closed_max": float(ratio.max()),
            "infinite_points": int((~torch.isfinite(kc)).sum()),
        })
    mf = None
    if cfg.matrix_free:
        t0 = time.perf_counter()
        mf = matrix_free_modulus(problem, tau=cfg.tau, scale=cfg.scale, criterion=False, solve_rtol=1e-8)
        ref = dm.modulus("network", cfg.tau, filter="tikhonov", stability=False)
        mf = {"kappa": mf.kappa, "dense_tikhonov_kappa": ref.kappa, "cost": mf.cost,
              "relative_difference": abs(mf.kappa - ref.kappa) / ref.kappa,
              "seconds": time.perf_counter() - t0}
        log(f"matrix-free κ {mf['kappa']:.5g} vs dense Tikhonov {ref.kappa:.5g}")
    # empirical modulus
    x_all, _ = problem.points(dm.indices)
    ref_norm = float(x_all.norm())
    dirs = _directions(problem, dm, net, cfg, cf)
    predicted = {}
    for name, unit in dirs.items():
        predicted[name] = dm.first_order_shift(unit, tau=cfg.tau)
    plan = [(name, s) for name in dirs for s in cfg.steps] + [("worst", s) for s in cfg.worst_steps
                                                               if s not in cfg.steps]
    records = retraining_sweep(problem, dirs, plan, ref_norm, _distance_fn(cfg, problem), predicted, state, log,
                               progress)
    small = [r for r in records if r.relative_step <= 1e-3]
    max_ratio = max(r.ratio for r in small)
    worst_small = [r for r in small if r.direction == "worst"]
    worst_ratio = min(worst_small, key=lambda r: r.relative_step).ratio if worst_small else math.nan
    result = {
        "config": asdict(cfg),
        "problem": {"p": problem.p, "n": problem.n, "risk": stat["risk"], "grad_norm": stat["grad_norm"],
                    "data_norm": ref_norm},
        "numerical_modulus": net.kappa,
        "numerical_modulus_per_block": {b: moduli[b].kappa for b in blocks},
        "closed_form_modulus": {s["layer"]: s["closed_form_max"] for s in side},
        "closed_form_theorem3": {s["layer"]: s["theorem3"] for s in side},
        "closed_form_vs_numerical": side,
        "aubin_residual": net.aubin_residual,
        "criterion_holds": net.criterion_holds,
        "moduli": {b: moduli[b].summary() for b in blocks},
        "ill_determined": {b: moduli[b].ill_determined for b in blocks},
        "matrix_free": mf,
        "empirical_max_ratio": max_ratio,
        "empirical_max_ratio_over_kappa": max_ratio / net.kappa,
        "worst_case_ratio": worst_ratio,
        "worst_case_ratio_over_kappa": worst_ratio / net.kappa,
        "directions": len(dirs),
        "empirical": [r.as_dict() for r in records],
        "labels": labels,
        "seconds": time.perf_counter() - t_start,
    }
    return result


def _fmt(v, spec=".4g"):
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "inf" if v == math.inf else "–"
    return format(v, spec)


def format_report(res: dict) -> str:
    """Markdown tables (also printed to the terminal)."""
    lines = [f"# Training stability (Lipschitz modulus) — p = {res['problem']['p']}, n = {res['problem']['n']}",
             "", f"risk {res['problem']['risk']:.3e}, ‖∇L‖ {res['problem']['grad_norm']:.2e}; "
             f"τ = {res['config']['tau']:g} (|λ| ≤ τ·λ_max is the null space), J scale {res['config']['scale']}", "",
             "## Numerical modulus κ = ‖Jᵀ H⁺‖ (all points perturbed)", "",
             "| block | κ | κ(τ/10) | κ(10τ) | change | criterion ‖(I−HH⁺)J‖/‖J‖ | null dim |",
             "|---|---|---|---|---|---|---|"]
    for b, m in res["moduli"].items():
        st = m["stability"]
        flag = " (ill-determined)" if st.get("ill_determined") else ""
        lines.append(f"| {b} | {_fmt(m['kappa'])} | {_fmt(st.get('tau_over_10'))} | {_fmt(st.get('tau_times_10'))} | "
                     f"{st.get('relative_change', 0):.1%}{flag} | {m['aubin_residual']:.2e} | {m['null_dim']} |")
    lines += ["", "## Theorem 2 closed form vs block-restricted numerical modulus (single points k)", "",
              "| layer | params | κ_h closed max | median | Thm 3 √Σκ² | κ_num,h({k}) max | median | "
              "num/closed min–median–max | κ_num,h(all) |", "|---|---|---|---|---|---|---|---|---|"]
    for s in res["closed_form_vs_numerical"]:
        lines.append(
            f"| {s['layer']} | {s['size']} | {_fmt(s['closed_form_max'])} | {_fmt(s['closed_form_median'])} | "
            f"{_fmt(s['theorem3'])} | {_fmt(s['numerical_point_max'])} | {_fmt(s['numerical_point_median'])} | "
            f"{s['ratio_numerical_to_closed_min']:.3g}–{s['ratio_numerical_to_closed_median']:.3g}–"
            f"{s['ratio_numerical_to_closed_max']:.3g} | {_fmt(s['numerical_all_points'])} |")
    if res.get("matrix_free"):
        mf = res["matrix_free"]
        lines += ["", f"Matrix-free κ (Tikhonov, Lanczos + LSMR): {mf['kappa']:.6g} vs dense Tikhonov "
                      f"{mf['dense_tikhonov_kappa']:.6g} (rel. diff {mf['relative_difference']:.1e}); "
                      f"{mf['cost']['hvp']} HVPs, {mf['cost']['solves']} solves, {mf['seconds']:.0f}s"]
    lines += ["", "## Empirical modulus: retraining (shift = d(w′, S(x̄)))", "",
              "| direction | step (of ‖x̄‖) | ‖Δx‖ | shift | ratio | ratio/κ | first-order ratio |",
              "|---|---|---|---|---|---|---|"]
    k = res["numerical_modulus"]
    for r in res["empirical"]:
        lines.append(f"| {r['direction']} | {r['relative_step']:.0e} | {r['dx_norm']:.3g} | {r['shift']:.3e} | "
                     f"{r['ratio']:.4g} | {r['ratio'] / k:.3f} | {_fmt(r['predicted_ratio'])} |")
    lines += ["", f"κ (whole network) = {k:.5g}; criterion residual {res['aubin_residual']:.2e}; "
                  f"max empirical ratio at steps ≤ 0.1 % over {res['directions']} directions = "
                  f"{res['empirical_max_ratio']:.5g} ({res['empirical_max_ratio_over_kappa']:.3f} κ); "
                  f"worst-case direction ratio {res['worst_case_ratio']:.5g} "
                  f"({res['worst_case_ratio_over_kappa']:.3f} κ)."]
    return "\n".join(lines) + "\n"


def plot(res: dict, out) -> list:
    import matplotlib.pyplot as plt

    k = res["numerical_modulus"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    ax = axes[0]
    recs = res["empirical"]
    for kind, style in [("worst", "o-"), ("singular", "s"), ("gradient", "^"), ("point", "v"), ("random", ".")]:
        rs = [r for r in recs if r["direction"].startswith(kind)]
        if rs:
            rs = sorted(rs, key=lambda r: r["dx_norm"])
            ax.loglog([r["dx_norm"] for r in rs], [r["shift"] for r in rs], style, label=kind, alpha=0.8)
    xs = np.array([min(r["dx_norm"] for r in recs), max(r["dx_norm"] for r in recs)])
    ax.loglog(xs, k * xs, "k--", label=f"κ‖Δx‖, κ = {k:.3g}")
    ax.set_xlabel("‖Δx‖")
    ax.set_ylabel("set shift d(w′, S(x̄))")
    ax.set_title("Retrained set shift vs data perturbation")
    ax.legend(fontsize=8)
    ax = axes[1]
    for s in res["closed_form_vs_numerical"]:
        ax.bar(s["layer"] + "\nclosed", s["closed_form_max"], color="tab:blue")
        ax.bar(s["layer"] + "\nnum.", s["numerical_point_max"], color="tab:orange")
    ax.set_yscale("log")
    ax.set_title("max over points: Theorem 2 κ_h vs block modulus κ_num,h({k})")
    paths = [save_figure(fig, out / "lipschitz_shift.png")]
    return paths


#: Measured with the defaults on 2 CPU cores shared with other jobs (docs/runs/lipschitz-default.txt,
#: 4.5 min; 2.2 min on one less loaded core): minutes per retraining (L-BFGS on the perturbed data
#: and back, 300 points, p = 3392) and for the rest (training, dense Hessian and Jacobian Gram, moduli).
MINUTES_PER_RETRAINING = 0.085
MINUTES_REST = 2.7


def retraining_count(cfg: LipschitzConfig) -> int:
    """Retrainings of one run: every direction at every step, the worst case at its extra steps."""
    return cfg.directions * len(cfg.steps) + len([s for s in cfg.worst_steps if s not in cfg.steps])


def expected_minutes(cfg: LipschitzConfig) -> float:
    """Wall time of one run on 2 CPU cores, from the defaults' measurement: a retraining's passes
    cost ∝ n·p, the dense Hessian and Jacobian Gram ∝ n·p²."""
    n, p = cfg.points / 300, weight_count(cfg) / 3392
    return MINUTES_REST * n * p**2 + MINUTES_PER_RETRAINING * retraining_count(cfg) * n * p


@click.command("lipschitz")
@click.option("--points", default=300, show_default=True, type=click.IntRange(10, 1797),
              help="digits training points n")
@click.option("--depth", default=2, show_default=True, type=click.IntRange(1), help="hidden ReLU layers H")
@click.option("--width", default=32, show_default=True, type=click.IntRange(1), help="hidden width m")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0))
@click.option("--seeds", default=None,
              help="Comma-separated seeds: run each (reports in seed<k>/) and give median, min and max of every "
                   "headline figure (overrides --seed).")
@click.option("--directions", default=20, show_default=True, type=click.IntRange(1),
              help="retraining directions (≥ 20 for the report)")
@click.option("--steps", default="1e-3", show_default=True, help="relative steps ‖Δx‖/‖x̄‖ for all directions")
@click.option("--worst-steps", default="1e-4,1e-2", show_default=True,
              help="extra relative steps for the worst-case direction (figure)")
@click.option("--tau", default=DEFAULT_TAU, show_default=True, type=click.FloatRange(0, 1, min_open=True),
              help="null-space tolerance |λ| ≤ τ·λ_max")
@click.option("--scale", type=click.Choice(["exact", "paper"]), default="exact", show_default=True,
              help="J scale: exact 1/n, or the paper's 1/|K|")
@click.option("--matrix-free/--no-matrix-free", default=False, show_default=True,
              help="also compute κ matrix-free (Lanczos + LSMR) and compare with the dense value")
@click.option("--retrain", type=click.Choice(["auto", "lm", "lbfgs"]), default="auto", show_default=True)
@click.option("--retrain-iter", default=2000, show_default=True, type=click.IntRange(1),
              help="L-BFGS iterations per retraining at most")
@click.option("--retrain-floor", default=0.3, show_default=True, type=click.FloatRange(0),
              help="retrain to ‖∇L‖ ≤ this × ‖∇L(w̄)‖ at least "
                   "(0.1 and --retrain-iter 5000: the former, tighter setting)")
@click.option("--adam-steps", default=3000, show_default=True, type=click.IntRange(0))
@click.option("--quick", is_flag=True, help="tiny network and data: 8 points, one hidden layer (seconds; for CI)")
@click.option("--out", default="setsens-report/lipschitz", show_default=True, type=click.Path(),
              help="report directory (its parent must exist; a killed run resumes from it)")
@click.option("--json", "as_json", is_flag=True, help="print the JSON summary to stdout")
@click.option("--threads", default=0, type=click.IntRange(0), help="torch threads (0: leave default)")
@click.option("--progress/--no-progress", default=True, show_default=True, help="progress bar with the time left")
def command(points, depth, width, seed, seeds, directions, steps, worst_steps, tau, scale, matrix_free, retrain,
            retrain_iter, retrain_floor, adam_steps, quick, out, as_json, threads, progress):
    """Lipschitz modulus and training stability (Theorems 2–3, coderivative criterion, retraining)."""
    cfg = LipschitzConfig(points=points, depth=depth, width=width, seed=seed, directions=directions,
                          steps=number_list(steps, "--steps", float, 0, open_min=True),
                          worst_steps=number_list(worst_steps, "--worst-steps", float, 0, open_min=True)
                          if worst_steps.strip() else (),
                          tau=tau, scale=scale, matrix_free=matrix_free, retrain=retrain, retrain_iter=retrain_iter,
                          retrain_floor=retrain_floor, adam_steps=adam_steps)
    if quick:
        cfg.points, cfg.depth, cfg.adam_steps = min(points, 8), 1, 300
        cfg.steps, cfg.worst_steps = (1e-4,), (1e-5, 1e-2)
    if weight_count(cfg) > MAX_DENSE_WEIGHTS:
        raise click.BadParameter(f"a {cfg.depth}-layer DFCNN of width {cfg.width} has {weight_count(cfg)} weights; "
                                 f"the dense modulus handles at most {MAX_DENSE_WEIGHTS}", param_hint="--width/--depth")
    seed_list = parse_seeds(seeds) if seeds else [seed]
    outdir = prepare_out_dir(out)
    if threads:
        torch.set_num_threads(threads)
    log = (lambda m: click.echo(m, err=True)) if as_json else click.echo
    if not quick:
        log(f"this takes about {expected_minutes(cfg) * len(seed_list):.0f} min on 2 CPU cores (mostly the "
            f"{retraining_count(cfg)} retrainings); --quick runs in about 30 s; a killed run resumes from --out")
    keys = ["numerical_modulus", "numerical_modulus_per_block", "closed_form_modulus", "closed_form_theorem3",
            "aubin_residual", "criterion_holds", "ill_determined", "empirical_max_ratio",
            "empirical_max_ratio_over_kappa", "worst_case_ratio", "worst_case_ratio_over_kappa", "directions",
            "matrix_free", "problem"]
    runs = []
    for s in seed_list:
        where = outdir if len(seed_list) == 1 else prepare_out_dir(outdir / f"seed{s}")
        cfg_s = replace(cfg, seed=s)
        with Bars(units={"retraining": "run"}) as bars:
            res = run(cfg_s, log=log, state=RunState(where, cfg_s, UNCACHED), progress=bars if progress else None)
        write_json(where / "lipschitz.json", res)
        write_text(where / "lipschitz.md", format_report(res))
        plot(res, where)
        runs.append(res)
    summary = {k: runs[0][k] for k in keys}
    if len(seed_list) > 1:
        numeric = [k for k in keys if all(isinstance(r[k], (int, float)) and not isinstance(r[k], bool) for r in runs)]
        summary = {"seeds": seed_list, **{k: distribution([r[k] for r in runs]) for k in numeric}}
        write_json(outdir / "headlines.json", summary)
    if as_json:
        from ..report import to_jsonable

        click.echo(json.dumps(to_jsonable(summary), indent=2))
    else:
        for res in runs:
            click.echo(format_report(res))
        if len(seed_list) > 1:
            click.echo("over seeds " + ", ".join(map(str, seed_list)) + ": " + "; ".join(
                f"{k} median {v['median']:.4g} ({v['min']:.4g} – {v['max']:.4g})"
                for k, v in summary.items() if isinstance(v, dict)))
        click.echo(f"wrote {outdir}")
