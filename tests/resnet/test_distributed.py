"""2-process gloo run: distributed operators and solve equal the single-process ones."""

import os
import socket
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from setsens.distributed import (DistributedDataJacobian, DistributedHessian, DistributedProblem,
                                 distributed_function_space_shift, shard)
from setsens.function_space import function_space_shift
from setsens.models.mlp import mlp
from setsens.operators import DataJacobian, Hessian
from setsens.preconditioners import minres
from setsens.problem import Perturbation, Problem, cross_entropy


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


def _worker(rank, world, port, path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        model, x, y, pert, v, yv = _setup()
        sl = shard(len(y), rank, world)
        local = Problem(model, cross_entropy, (x[sl], y[sl]), batch_size=5)
        dp = DistributedProblem(local, sl.start)
        H = DistributedHessian(dp)
        J = DistributedDataJacobian(dp, pert.indices)
        b = J @ pert.delta
        sol = minres(H, b, maxiter=8, rtol=0)
        out = {"Hv": H(v), "Jmu": b, "JTy": J.T @ yv, "v": sol.v, "risk": dp.risk(None, pert),
               "v_gauss_newton": distributed_function_space_shift(dp, pert, maxiter=8, rtol=0)[0],
               "grad": dp.gradient(None, pert), "n": dp.n, "Hv_pert": DistributedHessian(dp, perturbation=pert)(v)}
        gathered = [None] * world
        dist.all_gather_object(gathered, out)
        if rank == 0:
            torch.save(gathered, path)
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available() or sys.platform == "win32", reason="torch.distributed (gloo) unavailable")
def test_two_process_solve_matches_single_process(tmp_path):
    path = tmp_path / "dist.pt"
    mp.spawn(_worker, args=(2, _free_port(), str(path)), nprocs=2, join=True)
    ranks = torch.load(path, weights_only=False)

    model, x, y, pert, v, yv = _setup()
    problem = Problem(model, cross_entropy, (x, y), batch_size=7)
    H = Hessian(problem)
    J = DataJacobian(problem, pert.indices)
    b = J @ pert.delta
    ref = {"Hv": H(v), "Jmu": b, "JTy": J.T @ yv, "v": minres(H, b, maxiter=8, rtol=0).v,
           "v_gauss_newton": function_space_shift(problem, pert, maxiter=8, rtol=0)[0],
           "risk": problem.risk(None, pert), "grad": problem.gradient(None, pert),
           "Hv_pert": Hessian(problem, perturbation=pert)(v)}
    for r in ranks:
        assert r["n"] == 23
        for k, want in ref.items():
            got = r[k]
            if isinstance(want, float):
                assert got == pytest.approx(want, rel=1e-12), k
            else:
                err = float((got - want).norm() / want.norm())
                assert err < 1e-9, f"{k}: relative difference {err:.2e}"
    # (8 iterations: beyond that, MINRES on a singular H amplifies summation-order rounding of the
    # all-reduce like any change of reduction order — both runs are equally valid solves)
    # the solve is the same on every rank, to the bit
    assert torch.equal(ranks[0]["v"], ranks[1]["v"])
    assert torch.equal(ranks[0]["v_gauss_newton"], ranks[1]["v_gauss_newton"])
    assert float((H(ref["v"]) + b).norm() / b.norm()) < 0.8  # a genuine solve, not a zero vector


def test_shard_covers_everything_once():
    for n, world in [(10, 3), (7, 7), (5, 2), (100, 8)]:
        rows = [i for r in range(world) for i in range(n)[shard(n, r, world)]]
        assert rows == list(range(n))
    with pytest.raises(ValueError):
        shard(10, 3, 3)
