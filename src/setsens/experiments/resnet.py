"""``setsens resnet``: the reference paper's ResNet-56 / CIFAR-10 study (Tables 1–3, multi-start).

Protocol (section "Simulation on Resnet"): w̄ is a pretrained CIFAR ResNet, x̄ a subset of n
training images.  Points whose unperturbed loss is below ``threshold`` are moved along their own
input gradient ``∇ₓℓ`` by a step given as a fraction of the image norm; the step is either given
(``--step``, percent) or calibrated so that the mean loss on the moved points reaches
``--target-loss`` (the paper's ≈ 0.004).  The shift Δw is :func:`setsens.estimate`'s v₀ in one of
two forms (``--solver``), each with the iteration count as regulariser (``--maxiter``):

* ``gauss-newton`` (default): the minimum-norm shift that keeps every training output,
  ``G v = −r`` by CGLS (:mod:`setsens.function_space`), one JVP + one VJP pass per iteration;
* ``minres``: the least-squares problem of eq. 19, ``min ‖H v + J Δx‖``, by one MINRES solve with H
  products by the fastest autodiff mode of the device and, from the second solve on, deflation by
  the Ritz vectors recycled from earlier solves (all solves share H).

Both report the exact eq.-19 feasibility residual and the solve's cost in HVPs.

Reported: Table 1 (loss on the perturbed points at w̄ and at w̄ + v for each ``--points`` count),
Table 2 (``--scenarios`` random perturbations: relative distances between w̄, the estimate and
the warm-started retrained solution), Table 3 (step sweep; v is linear in Δx for a Krylov solve
from zero, so the sweep rescales one solve exactly), and ``--seeds`` estimates from different random
starts (the paper's multi-seed study, ``--seed-points`` points).  Every solve is checkpointed under
``OUT/state`` and an interrupted run resumes where it stopped.

Under ``torchrun`` with several processes the run is data-parallel: each rank holds its share of the
n images in a :class:`~setsens.distributed.DistributedProblem` and Tables 1 and 3 are computed (not
checkpointed); rank 0 writes and prints (docs/distributed.md).
"""

from __future__ import annotations

import json
import math
import os
import shlex
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import click
import torch
import torch.distributed as dist

from ..distributed import shard, world
from ..progress import ProgressFn, part
from ..report import atomic_torch_save
from .bars import Bars
from .options import first_line, npz_lengths, number_list
from .state import RunState

__all__ = ["command", "ResnetConfig", "run", "render_report", "QUICK", "PAPER"]

#: The paper's figures (Table 1 and Table 3), printed next to ours.
PAPER = {
    "table1": {1: (0.0041, 1.9e-5), 10: (0.0045, 6.2e-5)},
    "table3": {0.5: (0.15, 0.005), 1.0: (1.19, 0.3), 2.0: (3.35, 1.9)},
}


@dataclass
class ResnetConfig:
    depth: int = 56
    checkpoint: str = "../shared/data/resnet56-cifar10.th"
    data: str = "../shared/data/cifar10-subset.npz"
    n: int = 1000
    subset_seed: int | None = None
    points: tuple = (1, 10)
    threshold: float = 1e-5
    target_loss: float = 0.004
    step: float | None = None  # percent of the image norm; None → calibrate to target_loss
    sweep: tuple = (0.2, 0.5, 1.0, 2.0)
    scenarios: int = 10
    scenario_points: int = 1
    seeds: int = 3
    seed_points: int = 500
    start_radius: float = 0.5
    solver: str = "gauss-newton"
    maxiter: int = 50
    rtol: float = 1e-6
    recycle: int = 20
    retrain_iter: int = 50
    scale: str = "exact"
    dtype: str = "float32"
    device: str = "cpu"
    batch_size: int = 250
    n_test: int | None = None
    seed: int = 0
    landscape: bool = True
    grid: int = 11
    threads: int | None = None
    quick: bool = False


#: Settings that change no cached solve or retraining (the cache key leaves them out).
UNCACHED = ("threads", "landscape", "grid")


#: ``--quick``: a 2-core CPU in a few minutes (tiny subset, few iterations); same code path.
QUICK = dict(n=32, points=(1,), scenarios=2, seeds=2, seed_points=4, maxiter=10, recycle=8,
             retrain_iter=3, n_test=100, grid=4, batch_size=32)


def _pt(t):
    return {"float32": torch.float32, "float64": torch.float64}[t]


