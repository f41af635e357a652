"""The four weight-perturbation certificates side by side: paper, clean (products of norms), interval, linear.

``digits``: the bias-free MLP of ``setsens weights`` (its default config: 64-128-10, 60 epochs, seed 0; standard
and robust λ = 0.1 training), the certified fraction of the test set per certificate at relative budgets
ε_l = ρ ‖W_l‖_∞, and each bound's time for the whole test set.  ``resnet56``: the shared CIFAR-10 ResNet-56,
float64, on ``--n`` CIFAR images, ρ from 1e-12 to 1e-4.  Usage::

    python benchmarks/weight_certificates.py digits [--threads 1]
    python benchmarks/weight_certificates.py testnets
    python benchmarks/weight_certificates.py resnet56 [--n 20] [--rhos 1e-60 1e-40 …] [--bounds paper clean …]
"""

from __future__ import annotations

import argparse
import time

import torch

from setsens.weights import certify, forward, relative_budget

BOUNDS = ("paper", "clean", "interval", "linear")


def table(net, x, y, rhos, bounds=BOUNDS):
    rows = []
    for rho in rhos:
        e = relative_budget(net, rho)
        row = {"rho": rho}
        for b in bounds:
            t0 = time.perf_counter()
            with torch.no_grad():
                row[b] = float(certify(net, x, y, e, bound=b).double().mean())
            row[f"{b}_s"] = time.perf_counter() - t0
        rows.append(row)
        print(f"ρ = {rho:g}: " + ", ".join(f"{b} {100 * row[b]:.1f} % ({row[b + '_s']:.2f} s)" for b in bounds),
              flush=True)
    return rows


def digits(args):
    from setsens.experiments.weights import ExperimentConfig, _load
    from setsens.weights import model_weights, train_mlp

    cfg = ExperimentConfig()
    (xtr, ytr, xte, yte), classes = _load(cfg)
    for name, lam in (("standard", 0.0), ("robust", cfg.lam)):
        model, _ = train_mlp(xtr, ytr, len(classes), cfg.train_config(lam, cfg.mu), seed=cfg.seed)
        W = [w.detach().double() for w in model_weights(model)]
        x = xte.double()
        acc = float((forward(W, x).argmax(1) == yte).double().mean())
        print(f"{name} (λ = {lam}): clean test accuracy {100 * acc:.1f} % on {len(yte)} points", flush=True)
        rows = table(W, x, yte, args.rhos or [1e-4, 3e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1, 0.2], args.bounds)
        for r in rows:
            if 0.10 <= r.get("paper", 0) <= 0.50 and "linear" in r:
                print(f"  ρ = {r['rho']:g}: paper {100 * r['paper']:.1f} %, linear {100 * r['linear']:.1f} % "
                      f"(× {r['linear'] / r['paper']:.2f})")


def resnet56(args):
    from setsens.data.cifar import load_cifar10
    from setsens.models.resnet import load_cifar_resnet
    from setsens.weights import network_from_model

    model = load_cifar_resnet(args.checkpoint, 56).double().eval()
    net = network_from_model(model).detach()
    x, y = load_cifar10(args.data, "test", n=args.n, seed=0)
    x = x.double()
    with torch.no_grad():
        pred = forward(net, x).argmax(1)
    print(f"ResNet-56: {len(net)} weighted layers, {args.n} test images, clean accuracy "
          f"{100 * float((pred == y).double().mean()):.0f} %", flush=True)
    table(net, x, y, args.rhos or [1e-12, 1e-10, 1e-8, 1e-7, 1e-6, 1e-5, 1e-4], args.bounds)


def testnets(args):
    """The conv+BN+pool net and the residual net of tests/weights/test_conv_bounds.py, 16 random inputs labelled
    by the network; also the linear bound with interval intermediates only."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from weights.test_conv_bounds import conv_bn_net, residual_net

    from setsens.weights import linear_relaxation_margin_bound, network_from_model

    for make in (conv_bn_net, residual_net):
        model, shape = make(3)
        net = network_from_model(model, input_shape=shape).detach()
        x = torch.rand(16, *shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        y = forward(net, x).argmax(1)
        print(make.__name__, flush=True)
        for row in table(net, x, y, args.rhos or [1e-4, 1e-3, 3e-3, 1e-2, 3e-2]):
            low = linear_relaxation_margin_bound(net, x, y, relative_budget(net, row["rho"]), intermediate="ibp")
            frac = float((low.masked_fill(torch.nn.functional.one_hot(y, low.shape[1]).bool(), float("inf"))
                          .amin(1) > 0).double().mean())
            print(f"  linear with intermediate='ibp': {100 * frac:.1f} %")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("which", choices=["digits", "resnet56", "testnets"])
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--rhos", type=float, nargs="*")
    ap.add_argument("--bounds", nargs="*", choices=BOUNDS, default=list(BOUNDS))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--checkpoint", default="../shared/data/resnet56-cifar10.th")
    ap.add_argument("--data", default="../shared/data/cifar10-subset.npz")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    {"digits": digits, "resnet56": resnet56, "testnets": testnets}[args.which](args)


if __name__ == "__main__":
    main()
