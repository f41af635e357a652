"""The four weight-perturbation certificates side by side: paper, clean (products of norms), interval, linear.

``resnet56``: the shared CIFAR-10 ResNet-56, float64, on ``--n`` CIFAR images, the certified fraction per
certificate at relative budgets ε_l = ρ ‖W_l‖_∞ and each bound's time.  ``testnets``: the conv+BN+pool and
residual nets of ``tests/weights/test_conv_bounds.py``.  (The paper's MLPs, with auto_LiRPA beside them, are
``benchmarks/weights_peers.py``.)  Usage::

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
    ap.add_argument("which", choices=["resnet56", "testnets"])
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--rhos", type=float, nargs="*")
    ap.add_argument("--bounds", nargs="*", choices=BOUNDS, default=list(BOUNDS))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--checkpoint", default="../shared/data/resnet56-cifar10.th")
    ap.add_argument("--data", default="../shared/data/cifar10-subset.npz")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    {"resnet56": resnet56, "testnets": testnets}[args.which](args)


if __name__ == "__main__":
    main()