class _Run:
    """State of one run: the problem, recycled deflation, HVP accounting."""

    def __init__(self, cfg: ResnetConfig, out: Path | None, progress: ProgressFn | None):
        from ..data.cifar import load_cifar10
        from ..models.resnet import load_cifar_resnet
        from ..problem import Problem, cross_entropy

        self.cfg, self.out, self.progress = cfg, out, progress
        self.rank, self.world = world()
        # cached results are keyed by every setting they depend on; a data-parallel run caches nothing
        # (the ranks would have to agree on what each of them finds on disk)
        self.state = RunState(out, cfg, UNCACHED).dir if out is not None and self.world == 1 else None
        dtype = _pt(cfg.dtype)
        self.model = load_cifar_resnet(cfg.checkpoint, cfg.depth).to(cfg.device, dtype)
        options = dict(batch_size=cfg.batch_size, dtype=dtype, device=cfg.device)
        if self.world == 1:
            x, y = load_cifar10(cfg.data, "train", n=cfg.n, seed=cfg.subset_seed, dtype=dtype)
            self.problem = Problem(self.model, cross_entropy, (x, y), **options)
        else:  # this rank's rows of the subset only; indices stay global
            from ..distributed import DistributedProblem

            x, y = load_cifar10(cfg.data, "train", n=cfg.n, seed=cfg.subset_seed, dtype=dtype,
                                part=(self.rank, self.world))
            self.problem = DistributedProblem(self.model, cross_entropy, (x, y), n_total=cfg.n,
                                              offset=shard(cfg.n, self.rank, self.world).start, **options)
        self.deflation = None
        self.hvp_count = 0  # Hessian-vector products of this process
        self.solves: list[dict] = []

    # -- pieces ---------------------------------------------------------------------------------
    def per_sample_losses(self) -> torch.Tensor:
        """The unperturbed loss of every training point (n numbers; a data-parallel run sums the ranks' rows)."""
        p = self.problem
        with torch.no_grad():
            mine = torch.cat([p.per_sample_loss(p.params, x, y) for x, y in p.batches()]).double()
        losses = torch.zeros(p.n, dtype=torch.float64, device=mine.device)
        losses[p.rows.start:p.rows.stop] = mine
        return p.reduce(losses).cpu()

    def direction(self, idx: torch.Tensor):
        from ..perturb import gradient_perturbation

        return gradient_perturbation(self.problem, idx, 1.0)  # unit relative step; scaled below

    def calibrate(self, unit, target: float) -> float:
        """Relative step s (fraction) so that the mean loss on the moved points is ``target``."""
        lo, hi = 1e-6, 0.5
        f = lambda s: self.problem.loss_on(unit.indices, perturbation=unit.scaled(s))  # noqa: E731
        if f(hi) < target:
            return hi
        for _ in range(40):
            mid = math.sqrt(lo * hi)
            lo, hi = (mid, hi) if f(mid) < target else (lo, mid)
            if hi / lo < 1.01:
                break
        return math.sqrt(lo * hi)

    def step_for(self, unit) -> float:
        """The relative step: ``--step`` if given, else calibrated to ``--target-loss``."""
        return self.cfg.step / 100 if self.cfg.step is not None else self.calibrate(unit, self.cfg.target_loss)

    def solve(self, name: str, pert, x0: torch.Tensor | None = None, recycle: bool = True, track=None) -> dict:
        """v for ``pert``: :func:`setsens.estimate`'s v₀ after ``--maxiter`` iterations (checkpointed, resumable).

        ``gauss-newton``: CGLS on ``G v = −r``, one JVP and one VJP pass per iteration.  ``minres``: one
        MINRES solve of ``H v = −J Δx`` (eq. 19), one HVP per iteration, deflated by recycled Ritz
        vectors.  The estimate's feasibility residual ``‖Hv + JΔx‖/‖JΔx‖`` costs one more HVP, whose
        time states the solve's cost in HVPs.  ``track(v) -> dict`` is evaluated on every iterate
        (``out["path"]``).
        """
        import warnings

        from ..krylov import Deflation
        from ..problem import NotStationaryWarning
        from ..solution_set import RadiusOptions, SolveOptions, estimate

        cfg = self.cfg
        cache = self.state / f"{name}.pt" if self.state is not None else None
        if cache is not None and cache.exists():
            saved = torch.load(cache, weights_only=False)
            if "v" in saved and saved.get("solver") == cfg.solver:
                return self._recorded(name, saved)
        checkpoint = str(self.state / f"{name}.solver.pt") if self.state else None
        # the per-iterate path is saved beside the solver's checkpoint, so a resumed solve keeps it
        path_file = Path(f"{checkpoint}.path") if checkpoint else None
        path = torch.load(path_file, weights_only=False) if path_file and path_file.exists() else []

        def cb(it, res, v):
            if track is not None:
                path[:] = [p for p in path if p["iteration"] < it] + [{"iteration": it, "residual": res} | track(v)]
                if path_file:
                    atomic_torch_save(path, path_file)

        minres = cfg.solver == "minres"
        defl = self.deflation if (minres and recycle and cfg.recycle > 0) else None
        hessian_only = dict(min_norm=False, deflation=defl, keep_basis=cfg.recycle > 0) if minres else {}
        opts = SolveOptions(maxiter=cfg.maxiter, rtol=cfg.rtol, rule="fixed", hvp_mode="auto", x0=x0,
                            checkpoint=checkpoint, callback=cb, **hessian_only)
        with warnings.catch_warnings():  # the run reports stationarity itself
            warnings.simplefilter("ignore", NotStationaryWarning)
            est = estimate(self.problem, pert, "hessian" if minres else "gauss-newton", scale=cfg.scale, solve=opts,
                           radius=RadiusOptions(directions=0),
                           progress=part(self.progress, f"{cfg.solver} {name}", 0, cfg.maxiter))
        krylov = est.krylov
        if minres and cfg.recycle > 0 and krylov.basis is not None:
            try:
                self.deflation = Deflation.from_krylov(krylov, cfg.recycle)
            except ValueError:
                pass
        self.hvp_count += est.cost["hvp"]
        seconds, hvp_seconds = est.cost["solve_seconds"], est.cost["hvp_seconds"]
        out = {
            "v": est.shift, "solver": cfg.solver, "iterations": krylov.iterations, "resumed_from": krylov.resumed_from,
            "hvp_count": krylov.products if minres else 0, "jvp_vjp_passes": None if minres else krylov.products,
            "deflated_with": defl.k if defl is not None else 0, "feasibility_residual": est.feasibility_residual,
            "solver_residuals": krylov.residuals, "path": path, "seconds": seconds,
            "hvp_seconds": hvp_seconds, "cost_in_hvps": seconds / hvp_seconds,
        }
        if cache is not None:
            atomic_torch_save(out, cache)
            for f in (Path(checkpoint), path_file):
                f.unlink(missing_ok=True)
        return self._recorded(name, out)

    def _recorded(self, name: str, out: dict) -> dict:
        """Log a solve (computed now or read from the cache) in the run's list of solves."""
        self.solves.append({k: out[k] for k in ("solver", "hvp_count", "jvp_vjp_passes", "iterations", "deflated_with",
                                                 "seconds", "cost_in_hvps")} | {"name": name})
        return out

    def evaluate(self, pert, v, base_losses) -> dict:
        p = self.problem
        idx = pert.indices
        lo = p.loss_on(idx, perturbation=pert)
        le = p.loss_on(idx, p.params + v, perturbation=pert)
        lb = float(base_losses[idx].mean())
        return {"risk_original": p.risk(perturbation=pert), "risk_estimated": p.risk(p.params + v, perturbation=pert),
            "loss_base": lb, "loss_original": lo, "loss_estimated": le,
            "loss_reduction": lo / le if le > 0 else math.inf,  # float32 rounds losses below ~6e-8 to 0
            "increase_removed": (lo - le) / (lo - lb) if lo > lb else float("nan"),
            "norm_v": float(v.norm()), "relative_shift": float(v.norm() / p.params.norm()),
        }


