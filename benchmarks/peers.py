"""Our solvers vs dattri's CG, curvlinops' inverse operators and pyDVL's inverse-Hessian solvers,
side by side in one process.

    .venv/bin/python benchmarks/peers.py --problem digits --budgets 5,10,20,40,80,160,320
    python benchmarks/peers.py --problem resnet --n 1000 --points 1 --step 0.2 --budgets 5,10,20,40 --device cuda

The peers are an optional extra (``pip install --no-deps dattri curvlinops-for-pytorch pyDVL==0.10.0``
plus ``einops einconv linear_operator jaxtyping wadler_lindig`` and, for pyDVL's imports,
``distributed dask toolz importlib_metadata lazy_importer tornado psutil tblib msgpack locket zict
pyyaml zarr donfig numcodecs google_crc32c pandas pyDeprecate``; see ``pyproject.toml``'s ``bench``);
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

pyDVL (``pydvl.influence``) is the one peer whose influence answers the training-input question:
its ``InfluenceMode.Perturbation`` gives ``∇_x ∇_w ℓ(x_i)ᵀ H⁻¹ ∇_w ℓ_test``, a scalar per test loss,
not v.  The shift itself comes from the inverse-Hessian operators that its ``CgInfluence``,
``LissaInfluence`` and ``ArnoldiInfluence`` build in ``fit`` (``pydvl.influence.torch.operator``:
``CgOperator``, ``LissaOperator``, ``LowRankOperator`` over ``operator_spectral_approximation``, on
its own ``HessianOperator``), applied to ``−J Δx`` (:func:`pydvl_peers`): the same v, scored the same
way.  CG and LiSSA are run undamped and damped as above (LiSSA with scale λ_max; ``it`` steps, one
HVP each); Arnoldi takes the top-|λ| ``it/2`` eigenpairs from a Krylov space of dimension ``it``
(ARPACK decides the number of HVPs, which are reported).  That this v is the one behind pyDVL's
perturbation influence is checked once on the digits problem, at the largest budget (``PYDVL_CHECK``,
:func:`pydvl_perturbation_check`): its perturbation influence of the perturbed points' moved-input
loss, contracted with Δx, against ⟨∇_w ℓ, v⟩ for pyDVL's CG v (damped like its influence there,
and undamped) and our MINRES v.
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

    return train_stationary(DemoConfig(n=n, seed=seed)), 10


def resnet_problem(n: int, checkpoint: str, data: str, device: str):
    from setsens.data.cifar import load_cifar10
    from setsens.models.resnet import load_cifar_resnet

    model = load_cifar_resnet(checkpoint).to(device)
    x, y = load_cifar10(data, "train", n=n)
    return Problem(model, cross_entropy, (x, y), batch_size=min(250, n), device=device), 1


def pydvl_setup(problem: Problem):
    """The problem as pyDVL takes it: a copy of the model at w̄ (eval mode), the batch-mean loss and a
    DataLoader over the same batches.  pyDVL averages the batches' Hessians unweighted, so they must
    be of one size for its H to be ours (the mean risk)."""
    import copy

    from torch.utils.data import DataLoader, TensorDataset

    if problem.reduction != "mean":
        raise ValueError("pyDVL's Hessian is that of a mean loss; this problem sums")
    x, y = problem.points(torch.arange(problem.n))
    bs = problem.batch_size or problem.n
    if problem.n % bs:
        raise ValueError(f"pyDVL averages batches unweighted; n={problem.n} is not a multiple of the batch {bs}")
    model = problem.load_into(copy.deepcopy(problem.model).to(problem.device, problem.dtype), problem.params).eval()

    def loss(outputs, targets):
        return problem.loss(outputs, targets).mean()

    return model, loss, DataLoader(TensorDataset(x, y), batch_size=bs)


def pydvl_peers(problem: Problem, b, lam_max: float, damping: float, counter: dict) -> dict:
    """pyDVL's inverse-Hessian solvers (its ``pydvl.influence.torch.operator`` module) applied to ``−J Δx``.

    These are the operators that ``CgInfluence``, ``LissaInfluence`` and ``ArnoldiInfluence`` build in
    ``fit`` and apply to a gradient; here they get the right-hand side ``−J Δx`` directly, so each
    returns the shift v of eq. 19 and is scored like the other peers.  pyDVL differentiates with its
    own ``torch.func`` HVP (a copy of the model at w̄, the mean loss over the problem's batches);
    ``counter["hvps"]`` gathers its products in full passes over the data.
    """
    from pydvl.influence.torch.batch_operation import HessianBatchOperation
    from pydvl.influence.torch.functional import operator_spectral_approximation
    from pydvl.influence.torch.operator import CgOperator, HessianOperator, LissaOperator, LowRankOperator

    model, loss, loader = pydvl_setup(problem)
    per_batch = loader.batch_size / problem.n

    class Counted(HessianBatchOperation):
        def _apply_to_vec(self, batch, vec):
            counter["hvps"] += per_batch
            return super()._apply_to_vec(batch, vec)

    def hessian():
        op = HessianOperator(model, loss, loader)
        op.batch_operation = Counted(model, loss)
        return op

    wd = problem.weight_decay or None  # the Hessian of (λ/2)‖w‖² is λI: pyDVL's regularization

    def reg(damp):
        return (wd or 0.0) + damp if (wd or damp) else None

    rhs = -b.to(problem.params)

    def cg(damp):  # pyDVL's CG starts from x₀ = rhs; rtol = atol = 0: exactly `it` iterations
        return lambda it: CgOperator(hessian(), reg(damp), rtol=0.0, atol=0.0, maxiter=it,
                                     warn_on_max_iteration=False).apply(rhs).reshape(-1)

    def lissa(damp):  # full-batch steps on the digits problem; scale s = λ_max (converges for 0 < λ < 2s)
        return lambda it: LissaOperator(Counted(model, loss), loader, reg(damp), maxiter=it, scale=lam_max,
                                        rtol=0.0, warn_on_max_iteration=False).apply(rhs).reshape(-1)

    def arnoldi(it):  # ArnoldiInfluence's default (no Woodbury): V D⁻¹ Vᵀ on the top-|λ| it/2 eigenpairs
        low_rank = operator_spectral_approximation(hessian(), rank=max(1, it // 2), krylov_dimension=it)
        return LowRankOperator(low_rank, reg(0.0), exact=False).apply(rhs).reshape(-1)

    return {"pydvl_cg": cg(0.0), "pydvl_cg_damped": cg(damping * lam_max),
            "pydvl_lissa": lissa(0.0), "pydvl_lissa_damped": lissa(damping * lam_max),
            "pydvl_arnoldi": arnoldi}


def pydvl_perturbation_check(problem: Problem, idx, pert, it: int, damp: float, shifts: dict) -> dict:
    """pyDVL's public perturbation influence against ⟨ḡ, v⟩ for the shifts v of the methods.

    ``CgInfluence(...).influences(x_test, y_test, x, y, mode=InfluenceMode.Perturbation)`` gives, for
    each test point t and training point i, ``∇_x ∇_w ℓ(x_i)ᵀ H⁻¹ ∇_w ℓ_t`` (the shape of x_i).  With
    the perturbed points at their moved inputs as the test points (ℓ_t = ℓ(x_t + Δx_t, w)) and the
    same points as the training points, ``−c Σ_i ⟨I_ti, Δx_i⟩`` (c = 1/n, the risk's factor, which J
    carries) is the first-order change of ℓ_t when w̄ moves by v = −H⁻¹ J Δx, that is ⟨∇_w ℓ_t, v⟩:
    the linear part of what ``increase_removed`` measures.  Equal numbers show that the v scored
    above is the shift behind pyDVL's perturbation influence; the two CG runs differ only in their
    right-hand sides (``∇_w ℓ_t`` there, ``−J Δx`` here), so they agree as far as CG has converged.
    Both are damped by ``damp`` (H + damp·I): ``∇_w ℓ_t`` at the moved inputs has a part outside the
    range of the singular H, so undamped CG on ``H z = ∇_w ℓ_t`` does not converge (on the digits
    problem at 320 iterations it gave +8.9e-4 where ⟨∇_w ℓ, v⟩ is −1.14e-3), while −J Δx lies in the
    range (zero residual) and the undamped v is fine.
    """
    from pydvl.influence import InfluenceMode
    from pydvl.influence.torch import CgInfluence

    model, loss, loader = pydvl_setup(problem)
    xk, yk = problem.points(idx)
    xt = xk + pert.delta.to(xk)
    infl = CgInfluence(model, loss, regularization=problem.weight_decay + damp, rtol=0.0, atol=0.0, maxiter=it,
                       warn_on_max_iteration=False).fit(loader)
    t = time.perf_counter()
    infl_values = infl.influences(xt, yk, xk, yk, mode=InfluenceMode.Perturbation)  # (k test, k train, *x)
    secs = time.perf_counter() - t
    pred = -problem.weight * (infl_values * pert.delta.to(infl_values)[None]).flatten(2).sum((1, 2))
    g = torch.func.grad(lambda w: problem.per_sample_loss(w, xt, yk).mean())(problem.params)
    return {"budget": it, "damping": damp, "seconds": secs, "pydvl_perturbation_influence": float(pred.mean()),
            **{f"<g,v> {name}": float(g @ v.to(g)) for name, v in shifts.items()}}


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
    counted = {"hvps": 0.0}  # pyDVL's own HVPs, in full passes over the data
    try:
        methods |= pydvl_peers(problem, b, lam_max, args.damping, counted)
    except (ImportError, ValueError) as err:
        print(f"pyDVL not installed or not applicable ({err}); skipped")

    rows = []
    for it in budgets:
        for name, fn in methods.items():
            c0, p0 = H.calls, counted["hvps"]
            t = time.perf_counter()
            try:
                v = fn(it)
                secs = time.perf_counter() - t
                hv = H.calls - c0 + (counted["hvps"] - p0)
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
    if "pydvl_cg" in methods and args.problem == "digits":  # on ResNet-56 its input-Jacobian influences ran out
        it = max(budgets)                                    # of a 24 GB machine's memory (n = 100)
        try:
            shifts = {n: methods[n](it) for n in ("pydvl_cg_damped", "pydvl_cg", "setsens_minres")}
            check = pydvl_perturbation_check(problem, idx, pert, it, args.damping * lam_max, shifts)
        except Exception as err:  # a failing check is reported like a failing peer
            check = {"error": f"{type(err).__name__}: {err}"[:200]}
        print("PYDVL_CHECK " + json.dumps(check))


if __name__ == "__main__":
    main()
