"""Empirical modulus (retraining) against κ on a small interpolating DFCNN, and the CLI."""

import json

import pytest
import torch
from click.testing import CliRunner

from setsens.lipschitz import DenseModulus, empirical_modulus
from setsens.problem import Perturbation




def test_empirical_ratio_bounded_by_kappa_and_attained(make_interpolating):
    pb = make_interpolating([3, 10, 2], n=4, seed=21)  # p = 50 > n·c = 8: interpolating regime
    dm = DenseModulus(pb, tau=1e-8)
    res = dm.modulus(tau=1e-8, n_directions=3)
    assert res.criterion_holds and not res.ill_determined
    g = torch.Generator().manual_seed(0)
    x, _ = pb.points(dm.indices)
    dirs = {"worst": Perturbation(dm.indices, res.direction)}
    for j, d in enumerate(res.next_directions):
        dirs[f"singular-{j + 2}"] = Perturbation(dm.indices, d)
    while len(dirs) < 20:
        d = torch.randn(x.shape, generator=g, dtype=x.dtype)
        dirs[f"random-{len(dirs)}"] = Perturbation(dm.indices, d / d.norm())
    d1 = torch.zeros_like(x)
    d1[2] = torch.randn(x.shape[1], generator=g, dtype=x.dtype)
    dirs["point-2"] = Perturbation(dm.indices, d1 / d1.norm())
    pred = {k: dm.first_order_shift(v, tau=1e-8) for k, v in dirs.items()}
    recs = empirical_modulus(pb, dirs, steps=[1e-4], reference_norm=float(x.norm()), predicted=pred)
    assert len(recs) == 21
    ratios = {r.direction: r.ratio for r in recs}
    assert max(ratios.values()) <= 1.1 * res.kappa
    assert ratios["worst"] >= 0.9 * res.kappa
    # the first-order prediction is accurate direction by direction at this step size
    for r in recs:
        assert r.ratio == pytest.approx(r.predicted_ratio, rel=0.05, abs=1e-3 * res.kappa)
    # the shift is measured against the old *set*: it is smaller than the distance moved
    assert all(r.shift <= r.moved * (1 + 1e-2) for r in recs)


def test_empirical_rejects_bad_input(make_interpolating):
    pb = make_interpolating([3, 4, 2], n=2, seed=1)
    x, _ = pb.points([0, 1])
    with pytest.raises(ValueError, match="unit norm"):
        empirical_modulus(pb, {"d": Perturbation(torch.tensor([0, 1]), x)}, [1e-3], 1.0)
    unit = Perturbation(torch.tensor([0, 1]), x / x.norm())
    with pytest.raises(ValueError, match="positive"):
        empirical_modulus(pb, {"d": unit}, [0.0], 1.0)


def test_cli_json(make_interpolating, monkeypatch, tmp_path):
    from setsens.cli import main
    from setsens.experiments import lipschitz as exp

    def tiny(cfg, log=print):
        return make_interpolating([4, 10, 3], n=3, seed=2)

    monkeypatch.setattr(exp, "train_dfcnn", tiny)
    out = tmp_path / "lip"
    result = CliRunner().invoke(
        main, ["lipschitz", "--out", str(out), "--json", "--steps", "1e-4", "--worst-steps", "1e-5",
               "--directions", "6", "--tau", "1e-8"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout[result.stdout.index("{"):])
    for key in ("numerical_modulus", "closed_form_modulus", "empirical_max_ratio", "aubin_residual"):
        assert key in data
    assert set(data["closed_form_modulus"]) == {"W1", "a (output)"}
    assert data["empirical_max_ratio"] <= 1.1 * data["numerical_modulus"]
    assert data["worst_case_ratio"] >= 0.9 * data["numerical_modulus"]
    assert (out / "lipschitz.json").exists() and (out / "lipschitz_shift.png").exists()
    assert "Theorem 2" in (out / "lipschitz.md").read_text()


def test_cli_seeds_report_distributions(make_interpolating, monkeypatch, tmp_path):
    from setsens.cli import main
    from setsens.experiments import lipschitz as exp

    monkeypatch.setattr(exp, "train_dfcnn", lambda cfg, log=print: make_interpolating([4, 10, 3], n=3, seed=cfg.seed))
    out = tmp_path / "lip"
    result = CliRunner().invoke(main, ["lipschitz", "--out", str(out), "--json", "--steps", "1e-4", "--worst-steps",
                                       "1e-5", "--directions", "4", "--tau", "1e-8", "--seeds", "2,3"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout[result.stdout.index("{"):])
    assert data["seeds"] == [2, 3]
    k = data["numerical_modulus"]
    assert set(k) == {"median", "min", "max", "per_seed"} and len(k["per_seed"]) == 2 and k["min"] < k["max"]
    assert (out / "seed2" / "lipschitz.json").is_file() and (out / "headlines.json").is_file()
