"""Hessian-vector product time ÷ gradient time on a CIFAR ResNet, measured side by side.

    .venv/bin/python benchmarks/hvp_ratio.py --batch 250 --repeats 3 --threads 2

Every method computes ``H v`` for the same risk (mean cross-entropy on one batch, BatchNorm in
eval mode) and is checked against the reference (forward-over-reverse) to float precision;
the times are medians over ``--repeats`` runs after one warm-up, interleaved so that load from
other processes hits all methods alike.  Methods:

* ``grad``              — one gradient (the unit);
* ``fwd_over_rev``      — ``jvp(grad(L))`` with torch.func (the previous default);
* ``double_backward``   — ``autograd.grad(⟨∇L, v⟩)`` with ``create_graph=True``;
* ``rev_over_fwd``      — ``grad_w ⟨∇L, v⟩`` where the directional derivative comes from one
  forward-mode pass: ``∇_w [jvp_w L(w)·v]`` (torch.func).
* ``jvp_plus_vjp``      — not an HVP: one output JVP plus one output VJP, the cost of one
  iteration of the Gauss–Newton solver (:class:`setsens.function_space.OutputJacobian`).

:class:`setsens.operators.Hessian` takes the composition as ``mode``; ``"auto"`` picks the fastest per device.

Measured (docs/resnet.md has the table and the command lines), in gradients:
2 idle CPU cores, batch 250, 3 repeats: double backward 3.18× and 3.54× (two runs), forward-over-reverse
5.9–6.5×, reverse-over-forward 5.7–6.4×, JVP + VJP 2.17×.  H100, batch 1000, 20 repeats:
reverse-over-forward 2.14×, forward-over-reverse 2.76×, double backward 6.64×, JVP + VJP 1.63×.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch.func import grad, jvp

from setsens.function_space import OutputJacobian
from setsens.models.resnet import cifar_resnet, load_cifar_resnet
from setsens.operators import Hessian
from setsens.problem import Problem, cross_entropy


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default="../shared/data/resnet56-cifar10.th")
    ap.add_argument("--data", default="../shared/data/cifar10-subset.npz")
    ap.add_argument("--depth", type=int, default=56)
    ap.add_argument("--batch", type=int, default=250)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--random-weights", action="store_true", help="no checkpoint/data: random net and images")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.random_weights:
        model = cifar_resnet(args.depth)
        x, y = torch.rand(args.batch, 3, 32, 32), torch.randint(0, 10, (args.batch,))
    else:
        from setsens.data.cifar import load_cifar10

        model = load_cifar_resnet(args.checkpoint, args.depth)
        x, y = load_cifar10(args.data, "train", n=args.batch)
    model = model.to(args.device)
    problem = Problem(model, cross_entropy, (x, y), batch_size=args.batch, device=args.device)
    w = problem.params
    v = torch.randn(problem.p, generator=torch.Generator().manual_seed(1)).to(w)
    xb, yb = next(problem.batches())
    sync = torch.cuda.synchronize if w.is_cuda else (lambda: None)

    g = grad(problem.batch_risk)

    def m_grad():
        return g(w, xb, yb)

    def m_fwd_over_rev():
        return jvp(lambda w_: g(w_, xb, yb), (w,), (v,))[1]

    def m_double_backward():
        wr = w.detach().requires_grad_(True)
        gr = torch.autograd.grad(problem.batch_risk(wr, xb, yb), wr, create_graph=True)[0]
        return torch.autograd.grad(gr @ v, wr)[0]

    fast = Hessian(problem, mode="rev_over_fwd")

    def m_rev_over_fwd():
        return fast.batch_hvp(w, xb, yb, v)

    G = OutputJacobian(problem, centered=True)
    u = torch.randn(problem.n, 10, generator=torch.Generator().manual_seed(2)).to(w)

    def m_jvp_plus_vjp():
        return G @ v, G.T @ u

    methods = {"grad": m_grad, "fwd_over_rev": m_fwd_over_rev, "double_backward": m_double_backward,
               "rev_over_fwd": m_rev_over_fwd, "jvp_plus_vjp": m_jvp_plus_vjp}
    ref = m_fwd_over_rev()
    for name in ("double_backward", "rev_over_fwd"):
        err = float((methods[name]() - ref).norm() / ref.norm())
        print(f"{name}: relative difference to fwd_over_rev {err:.2e}")
        assert err < 1e-3, f"{name} disagrees with the reference HVP"
    for fn in methods.values():  # warm-up (allocator, cuDNN autotuning)
        fn()
    times = {k: [] for k in methods}
    for _ in range(args.repeats):
        for name, fn in methods.items():
            sync()
            t = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(t) for k, t in times.items()}
    out = {"device": str(w.device), "threads": args.threads, "batch": args.batch, "p": problem.p,
           "seconds": med, "ratio_to_grad": {k: med[k] / med["grad"] for k in methods if k != "grad"}}
    for k, r in out["ratio_to_grad"].items():
        print(f"{k:16s} {med[k]:8.3f} s   {r:5.2f}× gradient")
    print(f"{'grad':16s} {med['grad']:8.3f} s")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