def _other_scale(scale: str, n: int, k: int) -> tuple[str, float]:
    """The J scaling not solved for, and the factor that maps v to it (a Krylov solve from zero is
    linear in its right-hand side, so the other scaling's estimate is an exact multiple)."""
    return ("paper", n / k) if scale == "exact" else ("exact", k / n)


def _choose(candidates: torch.Tensor, k: int, g: torch.Generator) -> torch.Tensor:
    if k > candidates.numel():
        raise click.UsageError(f"asked for {k} points but only {candidates.numel()} are eligible")
    return candidates[torch.randperm(candidates.numel(), generator=g)[:k]].sort().values


def distributed_conflicts(cfg) -> list[str]:
    """What a data-parallel run (several ranks) cannot do with ``cfg`` (a dict or a :class:`ResnetConfig`).

    Such a run computes Table 1 with the Gauss–Newton estimate and Table 3 (a rescaling of it);
    Table 2's retraining, the multi-start study, the landscape and MINRES's Ritz recycling are not
    made data-parallel here.
    """
    c = asdict(cfg) if not isinstance(cfg, dict) else cfg
    bad = [f"{flag} {c[key]}" for flag, key in (("--scenarios", "scenarios"), ("--seeds", "seeds")) if c[key]]
    if c["grid"] > 1:
        bad.append(f"--grid {c['grid']}")
    if c["solver"] != "gauss-newton":
        bad.append(f"--solver {c['solver']}")
    if str(c["device"]).startswith("cuda:"):
        bad.append(f"--device {c['device']} (give --device cuda: each rank takes the GPU of its LOCAL_RANK)")
    return bad


def run(cfg: ResnetConfig, out: Path | None = None, progress: ProgressFn | None = None) -> dict:
    """Run the whole protocol; returns the results (also written to ``out`` when given).

    The steps, in order (each a function below, sharing the one seeded generator ``g`` for the points
    they choose): the model's test accuracy and w̄'s stationarity (:func:`_model`), the points eligible
    to move (:func:`_eligible`), Table 1 (:func:`_table1`), Table 3 (:func:`_table3`), Table 2
    (:func:`_table2`), the estimates from random starts (:func:`_multistart`), the landscape
    (:func:`_landscape`) and the summary (:func:`_summary`).

    Under an initialised process group of several ranks (``torchrun``) the run is data-parallel:
    every rank calls this with the same ``cfg``, holds its share of the n images and computes Tables
    1 and 3 (see :func:`distributed_conflicts`); all ranks return the same numbers.  Pass ``out`` on
    one rank only (it writes); nothing is cached for a resume.
    """
    from ..perturb import gradient_perturbation  # noqa: F401  (import errors early)

    t_start = time.perf_counter()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    rank, size = world()
    conflicts = distributed_conflicts(cfg) if size > 1 else []
    if conflicts:
        raise ValueError(f"a data-parallel run computes Tables 1 and 3 only: {', '.join(conflicts)}")
    R = _Run(cfg, out, progress if rank == 0 else None)
    p = R.problem
    g = torch.Generator().manual_seed(cfg.seed)
    results: dict = {"config": asdict(cfg), "model": {"depth": cfg.depth, "p": p.p, "n": p.n}}
    if R.world > 1:
        results["distributed"] = {"world_size": R.world, "backend": dist.get_backend(),
                                  "rows_per_rank": [len(range(cfg.n)[shard(cfg.n, r, R.world)])
                                                    for r in range(R.world)]}
    results["model"] |= _model(R)
    losses, eligible = _eligible(R, results)
    table1, first_unit, first_sol = _table1(R, eligible, losses, g)
    results["table1"] = table1
    results["table3"] = _table3(R, table1, first_unit, first_sol, losses)
    results["table2"] = _table2(R, eligible, losses, g, results)
    seeds = _multistart(R, eligible, losses, first_sol["step"])
    if seeds:
        results["seeds"] = seeds
    if cfg.landscape and out is not None and cfg.grid > 1:
        results["landscape"] = _landscape(R, seeds.get("runs", []) if seeds else [], first_unit.scaled(
            table1[0]["step_percent"] / 100), first_sol["v"])
    results["solves"] = R.solves
    results["summary"] = _summary(R, table1[0], t_start)
    return results


def _model(R: _Run) -> dict:
    """The model's accuracy on the first ``--n-test`` test images (this rank's share, all-reduced), or why not."""
    cfg, p = R.cfg, R.problem
    if cfg.n_test == 0:
        return {}
    from ..data.cifar import load_cifar10

    try:
        try:  # the first n_test test images (all of them if there are fewer), this rank's share
            xt, yt = load_cifar10(cfg.data, "test", n=cfg.n_test or None, dtype=_pt(cfg.dtype),
                                  part=(R.rank, R.world))
        except ValueError:
            if not cfg.n_test:
                raise
            xt, yt = load_cifar10(cfg.data, "test", dtype=_pt(cfg.dtype), part=(R.rank, R.world))
        correct = 0
        with torch.no_grad():
            for s in range(0, len(yt), 250):
                correct += int((R.model(xt[s:s + 250].to(cfg.device)).argmax(1).cpu() == yt[s:s + 250]).sum())
        n_test = int(p.reduce(float(len(yt))))
        return {"test_accuracy": p.reduce(float(correct)) / n_test, "n_test": n_test}
    except (FileNotFoundError, ValueError) as err:
        return {"test_accuracy_error": str(err)}


