"""2-process gloo run: the operators and `estimate` on a DistributedProblem equal the single-process ones."""

import os
import socket
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from setsens.distributed import DistributedProblem, shard, shutdown
from setsens.krylov import minres
from setsens.models.mlp import mlp
from setsens.operators import DataJacobian, Hessian
from setsens.problem import Perturbation, Problem, cross_entropy
from setsens.solution_set import RadiusOptions, SolveOptions, estimate

# 8 MINRES iterations: beyond that, MINRES on a singular H amplifies the summation-order rounding of
# the all-reduce like any change of reduction order (both runs are equally valid solves)
MINRES = SolveOptions(rule="fixed", maxiter=8, rtol=0, min_norm=False)


def _setup():
    torch.manual_seed(0)
    model = mlp([6, 8, 3], bias=True).double()
    x = torch.randn(23, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (23,))
    idx = torch.tensor([2, 11, 20])  # points on both ranks
    delta = 0.1 * torch.randn(3, 6, dtype=torch.float64)
    v = torch.randn(sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    yv = torch.randn_like(v)
    return model, x, y, Perturbation(idx, delta), v, yv


def _results(problem, pert, v, yv):
    """The same numbers from a Problem or from a DistributedProblem."""
    H = Hessian(problem)
    J = DataJacobian(problem, pert.indices)
    b = J @ pert.delta
    gauss_newton = estimate(problem, pert, "gauss-newton")  # validated rule, radius search: the whole estimate
    hessian = estimate(problem, pert, "hessian", solve=MINRES, radius=RadiusOptions(directions=0))
    return {"Hv": H @ v, "Jmu": b, "JTy": J.T @ yv, "v": minres(H, -b, maxiter=8, rtol=0).x,
            "risk": problem.risk(None, pert), "grad": problem.gradient(None, pert),
            "Hv_pert": Hessian(problem, perturbation=pert) @ v,
            "v_gauss_newton": gauss_newton.shift, "radius_gauss_newton": gauss_newton.radius,
            "feasibility_gauss_newton": gauss_newton.feasibility_residual,
            "output_residual_gauss_newton": gauss_newton.output_residual,
            "v_hessian": hessian.shift, "feasibility_hessian": hessian.feasibility_residual}


def _worker(rank, world, port, path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        model, x, y, pert, v, yv = _setup()
        sl = shard(len(y), rank, world)
        dp = DistributedProblem(model, cross_entropy, (x[sl], y[sl]), offset=sl.start, batch_size=5)
        gathered = [None] * world
        dist.all_gather_object(gathered, _results(dp, pert, v, yv) | {"n": dp.n})
        if rank == 0:
            torch.save(gathered, path)
        del dp  # its operators' caches hold autograd graphs: free them before the process group goes
    except BaseException:
        dist.destroy_process_group()
        raise
    shutdown()  # barrier, destroy, and leave without the interpreter's teardown (a gloo/autograd race)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available() or sys.platform == "win32", reason="torch.distributed (gloo) unavailable")
def test_two_process_estimate_matches_single_process(tmp_path):
    path = tmp_path / "dist.pt"
    mp.spawn(_worker, args=(2, _free_port(), str(path)), nprocs=2, join=True)
    ranks = torch.load(path, weights_only=False)

    model, x, y, pert, v, yv = _setup()
    ref = _results(Problem(model, cross_entropy, (x, y), batch_size=7), pert, v, yv)
    for r in ranks:
        assert r["n"] == 23
        for k, want in ref.items():
            got = r[k]
            if isinstance(want, float):
                assert got == pytest.approx(want, rel=1e-9, abs=1e-9), k
            else:
                err = float((got - want).norm() / want.norm())
                assert err < 1e-9, f"{k}: relative difference {err:.2e}"
    # the solves are the same on every rank, to the bit
    for k in ("v", "v_gauss_newton", "v_hessian"):
        assert torch.equal(ranks[0][k], ranks[1][k]), k
    assert ref["feasibility_hessian"] < 0.8  # a genuine solve, not a zero vector
    assert ref["radius_gauss_newton"] > float(ref["v_gauss_newton"].norm())  # a set, not a point


def test_shard_covers_everything_once():
    for n, world in [(10, 3), (7, 7), (5, 2), (100, 8)]:
        rows = [i for r in range(world) for i in range(n)[shard(n, r, world)]]
        assert rows == list(range(n))
    with pytest.raises(ValueError):
        shard(10, 3, 3)
