"""The one registry of small test problems: every test builds its networks and data here.

* :func:`small_problem` — a two-layer classifier or regressor as a :class:`~setsens.problem.Problem`;
* :func:`smooth_mlp` — a 3-6-3 tanh MLP at random weights (cross-entropy or squared error) with held-out
  inputs: the training tangent's and the filters' problem;
* :func:`interpolating_mlp` — a 4-10-3 tanh MLP fitted to 8 points (p > n·K) with 3 points moved 1 %:
  the estimate's and the preconditioners' problem;
* :func:`fitted_problem` — a small tanh network at an exact fit (squared error, Levenberg–Marquardt)
  or at random weights (cross-entropy): the audit's and the poisoning attack's problem;
* :func:`dfcnn_problem` — the paper's bias-free ReLU DFCNN with squared loss, at random weights
  (random targets) or interpolating its targets exactly;
* :func:`weight_net` — a bias-free network as weight matrices with inputs and labels (``weights``);
* :func:`singular_symmetric`, :func:`graded` — symmetric matrices for the Krylov methods;
* :func:`resnet_run_files` — a tiny ResNet checkpoint and CIFAR-like npz on disk (the ResNet CLI).

All are seeded by their arguments: the same call gives the same problem.
"""

from pathlib import Path

import numpy as np
import torch
from torch import nn

from setsens.models.mlp import mlp
from setsens.problem import Problem, cross_entropy, squared_error
from setsens.retrain import levenberg_marquardt
from setsens.weights import forward


def small_problem(seed=0, n=12, d=3, hidden=4, k=2, act=nn.Tanh, bias=True, loss="ce", batch_size=5):
    """``d``-``hidden``-``k`` network with ``act`` on Gaussian inputs, cross-entropy (``"ce"``) or squared loss."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(d, hidden, bias=bias), act(), nn.Linear(hidden, k, bias=bias)).double()
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.randint(0, k, (n,), generator=g)
    fn = cross_entropy if loss == "ce" else squared_error
    return Problem(model, fn, (x, y), batch_size=batch_size)


def smooth_mlp(dtype=torch.float64, loss="ce", n=14, seed=0):
    """A 3-6-3 tanh MLP at random weights on Gaussian data, plus 30 held-out inputs."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 3)).to(dtype)
    x = torch.randn(n + 30, 3, generator=g, dtype=dtype)
    y = torch.randint(0, 3, (n + 30,), generator=g) if loss == "ce" else torch.randn(n + 30, 3, generator=g,
                                                                                       dtype=dtype)
    problem = Problem(model, cross_entropy if loss == "ce" else squared_error, (x[:n], y[:n]), batch_size=5)
    return problem, (x[n:], y[n:])


def interpolating_mlp(seed, loss, batch_size=8):
    """A small interpolating MLP (p > n·K) fitted to its data (``"se"`` or ``"ce"``), and 3 points moved 1 %."""
    from setsens.perturb import gradient_perturbation
    from setsens.retrain import retrain

    problem = small_problem(seed=seed, n=8, d=4, hidden=10, k=3, act=nn.Tanh, loss=loss, batch_size=batch_size)
    problem.params = retrain(problem, gtol=1e-10, max_iter=2000).w
    return problem, gradient_perturbation(problem, torch.arange(3), 0.01)