def _eligible(R: _Run, results: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """w̄'s stationarity and per-sample losses (into ``results``), and the points eligible to move: loss below
    ``--threshold``, or the lowest losses when too few are."""
    cfg, p = R.cfg, R.problem
    st = p.stationarity(warn=False)
    losses = R.per_sample_losses()
    results["stationarity"] = st | {"per_sample_loss_median": float(losses.median()),
                                    "per_sample_loss_max": float(losses.max())}
    eligible = torch.nonzero(losses < cfg.threshold).reshape(-1)
    results["eligible_points"] = int(eligible.numel())
    if eligible.numel() < max(cfg.points):
        # not enough near-zero-loss points (tiny subsets, random weights): take the lowest losses
        eligible = torch.argsort(losses)[: max(max(cfg.points), cfg.scenario_points, 1)].sort().values
        results["eligible_fallback"] = (f"fewer than {max(cfg.points)} points below {cfg.threshold:g}: "
                                        "used the lowest losses")
    return losses, eligible


def _table1(R: _Run, eligible, losses, g) -> tuple[list, object, dict]:
    """Table 1: one solve per ``--points`` count; returns its rows, the first row's unit direction and its
    solve (with the relative ``step`` used everywhere after)."""
    cfg, p, out = R.cfg, R.problem, R.out
    table1, step = [], None
    for k in cfg.points:
        idx = _choose(eligible, k, g)
        unit = R.direction(idx)
        s = R.step_for(unit)
        step = s if step is None else step
        pert = unit.scaled(s)
        other, factor = _other_scale(cfg.scale, p.n, k)
        track = lambda v: {"loss": p.loss_on(idx, p.params + v.to(p.params), perturbation=pert),  # noqa: E731
                           f"loss_{other}_scale": p.loss_on(idx, p.params + factor * v.to(p.params), perturbation=pert)}
        sol = R.solve(f"table1_{k}", pert, recycle=False, track=track)
        row = {"points": k, "indices": idx.tolist(), "step_percent": 100 * s} | R.evaluate(pert, sol["v"], losses)
        row[f"{other}_scale"] = R.evaluate(pert, factor * sol["v"], losses)
        row |= {kk: sol[kk] for kk in ("feasibility_residual", "hvp_count", "jvp_vjp_passes", "iterations", "seconds",
                                        "hvp_seconds", "cost_in_hvps", "deflated_with")}
        row["solver_residuals"] = sol["solver_residuals"]
        row["path"] = sol.get("path", [])
        gap = row["loss_original"] - row["loss_base"]
        for key, name in (("loss", "iterations_to_99_percent"),
                          (f"loss_{other}_scale", f"iterations_to_99_percent_{other}_scale")):
            hit = [q["iteration"] for q in row["path"] if row["loss_original"] - q[key] >= 0.99 * gap]
            row[name] = hit[0] if hit else None
        row["paper"] = PAPER["table1"].get(k)
        table1.append(row)
        if k == cfg.points[0]:
            first_unit, first_sol = unit, sol | {"step": step}
        if out is not None:
            (out / "state").mkdir(exist_ok=True)
            atomic_torch_save({"w_bar": p.params, "v": sol["v"], "indices": idx, "delta": pert.delta},
                              out / "state" / f"estimate_table1_{k}.pt")
    return table1, first_unit, first_sol


def _table3(R: _Run, table1, first_unit, first_sol, losses) -> list:
    """Table 3: the step sweep, an exact rescaling of the first solve (a Krylov solve from zero is linear in Δx)."""
    s0 = table1[0]["step_percent"] / 100
    table3 = []
    for pct in R.cfg.sweep:
        pert = first_unit.scaled(pct / 100)
        v = first_sol["v"] * (pct / 100 / s0)
        row = {"step_percent": pct} | R.evaluate(pert, v, losses)
        row["paper"] = PAPER["table3"].get(float(pct))
        table3.append(row)
    return table3


def _table2(R: _Run, eligible, losses, g, results: dict) -> list:
    """Table 2: ``--scenarios`` perturbations, each solved and retrained (cached per scenario).

    Reference: the *perturbation-induced* retrained shift Δw_ret = w_ret(xᵖ) − w_ret(x̄), both
    warm-started L-BFGS runs from w̄ with the same budget.  w̄ is only approximately stationary on
    the subset, so w_ret(xᵖ) − w̄ also contains the descent that retraining on x̄ alone makes."""
    from ..retrain import retrain

    cfg, p = R.cfg, R.problem
    rows = []
    wbar = p.params
    nb = float(wbar.norm())

    def retrained(name, pert):
        cache = R.state / f"{name}.pt" if R.state is not None else None
        if cache is not None and cache.exists():
            return torch.load(cache, weights_only=False)
        rr = retrain(p, wbar, pert, gtol=1e-7, max_iter=cfg.retrain_iter)
        res = (rr.w, {"iterations": rr.iterations, "evaluations": rr.evaluations, "grad_norm": rr.grad_norm,
                      "seconds": rr.seconds, "converged": rr.converged})
        if cache is not None:
            atomic_torch_save(res, cache)
        return res

    if cfg.scenarios > 0:
        w_ret0, rinfo0 = retrained("retrain_unperturbed", None)
        results["retrain_unperturbed"] = rinfo0 | {"rel_diff_original_retrained": float((w_ret0 - wbar).norm()) / nb}
        k = min(cfg.scenario_points, eligible.numel())
        distinct = eligible.numel() >= k * cfg.scenarios
        order = eligible[torch.randperm(eligible.numel(), generator=g)]
    for j in range(cfg.scenarios):
        idx = order[j * k:(j + 1) * k].sort().values if distinct else _choose(eligible, k, g)
        unit = R.direction(idx)
        s_j = R.step_for(unit)
        pert = unit.scaled(s_j)
        sol = R.solve(f"scenario_{j}", pert)
        v = sol["v"]
        w_ret, rinfo = retrained(f"retrain_{j}", pert)
        shift = w_ret - w_ret0  # the retrained shift caused by the perturbation
        ds = float(shift.norm())
        row = {"scenario": j, "indices": idx.tolist(), "step_percent": 100 * s_j} | R.evaluate(pert, v, losses)
        row |= {"iterations": sol["iterations"], "hvp_count": sol["hvp_count"], "deflated_with": sol["deflated_with"],
                "feasibility_residual": sol["feasibility_residual"],
                "rel_diff_original_estimated": float(v.norm()) / nb,
                "rel_diff_original_retrained": float((w_ret - wbar).norm()) / nb,
                "rel_diff_estimated_retrained": float((wbar + v - w_ret).norm()) / nb,
                "rel_retrained_shift": ds / nb,
                "estimate_error_vs_shift": float((v - shift).norm()) / max(ds, 1e-300),
                "cosine_estimate_retrained": float(v @ shift) / max(float(v.norm()) * ds, 1e-300),
                "loss_retrained": p.loss_on(idx, w_ret, perturbation=pert), "retrain": rinfo}
        rows.append(row)
    return rows


def _multistart(R: _Run, eligible, losses, step: float) -> dict | None:
    """``--seeds`` estimates of one perturbation from random starts at ``--start-radius`` (None without)."""
    cfg, p, out = R.cfg, R.problem, R.out
    if cfg.seeds <= 0:
        return None
    seeds = []
    k = min(cfg.seed_points, p.n)
    pool = eligible if eligible.numel() >= k else torch.argsort(losses)[:k].sort().values
    idx = _choose(pool, k, torch.Generator().manual_seed(cfg.seed + 1))
    pert = R.direction(idx).scaled(step)
    ref = None
    for s in range(cfg.seeds):
        if s == 0:
            x0 = None
        else:
            g_s = torch.Generator().manual_seed(1000 + s)
            z = torch.randn(p.p, generator=g_s, dtype=torch.float64).to(ref.device)
            x0 = z * (cfg.start_radius * ref.norm() / z.norm())
        sol = R.solve(f"seed_{s}", pert, x0=x0, recycle=False)
        if ref is None:
            ref = sol["v"].double()
        seeds.append({"seed": s, "start_norm": 0.0 if x0 is None else float(x0.norm())}
                     | R.evaluate(pert, sol["v"], losses)
                     | {"hvp_count": sol["hvp_count"], "feasibility_residual": sol["feasibility_residual"],
                        "distance_to_seed0": float((sol["v"].double() - ref).norm())})
        if out is not None:
            atomic_torch_save({"v": sol["v"], "indices": idx, "delta": pert.delta},
                              out / "state" / f"estimate_seed_{s}.pt")
    return {"points": k, "step_percent": 100 * step, "runs": seeds}


def _landscape(R: _Run, seeds: list, first_pert, first_v) -> dict:
    """The perturbed loss on the plane through w̄ and the estimates (those from random starts if any, else
    Table 1's first), its figures written to ``out``."""
    from ..landscape import landscape, plane_directions, plot_landscape
    from ..report import save_figure

    cfg, p, out = R.cfg, R.problem, R.out
    wbar = p.params
    est = {"estimate_seed_" + str(r["seed"]): out / "state" / f"estimate_seed_{r['seed']}.pt" for r in seeds}
    if est:
        first = torch.load(next(iter(est.values())), weights_only=False)
        from ..problem import Perturbation

        pert = Perturbation(first["indices"], first["delta"])
        vs = {k: torch.load(f, weights_only=False)["v"] for k, f in est.items()}
    else:
        pert, vs = first_pert, {"estimate": first_v}
    d1, d2 = plane_directions(p, wbar + next(iter(vs.values())), torch.Generator().manual_seed(cfg.seed + 7))
    grid = torch.linspace(-0.5, 1.5, cfg.grid).tolist()
    marks = {"original": wbar} | {k: wbar + v for k, v in vs.items()}
    ls = landscape(p, d1, d2, grid, grid, perturbation=pert, marks=marks, kind="estimate")
    fc, fs = plot_landscape(ls, title=f"ResNet-{cfg.depth}, {len(pert.indices)} perturbed points")
    save_figure(fc, out / "landscape_contour.png")
    save_figure(fs, out / "landscape_surface.png")
    return ls.to_dict()


def _summary(R: _Run, first: dict, t_start: float) -> dict:
    """The headline figures: Table 1's first row, the solver's cost, the run's time."""
    cfg = R.cfg
    return {
        "loss_original": first["loss_original"], "loss_estimated": first["loss_estimated"],
        "loss_reduction": first["loss_reduction"], "increase_removed": first["increase_removed"],
        "feasibility_residual": first["feasibility_residual"], "solver": cfg.solver, "iterations": first["iterations"],
        "hvp_count": first["hvp_count"], "cost_in_hvps": first["cost_in_hvps"],
        "iterations_to_99_percent": first["iterations_to_99_percent"],
        "other_scale": {k: v for k, v in first.items() if k.endswith(("_scale", "_scale_percent"))},
        "hvp_count_total": R.hvp_count, "step_percent": first["step_percent"], "points": first["points"],
        "seconds": time.perf_counter() - t_start,
    }


def _solver_line(cfg: dict) -> str:
    if cfg["solver"] == "gauss-newton":
        what = ("Solver: Gauss–Newton / function space (CGLS on G v = −r: keep every training output; "
                f"one JVP + one VJP pass per iteration), at most {cfg['maxiter']} iterations per solve "
                "(the regulariser)")
    else:
        what = (f"Solver: MINRES on eq. 19 (H v = −J Δx), at most {cfg['maxiter']} Hessian-vector products per solve "
                f"(the regulariser), recycling {cfg['recycle']} Ritz vectors across solves")
    return what + f"; dtype {cfg['dtype']}, J scaling '{cfg['scale']}'."


def _x(ratio) -> str:
    """A reduction factor; ∞ where the loss at the estimate rounds to 0 (float32: below ~6e-8)."""
    return "∞ (loss 0 in dtype)" if ratio is None or math.isinf(ratio) else f"{ratio:.3g}×"


def _e(v):
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3g}"


