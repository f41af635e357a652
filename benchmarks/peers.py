"""Our solvers vs dattri's CG and curvlinops' inverse operators, side by side in one process.

    .venv/bin/python benchmarks/peers.py --problem digits --budgets 5,10,20,40,80,160,320
    python benchmarks/peers.py --problem resnet --n 1000 --points 1 --step 0.2 --budgets 5,10,20,40 --device cuda

The peers are an optional extra (``pip install --no-deps dattri curvlinops-for-pytorch`` plus
``einops einconv linear_operator jaxtyping wadler_lindig``; see ``pyproject.toml``'s ``bench``);
a missing peer is reported, not fatal.  Every method estimates the same shift at w̄ with a budget of
iterations (``--budgets``): the peers and our MINRES solve ``H v = −J Δx`` (one HVP per iteration);
our Gauss–Newton solver keeps every training output (one JVP + one VJP per iteration,
:mod:`setsens.function_space`).  All are scored on the same two accuracies:

* ``increase_removed`` — the share of the perturbation-induced loss increase on the perturbed points
  removed by w̄ + v;
* ``distance_ratio`` — d(w̄ + v, S(xᵖ)) ÷ d(w̄, S(xᵖ)), measured by warm-started retraining
  (Levenberg–Marquardt, exact for the squared-loss digits MLP; skipped for ResNet).

"time to accuracy" = the least wall time over budgets at which a method reaches the best accuracy
that any of our solvers reaches; the printed ratio is peer time ÷ our time (> 1: we are faster; None:
the peer never reaches it).
dattri's and curvlinops' CG need a positive-definite operator; on this singular, indefinite H they
are run undamped and with the damping ``--damping``·λ_max (both reported).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from setsens.function_space import OutputJacobian, output_shift
from setsens.krylov import cgls, lanczos, minres
from setsens.operators import DataJacobian, Hessian
from setsens.perturb import gradient_perturbation
from setsens.problem import Problem, cross_entropy, squared_error


def digits_problem(n: int, seed: int):
    """The demo's problem (``setsens demo``): bias-free ReLU MLP 64-64-64-10 trained to stationarity."""
    from setsens.experiments.demo import DemoConfig, train_stationary

    return train_stationary(DemoConfig(n=n, seed=seed), progress=False), 10


