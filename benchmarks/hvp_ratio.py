"""Hessian-vector product and Gauss–Newton iteration time ÷ gradient time, measured side by side.

    python benchmarks/hvp_ratio.py --json                      # ResNet-56, batch 250, 2 threads
    python benchmarks/hvp_ratio.py --json --problem digits     # the digits demo MLP

``--json`` prints one JSON object: ``gn_iteration_over_gradient`` (one ``G v`` plus one ``Gᵀ u`` of
:class:`setsens.function_space.OutputJacobian` with its default cache, built beforehand),
``gn_iteration_uncached_over_gradient``, ``hvp_over_gradient`` (``Hessian(mode="auto")`` with its default
cache: each batch's gradient graph kept, one backward pass through it per product),
``hvp_uncached_over_gradient``, the one-off cache builds in gradients (for H: the first product, which builds),
``floor_over_gradient`` (what a cached iteration cannot go below, below), the per-method seconds and
ratios (``forward``: the risk without a graph; ``gn_jvp``, ``gn_vjp``: the iteration's two halves), the
settings (model, batch, threads, dtype, device) and the load average at the start.  Every method
runs on the same batch as the gradient (one forward and backward pass, the unit) and is checked
against the reference (forward-over-reverse; the cached G against the uncached one); the times are
medians over ``--repeats`` runs after one warm-up, interleaved so that load from other processes
hits all methods alike (each timing repeats a method until it lasts ≥ 50 ms).  HVP compositions:

* ``fwd_over_rev``      — ``jvp(grad(L))`` with torch.func;
* ``double_backward``   — ``autograd.grad(⟨∇L, v⟩)`` with ``create_graph=True``;
* ``rev_over_fwd``      — ``∇_w [jvp_w L(w)·v]`` (torch.func);
* ``hvp_default``       — ``Hessian(mode="auto", cache=--hvp-cache)`` over the problem (a kept graph).

:class:`setsens.operators.Hessian` takes the composition as ``mode``; ``"auto"`` picks the fastest per device.

The floor.  With every primal value cached, ``G v`` still pushes two tangents through every layer
(``conv(ȧ, W) + conv(a, Ẇ)``: two forward-sized passes) and ``Gᵀ u`` is one backward pass (input and
weight gradients), against one forward F and one backward B for the gradient: an iteration costs at
least ``(2F + B)/(F + B)`` gradients, 4/3 when B ≈ 2F (convolutions and large matrix products).  Small
networks go below it (the digits MLP: 0.71×), where the gradient's fixed overhead dominates.

Recorded runs: docs/runs/hvp-ratio-cpu-kept-graph.json (three idle runs), docs/runs/hvp-ratio-digits-cpu.json;
docs/resnet.md has the table (older runs: 2 idle CPU cores, batch 250: double backward 3.18× and 3.54×,
JVP + VJP uncached 2.17×; H100, batch 1000: reverse-over-forward 2.14×, JVP + VJP 1.63×).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time

import torch
from torch.func import grad

from setsens.function_space import OutputJacobian
from setsens.models.resnet import cifar_resnet, load_cifar_resnet
from setsens.operators import HVP_MODES, Hessian
from setsens.problem import Problem, cross_entropy


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--problem", choices=["resnet", "digits"], default="resnet",
                    help="ResNet-56 on CIFAR images, or the digits demo MLP (setsens demo's problem)")
    ap.add_argument("--checkpoint", default="../shared/data/resnet56-cifar10.th")
    ap.add_argument("--data", default="../shared/data/cifar10-subset.npz")
    ap.add_argument("--depth", type=int, default=56)
    ap.add_argument("--batch", type=int, default=250, help="ResNet images (the digits problem has its own 100)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--cache", default="auto", help="OutputJacobian's cache: auto, none or bytes")
    ap.add_argument("--hvp-cache", default="auto", help="Hessian's cache: auto (its default), none or bytes")
    ap.add_argument("--random-weights", action="store_true", help="no checkpoint/data: random net and images")
    ap.add_argument("--json", action="store_true", help="print one JSON object and nothing else")
    args = ap.parse_args(argv)
    say = (lambda *a: None) if args.json else print
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    load = os.getloadavg()[0]
    if args.problem == "digits":
        from setsens.experiments.demo import DemoConfig, train_stationary

        problem, model_name = train_stationary(DemoConfig()), "digits MLP 64-64-64-10"
    else:
        if args.random_weights:
            model = cifar_resnet(args.depth)
            x, y = torch.rand(args.batch, 3, 32, 32), torch.randint(0, 10, (args.batch,))
        else:
            from setsens.data.cifar import load_cifar10

            model = load_cifar_resnet(args.checkpoint, args.depth)
            x, y = load_cifar10(args.data, "train", n=args.batch)
        problem = Problem(model.to(args.device), cross_entropy, (x, y), batch_size=args.batch, device=args.device)
        model_name = f"ResNet-{args.depth}" + (" (random weights)" if args.random_weights else "")
    w = problem.params
    v = torch.randn(problem.p, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(w)
    u = torch.randn(problem.n, 10, generator=torch.Generator().manual_seed(2), dtype=torch.float64).to(w)
    xb, yb = next(problem.batches())
    assert xb.shape[0] == problem.n, "one batch: the gradient and the G products see the same points"
    sync = torch.cuda.synchronize if w.is_cuda else (lambda: None)

    g = grad(problem.batch_risk)
    hessians = {mode: Hessian(problem, mode=mode, cache="none") for mode in HVP_MODES if mode != "auto"}
    cache = args.cache if args.cache in ("auto", "none") else int(args.cache)
    G, G0 = OutputJacobian(problem, centered=True, cache=cache), OutputJacobian(problem, centered=True, cache="none")
    hvp_cache = args.hvp_cache if args.hvp_cache in ("auto", "none") else int(args.hvp_cache)
    H = Hessian(problem, mode="auto", cache=hvp_cache)  # the library's default unless --hvp-cache
    setup = {}
    for name, fn in (("gn", lambda: (G @ v, G.T @ u)), ("hvp", lambda: H @ v)):
        if name == "gn":
            fn()  # G's first product runs uncached, its second builds the cache; H builds at its first
        sync()
        t = time.perf_counter()
        fn()
        sync()
        setup[name] = time.perf_counter() - t

    methods = {"grad": lambda: g(w, xb, yb),
               "forward": lambda: problem.batch_risk(w, xb, yb),
               **{mode: (lambda H=H: H.batch_hvp(w, xb, yb, v)) for mode, H in hessians.items()},
               "hvp_default": lambda: H @ v,
               "gn_iteration": lambda: (G @ v, G.T @ u),
               "gn_jvp": lambda: G @ v, "gn_vjp": lambda: G.T @ u,
               "gn_iteration_uncached": lambda: (G0 @ v, G0.T @ u)}
    ref = methods["fwd_over_rev"]()
    agreement = {name: float((methods[name]() - ref).norm() / ref.norm()) for name in [*hessians, "hvp_default"]}
    (a, b), (a0, b0) = methods["gn_iteration"](), methods["gn_iteration_uncached"]()
    agreement["gn_iteration"] = max(float((a - a0).norm() / a0.norm()), float((b - b0).norm() / b0.norm()))
    for name, err in agreement.items():
        say(f"{name}: relative difference to the reference {err:.2e}")
        assert err < 1e-3, f"{name} disagrees with the reference"
    for fn in methods.values():  # warm-up (allocator, cuDNN autotuning)
        fn()
    sync()
    t = time.perf_counter()
    methods["grad"]()
    sync()
    inner = max(1, math.ceil(0.05 / (time.perf_counter() - t)))  # each timing ≥ 50 ms (the digits MLP)
    times = {k: [] for k in methods}
    for _ in range(args.repeats):
        for name, fn in methods.items():
            sync()
            t = time.perf_counter()
            for _ in range(inner):
                fn()
            sync()
            times[name].append((time.perf_counter() - t) / inner)
    med = {k: statistics.median(t) for k, t in times.items()}
    ratio = {k: med[k] / med["grad"] for k in methods if k != "grad"}
    out = {"gn_iteration_over_gradient": ratio["gn_iteration"],
           "gn_iteration_uncached_over_gradient": ratio["gn_iteration_uncached"],
           "hvp_over_gradient": ratio["hvp_default"], "hvp_uncached_over_gradient": ratio[H.mode],
           "hvp_mode": H.mode + (" (cached: the gradient's graph kept, one backward pass)" if H.cached_bytes else ""),
           "gn_setup_over_gradient": setup["gn"] / med["grad"], "gn_cache_bytes": G.cached_bytes,
           "hvp_setup_over_gradient": setup["hvp"] / med["grad"], "hvp_cache_bytes": H.cached_bytes,
           "cache": args.cache, "hvp_cache": args.hvp_cache,
           "device": str(w.device), "model": model_name, "batch": problem.n, "p": problem.p,
           "dtype": str(w.dtype).removeprefix("torch."), "threads": args.threads, "repeats": args.repeats,
           # the floor: a cached iteration still runs two forward-sized tangent passes (activation and
           # weight tangents of every layer) and one backward pass (input and weight gradients), against
           # one forward and one backward for the gradient: (2F + B) / (F + B) with the measured F and B
           "floor_over_gradient": (2 * med["forward"] + (med["grad"] - med["forward"])) / med["grad"],
           "load_average_at_start": load, "torch": torch.__version__, "seconds": med, "ratio_to_grad": ratio,
           "agreement": agreement}
    for k, r in ratio.items():
        say(f"{k:22s} {med[k]:8.3f} s   {r:5.2f}× gradient")
    say(f"{'grad':22s} {med['grad']:8.3f} s")
    say(f"cache setup: G {setup['gn']:.2f} s, {G.cached_bytes / 2**20:.0f} MiB; H {setup['hvp']:.2f} s, "
        f"{H.cached_bytes / 2**20:.0f} MiB")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