def fitted_problem(loss=squared_error, seed=0, n=10, k=2):
    """A 3-8-``k`` tanh network on ``n`` Gaussian points: fitted exactly to random targets for
    ``squared_error`` (p = 32 + 9k > n·k for the defaults), at random weights for cross-entropy."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, k)).double()
    x = torch.randn(n, 3, generator=g, dtype=torch.float64)
    if loss is squared_error:
        y = torch.randn(n, k, generator=g, dtype=torch.float64)
        w = levenberg_marquardt(Problem(model, loss, (x, y)), gtol=1e-13, max_iter=300).w
        return Problem(model, loss, (x, y), params=w)
    return Problem(model, loss, (x, torch.randint(0, k, (n,), generator=g)))


def dfcnn_problem(widths, n, seed=0, interpolating=False, reduction="mean"):
    """A DFCNN ``widths`` on ``n`` points in [0, 1]^d.

    ``interpolating``: weights scaled by 1.5, inputs shifted by 0.1 and targets ``y = f(x, w̄)``, so
    w̄ interpolates exactly (∇L = 0); otherwise random targets (not stationary).
    """
    g = torch.Generator().manual_seed(seed)
    net = mlp(widths).double()
    scale = 1.5 if interpolating else 1.0
    with torch.no_grad():
        for p in net.parameters():
            w = torch.randn(p.shape, generator=g, dtype=torch.float64) / p.shape[1] ** 0.5
            p.copy_(w * scale if interpolating else w)
    x = torch.rand(n, widths[0], generator=g, dtype=torch.float64)
    if interpolating:
        x = x + 0.1
        with torch.no_grad():
            y = net(x)
    else:
        y = torch.randn(n, widths[-1], generator=g, dtype=torch.float64)
    return Problem(net, squared_error, (x, y), reduction=reduction)


def weight_net(seed, sizes, N, x_scale=None, labels="predicted", dtype=torch.float64):
    """``(W, x, y, g)``: Gaussian weight matrices for layer widths ``sizes``, ``N`` Gaussian inputs
    (times ``x_scale``) and labels, predicted by the network or drawn at random (``labels="random"``);
    ``g`` is the generator, for further draws."""
    g = torch.Generator().manual_seed(seed)
    W = [torch.randn(sizes[l + 1], sizes[l], generator=g, dtype=dtype) for l in range(len(sizes) - 1)]
    x = torch.randn(N, sizes[0], generator=g, dtype=dtype)
    if x_scale is not None:
        x = x * x_scale
    y = torch.randint(0, sizes[-1], (N,), generator=g) if labels == "random" else forward(W, x).argmax(1)
    return W, x, y, g


def singular_symmetric(p, rank, seed, indefinite=False):
    """``(A, g)``: a random symmetric p×p matrix of the given rank (eigenvalues in [0.1, 1.1), half negated
    when ``indefinite``) and its generator."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(p, p, generator=g, dtype=torch.float64))
    lam = torch.zeros(p, dtype=torch.float64)
    lam[:rank] = torch.rand(rank, generator=g, dtype=torch.float64) + 0.1
    if indefinite:
        lam[: rank // 2] *= -1
    return Q @ torch.diag(lam) @ Q.T, g


def graded(p=120, seed=0):
    """Eigenvalues 1e2 … 1e-3 (three negative) and 40 zeros, and a b outside range(H)."""
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(p, p, generator=g, dtype=torch.float64))
    lam = torch.cat([torch.logspace(2, -3, p - 40, dtype=torch.float64), torch.zeros(40, dtype=torch.float64)])
    lam[:3] *= -1
    return U @ torch.diag(lam) @ U.T, torch.randn(p, generator=g, dtype=torch.float64)


#: The shared ResNet-56 checkpoint and CIFAR-10 subset (tests that need them skip without them).
SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
CKPT = SHARED / "resnet56-cifar10.th"
NPZ = SHARED / "cifar10-subset.npz"


def resnet_run_files(directory, n_train=12):
    """A random ResNet-8 checkpoint (DataParallel layout) and an ``n_train``+6-image npz in ``directory``.

    Returns ``(checkpoint path, npz path, model)``.
    """
    from setsens.models.resnet import cifar_resnet

    torch.manual_seed(0)
    model = cifar_resnet(8)
    torch.save({"state_dict": {"module." + k: v for k, v in model.state_dict().items()}, "best_prec1": 0.0},
               directory / "r8.th")
    rng = np.random.default_rng(0)
    np.savez(directory / "c.npz", train_x=rng.integers(0, 256, (n_train, 32, 32, 3), dtype=np.uint8),
             train_y=rng.integers(0, 10, n_train).astype(np.int64),
             test_x=rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8),
             test_y=rng.integers(0, 10, 6).astype(np.int64))
    return directory / "r8.th", directory / "c.npz", model