def render_report(r: dict, command_line: str = "") -> str:
    cfg, m, st = r["config"], r["model"], r["stationarity"]
    L = [f"# ResNet-{cfg['depth']} set-valued sensitivity (CIFAR-10)", ""]
    if command_line:
        L += [f"Command: `{command_line}`", ""]
    L += [f"p = {m['p']:,} parameters, n = {m['n']} training images"
          + (f", test accuracy {100 * m['test_accuracy']:.1f} % on {m['n_test']} test images"
             if "test_accuracy" in m else "")
          + f".  At w̄: risk {st['risk']:.3e}, ‖∇L‖ = {st['grad_norm']:.3e} (relative {st['relative_grad_norm']:.2e}); "
          f"{r['eligible_points']} points with loss < {cfg['threshold']:g}.", ""]
    if "distributed" in r:
        d = r["distributed"]
        L += [f"Data-parallel: {d['world_size']} processes ({d['backend']}), "
              f"{min(d['rows_per_rank'])}–{max(d['rows_per_rank'])} images each; Tables 1 and 3 only.", ""]
    L += [_solver_line(cfg), "",
          "## Table 1 — loss on the perturbed points", "",
          "| points | step (% of ‖x‖) | base loss | at w̄ | at w̄ + v | reduction | increase removed | "
          "iterations to 99 % | "
          "other J scaling: at w̄ + v, removed, iterations to 99 % | risk on all data: w̄ → w̄ + v | "
          "feasibility ‖Hv+JΔx‖/‖JΔx‖ | iterations (cost in HVPs) | paper (w̄ → est.) |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    other = "paper" if cfg["scale"] == "exact" else "exact"
    for t in r["table1"]:
        pp, o = t["paper"], t.get(f"{other}_scale")
        alt = (f"{other}: {_e(o['loss_estimated'])}, {100 * o['increase_removed']:.2f} %, "
               f"{_e(t.get(f'iterations_to_99_percent_{other}_scale'))}") if o else "—"
        L.append(f"| {t['points']} | {t['step_percent']:.3g} | {_e(t['loss_base'])} | {_e(t['loss_original'])} | "
                 f"{_e(t['loss_estimated'])} | {_x(t['loss_reduction'])} | {100 * t['increase_removed']:.2f} % | "
                 f"{_e(t.get('iterations_to_99_percent'))} | {alt} | "
                 f"{_e(t['risk_original'])} → {_e(t['risk_estimated'])} | "
                 f"{t['feasibility_residual']:.3f} | {t['iterations']} ({t['cost_in_hvps']:.1f}) | "
                 + (f"{pp[0]} → {pp[1]:.2g} ({pp[0] / pp[1]:.0f}×)" if pp else "—") + " |")
    L += ["", f"The other J scaling ('{other}') is the same solve rescaled exactly (a Krylov solve from zero is linear "
          "in its right-hand side); 'iterations to 99 %' is the first iterate that removes 99 % of the increase; "
          "'cost in HVPs' is the solve's time over the time of one Hessian-vector product measured in the same run."]
    if not r["table2"]:
        L += ["", "## Table 2 — not run (" + ("a data-parallel run" if "distributed" in r else "`--scenarios 0`") + ")"]
    L += (["", "## Table 2 — relative differences (‖·‖/‖w̄‖) over perturbation scenarios", "",
          "Δw_ret = w_ret(xᵖ) − w_ret(x̄): the shift that retraining makes *because of* the perturbation "
          "(both warm-started from w̄ with the same budget; w̄ is only approximately stationary on the subset).", "",
          "| scenario | points | step (%) | orig.–est. | orig.–retrained | est.–retrained | ‖Δw_ret‖ | "
          "‖v − Δw_ret‖/‖Δw_ret‖ | "
          "cos(v, Δw_ret) | loss w̄ / est. / ret. | risk w̄ → est. | iterations, HVPs (deflated k) |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|"] if r["table2"] else [])
    for t in r["table2"]:
        L.append(f"| {t['scenario']} | {len(t['indices'])} | {t['step_percent']:.3g} | "
                 f"{t['rel_diff_original_estimated']:.2e} | {t['rel_diff_original_retrained']:.2e} | "
                 f"{t['rel_diff_estimated_retrained']:.2e} | {t['rel_retrained_shift']:.2e} | "
                 f"{t['estimate_error_vs_shift']:.3f} | {t['cosine_estimate_retrained']:.3f} | "
                 f"{_e(t['loss_original'])} / {_e(t['loss_estimated'])} / {_e(t['loss_retrained'])} | "
                 f"{_e(t['risk_original'])} → {_e(t['risk_estimated'])} | "
                 f"{t['iterations']}, {t['hvp_count']} ({t['deflated_with']}) |")
    if r["table2"]:
        u = r["retrain_unperturbed"]
        L += ["", f"Retraining: warm-started L-BFGS from w̄, at most {cfg['retrain_iter']} iterations (not converged "
              f"unless stated in the JSON).  On x̄ alone it moves w̄ by {u['rel_diff_original_retrained']:.2e}·‖w̄‖ "
              f"to ‖∇L‖ = {u['grad_norm']:.2e}."]
    L += ["", "## Table 3 — step sweep (1-point direction; v rescaled exactly: a Krylov solve from 0 is linear in Δx)",
          "",
          "| step (%) | at w̄ | at w̄ + v | reduction | paper (w̄ → est.) |", "|---|---|---|---|---|"]
    for t in r["table3"]:
        pp = t["paper"]
        L.append(f"| {t['step_percent']:g} | {_e(t['loss_original'])} | {_e(t['loss_estimated'])} | "
                 f"{_x(t['loss_reduction'])} | "
                 + (f"{pp[0]} → {pp[1]}" if pp else "—") + " |")
    if r.get("seeds"):
        s = r["seeds"]
        L += ["", f"## Estimates from different random starts ({s['points']} points, step {s['step_percent']:.3g} %)",
              "", "| seed | ‖start‖ | loss at w̄ | loss at estimate | ‖v‖ | distance to seed 0 | feasibility |",
              "|---|---|---|---|---|---|---|"]
        for t in s["runs"]:
            L.append(f"| {t['seed']} | {t['start_norm']:.3g} | {_e(t['loss_original'])} | {_e(t['loss_estimated'])} | "
                     f"{t['norm_v']:.3g} | "
                     f"{t['distance_to_seed0']:.3g} | {t['feasibility_residual']:.3f} |")
    if "landscape" in r:
        L += ["", "## Loss landscape", "",
              "Plane through w̄ spanned by d₁ = (seed-0 estimate − w̄) and a filter-normalised "
              "random direction orthogonal to it with the same norm; α = 1, β = 0 is the seed-0 estimate.", "",
              "![contour](landscape_contour.png) ![surface](landscape_surface.png)"]
    s = r["summary"]
    L += ["", f"Total: {s['hvp_count_total']} Hessian-vector products, {s['seconds']:.0f} s.", ""]
    return "\n".join(L)


def _check_inputs(cfg: dict) -> None:
    """Checkpoint against depth, data format and subset size — in seconds, before any work."""
    from ..models.resnet import load_cifar_resnet

    if cfg["depth"] < 8 or (cfg["depth"] - 2) % 6:
        raise click.BadParameter(f"a CIFAR ResNet has depth 6k + 2 (20, 32, 44, 56, …), got {cfg['depth']}",
                                 param_hint="--depth")
    try:
        load_cifar_resnet(cfg["checkpoint"], cfg["depth"])
    except Exception as err:  # an empty, foreign or mismatched file
        raise click.BadParameter(f"cannot load {cfg['checkpoint']} as a depth-{cfg['depth']} CIFAR ResNet: "
                                 f"{type(err).__name__}: {first_line(err)}",
                                 param_hint="--checkpoint/--depth") from None
    if Path(cfg["data"]).is_dir():
        return
    available = npz_lengths(cfg["data"], ("train_x", "train_y"), "--data")["train_y"]
    if cfg["n"] > available:
        raise click.BadParameter(f"--n {cfg['n']} asks for more training images than {cfg['data']} holds "
                                 f"({available})", param_hint="--n")


@click.command("resnet")
@click.option("--depth", type=int, default=56, show_default=True, help="CIFAR ResNet depth (6k+2).")
@click.option("--checkpoint", default=ResnetConfig.checkpoint, show_default=True, help="CIFAR ResNet state dict.")
@click.option("--data", default=ResnetConfig.data, show_default=True,
              help="CIFAR-10 .npz subset or torchvision folder.")
@click.option("--n", "--n-train", "n", type=int, default=None,
              help="Training subset size [1000; quick 32] (--n-train: the same, for torchrun's command line).")
@click.option("--subset-seed", type=int, default=None, help="Draw the subset at random (default: the first n).")
@click.option("--points", default=None, help="Comma-separated counts of perturbed points for Table 1 [1,10].")
@click.option("--threshold", type=float, default=1e-5, show_default=True,
              help="Eligible points: unperturbed loss below this.")
@click.option("--target-loss", type=float, default=0.004, show_default=True,
              help="Calibrate the step so the moved points reach this loss.")
@click.option("--step", type=float, default=None, help="Step in percent of the image norm (overrides --target-loss).")
@click.option("--sweep", default="0.2,0.5,1,2", show_default=True, help="Steps (percent) for Table 3.")
@click.option("--scenarios", type=int, default=None, help="Perturbation scenarios for Table 2 [10].")
@click.option("--scenario-points", type=int, default=1, show_default=True, help="Points moved per scenario.")
@click.option("--seeds", type=int, default=None, help="Estimates from different random starts [3].")
@click.option("--seed-points", type=int, default=None, help="Points moved in the multi-start study [500].")
@click.option("--start-radius", type=float, default=0.5, show_default=True, help="‖random start‖ ÷ ‖v of seed 0‖.")
@click.option("--solver", type=click.Choice(["gauss-newton", "minres"]), default="gauss-newton", show_default=True,
              help="gauss-newton: keep every training output (CGLS, JVP+VJP per step); "
                   "minres: eq. 19 on H (HVP per step).")
@click.option("--maxiter", type=int, default=None, help="Solver iterations per solve (the regulariser) [50].")
@click.option("--rtol", type=float, default=1e-6, show_default=True,
              help="Krylov tolerance (CGLS: relative residual; MINRES: SciPy's tests).")
@click.option("--recycle", type=int, default=None, help="Ritz vectors recycled to deflate later solves (0: off) [20].")
@click.option("--retrain-iter", type=int, default=None, help="L-BFGS iterations for warm-started retraining [50].")
@click.option("--scale", type=click.Choice(["exact", "paper"]), default="exact", show_default=True,
              help="J scaling: 1/n or the paper's 1/|K|.")
@click.option("--dtype", type=click.Choice(["float32", "float64"]), default="float32", show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--batch-size", type=int, default=None, help="Images per pass [250].")
@click.option("--n-test", type=int, default=None, help="Test images for the accuracy check (0: skip) [all].")
@click.option("--grid", type=int, default=None, help="Landscape grid size per axis (0/1: no landscape) [11].")
@click.option("--threads", type=int, default=None, help="torch CPU threads.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--quick", is_flag=True, help="Small preset for a 2-core CPU (< 10 min).")
@click.option("--out", default="setsens-resnet", show_default=True, help="Run directory (resumes if it holds a run).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary and tables as JSON on stdout.")
@click.option("--progress/--no-progress", default=True, show_default=True)
def command(**kw):
    """Reproduce the paper's ResNet-56 / CIFAR-10 tables (1–3), multi-start estimates and landscape.

    Under torchrun with several processes: Tables 1 and 3, data-parallel (docs/distributed.md).
    """
    from ..report import prepare_out_dir, write_json

    for path, what in ((kw["checkpoint"], "checkpoint"), (kw["data"], "data")):
        if not Path(path).exists():
            raise click.BadParameter(f"{what} not found: {path}", param_hint=f"--{what}")
    ranks = int(os.environ.get("WORLD_SIZE", "1"))  # torchrun's; > 1: data-parallel (Tables 1 and 3)
    base = QUICK if kw["quick"] else {}
    if ranks > 1:  # what a data-parallel run leaves out is off unless asked for (and then refused below)
        base = base | {"scenarios": 0, "seeds": 0, "grid": 0}
    defaults = ResnetConfig()
    cfg = {}
    for f in ("n", "scenarios", "seeds", "seed_points", "maxiter", "recycle", "retrain_iter", "batch_size", "n_test",
              "grid"):
        cfg[f] = kw[f] if kw[f] is not None else base.get(f, getattr(defaults, f))
    cfg["points"] = (number_list(kw["points"], "--points", int, 1) if kw["points"]
                     else base.get("points", defaults.points))
    cfg["sweep"] = number_list(kw["sweep"], "--sweep", float, 0, open_min=True)
    for f in ("depth", "checkpoint", "data", "subset_seed", "solver", "threshold", "target_loss", "step",
              "scenario_points", "start_radius", "rtol", "scale", "dtype", "device", "threads", "seed", "quick"):
        cfg[f] = kw[f]
    cfg["landscape"] = cfg["grid"] > 1
    if cfg["n"] < 2 or min(cfg["points"]) < 1 or cfg["maxiter"] < 1:
        raise click.BadParameter("--n must be ≥ 2, --points ≥ 1 and --maxiter ≥ 1")
    if cfg["step"] is not None and cfg["step"] <= 0:
        raise click.BadParameter("--step must be positive (percent of the image norm)")
    conflicts = distributed_conflicts(cfg) if ranks > 1 else []
    if conflicts:
        raise click.UsageError(f"under torchrun ({ranks} processes) `setsens resnet` computes Tables 1 and 3 only; "
                               f"drop {', '.join(conflicts)}")
    _check_inputs(cfg)
    config = ResnetConfig(**cfg)
    if ranks > 1:
        if not Path(kw["out"]).resolve().parent.is_dir():  # checked by every rank, before any work
            raise click.BadParameter(f"the parent directory of {kw['out']} does not exist", param_hint="--out")
        return _distributed(config, kw)
    out = prepare_out_dir(kw["out"])
    write_json(out / "config.json", asdict(config))
    with Bars(enabled=kw["progress"]) as bars:
        results = run(config, out, progress=bars)
    _publish(results, out, kw["as_json"], "setsens " + " ".join(shlex.quote(a) for a in sys.argv[1:]))


def _publish(results: dict, out: Path, as_json: bool, line: str) -> None:
    """Write ``results.json`` and ``report.md`` into ``out`` (atomically) and print the report or the JSON."""
    from ..report import to_jsonable, write_json, write_text

    write_json(out / "results.json", results)
    write_text(out / "report.md", render_report(results, line))
    if as_json:
        slim = {k: v for k, v in results.items() if k != "landscape"}
        click.echo(json.dumps(to_jsonable({**results["summary"], **slim}), allow_nan=False))
    else:
        click.echo(render_report(results, line))
        click.echo(f"\nwritten to {out}/ (results.json, report.md, figures)", err=True)


def _distributed(config: ResnetConfig, kw: dict) -> None:
    """The run under torchrun: every rank computes, rank 0 writes and prints; then the process group
    is torn down in the order its operators need and the process leaves."""
    from ..distributed import init_from_env, shutdown
    from ..report import prepare_out_dir, write_json

    rank, size = init_from_env("nccl" if config.device.startswith("cuda") else "gloo")
    try:
        out = prepare_out_dir(kw["out"]) if rank == 0 else None
        if out is not None:
            write_json(out / "config.json", asdict(config))
        with Bars(enabled=kw["progress"]) as bars:
            results = run(config, out, progress=bars)
        if out is not None:
            line = (f"torchrun --nproc_per_node={size} -m setsens "  # the launcher's own options are not seen here
                    + " ".join(shlex.quote(a) for a in sys.argv[1:]))
            _publish(results, out, kw["as_json"], line)
        del results  # the operators' caches hold autograd graphs: free them before the process group goes
    except BaseException:
        dist.destroy_process_group()
        raise
    shutdown()