def resnet_problem(n: int, checkpoint: str, data: str, device: str):
    from setsens.data.cifar import load_cifar10
    from setsens.models.resnet import load_cifar_resnet

    model = load_cifar_resnet(checkpoint).to(device)
    x, y = load_cifar10(data, "train", n=n)
    return Problem(model, cross_entropy, (x, y), batch_size=250, device=device), 1


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--problem", choices=["digits", "resnet"], default="digits")
    ap.add_argument("--n", type=int, default=None, help="training points [digits 100, resnet 1000]")
    ap.add_argument("--points", type=int, default=None)
    ap.add_argument("--step", type=float, default=1.0, help="percent of the image norm")
    ap.add_argument("--budgets", default="5,10,20,40,80")
    ap.add_argument("--damping", type=float, default=1e-4, help="relative to λ_max, for the CG peers")
    ap.add_argument("--checkpoint", default="../shared/data/resnet56-cifar10.th")
    ap.add_argument("--data", default="../shared/data/cifar10-subset.npz")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    budgets = [int(b) for b in args.budgets.split(",")]
    if args.problem == "digits":
        from setsens.experiments.demo import movable_points

        problem, k = digits_problem(args.n or 100, args.seed)
        idx = movable_points(problem, args.points or k)  # the demo's points (zero-residual points cannot move)
    else:
        problem, k = resnet_problem(args.n or 1000, args.checkpoint, args.data, args.device)
    k = args.points or k
    with torch.no_grad():
        losses = torch.cat([problem.per_sample_loss(problem.params, x, y) for x, y in problem.batches()])
    if args.problem == "resnet":
        idx = torch.argsort(losses)[:k].sort().values
    pert = gradient_perturbation(problem, idx, args.step / 100)
    b = DataJacobian(problem, idx) @ pert.delta
    H = Hessian(problem, mode="auto")
    wbar = problem.params
    base = float(losses[idx].mean())
    l0 = problem.loss_on(idx, perturbation=pert)
    start = torch.randn(problem.p, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    lam_max = float(lanczos(H, start.to(wbar.device), 10).values.abs().max())
    retrain_ok = problem.loss is squared_error
    d0 = None
    if retrain_ok:
        from setsens.retrain import distance_to_solution_set

        d0 = distance_to_solution_set(problem, wbar, pert).distance

    def score(v):
        v = v.to(wbar)
        le = problem.loss_on(idx, wbar + v, perturbation=pert)
        out = {"loss": le, "increase_removed": (l0 - le) / (l0 - base)}
        if retrain_ok:
            out["distance_ratio"] = distance_to_solution_set(problem, wbar + v, pert).distance / d0
        return out

    centered = problem.loss_ignores_output_shift

    def gauss_newton(it):  # estimate(..., "gauss-newton")'s solve, without its residuals and checks
        G = OutputJacobian(problem, centered=centered)
        return cgls(G, -output_shift(problem, pert, centered=centered), maxiter=it, rtol=0, dot=G.dot).x

    methods = {"setsens_gauss_newton": gauss_newton,
               "setsens_minres": lambda it: minres(H, -b, maxiter=it, rtol=0).x}
    try:
        from dattri.func.hessian import ihvp_at_x_cg

        def dattri(reg):
            def f(w):
                return sum(problem.batch_risk(w, x, y) for x, y in problem.batches())

            return lambda it: -ihvp_at_x_cg(f, wbar, max_iter=it, tol=0.0, mode="rev-fwd",
                                            regularization=reg)(b[None])[0]

        methods["dattri_cg"] = dattri(0.0)
        methods["dattri_cg_damped"] = dattri(args.damping * lam_max)
    except ImportError as err:
        print(f"dattri not installed ({err}); skipped")
    try:
        from curvlinops import CGInverseLinearOperator, LSMRInverseLinearOperator
        from curvlinops._torch_base import PyTorchLinearOperator

        class _Op(PyTorchLinearOperator):
            """H (+ δI) as a curvlinops operator, on the same HVP as ours."""

            def __init__(self, damp):
                super().__init__([(problem.p,)], [(problem.p,)])
                self.damp = damp

            def _matmat(self, X):
                (M,) = X
                cols = [H(M[:, j].to(wbar)) + self.damp * M[:, j].to(wbar) for j in range(M.shape[1])]
                return [torch.stack(cols, 1).to(M)]

            def _adjoint(self):
                return self

            @property
            def device(self):
                return wbar.device

            @property
            def dtype(self):
                return wbar.dtype

        def curv(cls, damp, budget):
            return lambda it: -(cls(_Op(damp), **budget(it)) @ b.to(wbar))

        # exactly `it` iterations: no early stop (its default tolerance is 1), tridiagonalisation within the budget
        cg_budget = lambda it: {"max_iter": it, "max_tridiag_iter": it, "tolerance": 1e-30}  # noqa: E731
        methods["curvlinops_cg"] = curv(CGInverseLinearOperator, 0.0, cg_budget)
        methods["curvlinops_cg_damped"] = curv(CGInverseLinearOperator, args.damping * lam_max, cg_budget)
        methods["curvlinops_lsmr"] = curv(LSMRInverseLinearOperator, 0.0, lambda it: {"maxiter": it})
    except ImportError as err:
        print(f"curvlinops not installed ({err}); skipped")

    rows = []
    for it in budgets:
        for name, fn in methods.items():
            c0 = H.calls
            t = time.perf_counter()
            try:
                v = fn(it)
                secs = time.perf_counter() - t
                hv = H.calls - c0
                row = {"method": name, "budget": it, "seconds": secs, "hvps": hv} | score(v)
            except Exception as err:  # a peer failing on this problem is a result, not a crash
                row = {"method": name, "budget": it, "error": f"{type(err).__name__}: {err}"[:200]}
            rows.append(row)
            print(json.dumps(row))
    ours = [r for r in rows if r["method"].startswith("setsens_") and "error" not in r]
    metric = "distance_ratio" if retrain_ok else "increase_removed"
    better = (lambda a, b_: a <= b_) if metric == "distance_ratio" else (lambda a, b_: a >= b_)
    best = min(ours, key=lambda r: r[metric]) if metric == "distance_ratio" else max(ours, key=lambda r: r[metric])
    target = best[metric]
    t_ours = min(r["seconds"] for r in ours if better(r[metric], target))
    summary = {"problem": args.problem, "p": problem.p, "n": problem.n, "points": k, "loss_at_wbar": l0,
               "base_loss": base, "lambda_max": lam_max, "metric": metric, "target": target,
               "target_method": best["method"],
               "ours_seconds": t_ours, "device": str(problem.device), "ratios": {}}
    for name in methods:
        if name.startswith("setsens_"):
            continue
        ok = [r for r in rows if r["method"] == name and "error" not in r and r[metric] == r[metric]
              and better(r[metric], target)]
        summary["ratios"][name] = (min(r["seconds"] for r in ok) / t_ours) if ok else None
        best_peer = [r for r in rows if r["method"] == name and "error" not in r]
        summary.setdefault("peer_best", {})[name] = (
            (min if metric == "distance_ratio" else max)(r[metric] for r in best_peer) if best_peer else None)
    print("SUMMARY " + json.dumps(summary))


if __name__ == "__main__":
    main()
