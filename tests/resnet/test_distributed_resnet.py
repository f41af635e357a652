"""`setsens resnet` under torchrun's environment with 2 gloo processes: Table 1 (and Table 3) equal the
single-process run's to float rounding
(float64: 1e-9 relative; they agree to about 1e-15)."""

import json
import os
import socket
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from click.testing import CliRunner

from problems import resnet_run_files
from setsens.cli import main

N = 24  # images: 12 per rank, in batches of 8 and 4; every one eligible (threshold 100), so the moved points
# are drawn at random (the 3 moved points lie on both ranks)


def _args(ckpt, npz, out):
    return ["resnet", "--depth", "8", "--checkpoint", str(ckpt), "--data", str(npz), "--n", str(N),
            "--points", "1,3", "--threshold", "100", "--step", "1", "--maxiter", "3", "--dtype", "float64", "--batch-size", "8",
            "--n-test", "6", "--scenarios", "0", "--seeds", "0", "--grid", "0", "--threads", "1", "--json",
            "--no-progress", "--out", str(out)]


def _worker(rank, world, port, args):
    # what torchrun sets; the command initialises the process group from it, computes on this rank's
    # 12 images, writes on rank 0 only, tears the group down (del, gc, barrier, destroy) and leaves by os._exit(0)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    main(args, prog_name="setsens", standalone_mode=False)
    sys.exit(3)  # not reached: the command leaves by os._exit(0)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(args, world=2, timeout=180):
    ctx = mp.spawn(_worker, args=(world, _free_port(), args), nprocs=world, join=False)
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1):  # raises if a process failed (and ends the others)
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"the {world}-process run did not finish in {timeout} s")
    assert all(p.exitcode == 0 for p in ctx.processes)


def _close(got, want, what):
    if isinstance(want, float):
        assert got == pytest.approx(want, rel=1e-9, abs=1e-12), what
    else:
        assert got == want, what


@pytest.mark.skipif(not dist.is_available() or sys.platform == "win32", reason="torch.distributed (gloo) unavailable")
def test_two_process_table1_matches_single_process(tmp_path):
    ckpt, npz, _ = resnet_run_files(tmp_path, n_train=N)
    _spawn(_args(ckpt, npz, tmp_path / "dist"))
    got = json.loads((tmp_path / "dist" / "results.json").read_text())
    res = CliRunner().invoke(main, _args(ckpt, npz, tmp_path / "single"), catch_exceptions=False)
    assert res.exit_code == 0, res.output
    want = json.loads((tmp_path / "single" / "results.json").read_text())

    assert got["distributed"] == {"world_size": 2, "backend": "gloo", "rows_per_rank": [12, 12]}
    assert "distributed" not in want and got["model"]["n"] == want["model"]["n"] == N
    assert got["table2"] == [] and "seeds" not in got and "landscape" not in got  # Tables 1 and 3 only
    assert "Data-parallel: 2 processes (gloo)" in (tmp_path / "dist" / "report.md").read_text()
    for key in ("test_accuracy", "n_test"):
        _close(got["model"][key], want["model"][key], key)
    for key in ("risk", "grad_norm"):
        _close(got["stationarity"][key], want["stationarity"][key], key)
    assert [r["indices"] for r in got["table1"]] == [r["indices"] for r in want["table1"]]
    three = got["table1"][1]["indices"]
    assert min(three) < N // 2 <= max(three), three  # the 3 moved points lie on both ranks
    for g, w in zip(got["table1"], want["table1"]):
        for key in ("step_percent", "loss_base", "loss_original", "loss_estimated", "risk_original", "risk_estimated",
                    "norm_v", "relative_shift", "increase_removed", "feasibility_residual", "iterations"):
            _close(g[key], w[key], f"table 1, {w['points']} points: {key}")
        _close(g["paper_scale"]["loss_estimated"], w["paper_scale"]["loss_estimated"], "paper scale")
        assert [q["loss"] for q in g["path"]] == pytest.approx([q["loss"] for q in w["path"]], rel=1e-9)
        assert g["loss_estimated"] < g["loss_original"]  # a genuine estimate, not a zero shift
    for g, w in zip(got["table3"], want["table3"], strict=True):
        _close(g["loss_estimated"], w["loss_estimated"], f"table 3, step {w['step_percent']}")
    for k in (1, 3):  # the shifts themselves (rank 0 saved its copy; every rank holds the same)
        vg = torch.load(tmp_path / "dist" / "state" / f"estimate_table1_{k}.pt")["v"]
        vw = torch.load(tmp_path / "single" / "state" / f"estimate_table1_{k}.pt")["v"]
        assert float((vg - vw).norm() / vw.norm()) < 1e-9


def test_distributed_run_refuses_what_needs_one_process(tmp_path, monkeypatch):
    ckpt, npz, _ = resnet_run_files(tmp_path)
    monkeypatch.setenv("WORLD_SIZE", "2")  # as under torchrun; refused before any process group is formed
    for extra, word in ((["--scenarios", "2"], "--scenarios 2"), (["--solver", "minres"], "--solver minres"),
                        (["--grid", "5"], "--grid 5"), (["--device", "cuda:1"], "--device cuda:1")):
        res = CliRunner().invoke(main, ["resnet", "--depth", "8", "--checkpoint", str(ckpt), "--data", str(npz),
                                        "--n", "8", "--out", str(tmp_path / "o"), *extra])
        assert res.exit_code == 2 and word in res.output and "Tables 1 and 3 only" in res.output, res.output
        assert not dist.is_initialized() and not (tmp_path / "o").exists()
