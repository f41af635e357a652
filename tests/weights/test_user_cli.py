"""``setsens weights --model …``: a user's own conv network (BatchNorm, biases, pooling) certified end to end, and
the options of the two modes refused, each before any work."""

import importlib.util
import json

import numpy as np
import pytest
import torch
from cli_helpers import rejected
from click.testing import CliRunner

from setsens.cli import main
from setsens.weights import certify, network_from_model, relative_budget

MODEL_FILE = '''
import torch
from torch import nn


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.AvgPool2d(2),
                         nn.Flatten(), nn.Linear(24, 3))
'''

EPSILONS = "1e-5,1e-4,1e-3,1e-2,1e-1,1"


@pytest.fixture(scope="module")
def user_model(tmp_path_factory):
    """The model file, a checkpoint with non-trivial BatchNorm statistics, and an .npz of 30 + 30 random 1×8×8
    images labelled by the model's own predictions (clean accuracy 1)."""
    root = tmp_path_factory.mktemp("user")
    path = root / "net.py"
    path.write_text(MODEL_FILE)
    spec = importlib.util.spec_from_file_location("user_net", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.model()
    g = torch.Generator().manual_seed(1)
    for bn in (model[1], model[5]):
        bn.running_mean.copy_(0.3 * torch.randn(bn.num_features, generator=g))
        bn.running_var.copy_(0.5 + torch.rand(bn.num_features, generator=g))
        bn.weight.data.copy_(0.5 + torch.rand(bn.num_features, generator=g))
        bn.bias.data.copy_(0.2 * torch.randn(bn.num_features, generator=g))
    torch.save(model.state_dict(), root / "net.pt")
    model.eval()
    x = torch.rand(60, 1, 8, 8, generator=g)
    with torch.no_grad():
        y = model(x).argmax(1)
    np.savez(root / "data.npz", x=x[:30].numpy(), y=y[:30].numpy(), x_test=x[30:].numpy(), y_test=y[30:].numpy())
    np.savez(root / "floats.npz", x=x[:30].numpy(), y=np.random.rand(30))
    np.savez(root / "wide.npz", x=x[:30].numpy(), y=np.full(30, 7))
    np.savez(root / "flat.npz", x=x[:30].reshape(30, -1).numpy(), y=y[:30].numpy())
    np.savez(root / "train.npz", x=x[:30].numpy(), y=y[:30].numpy())
    return {"model": f"{path}:model", "checkpoint": str(root / "net.pt"), "data": str(root / "data.npz"),
            "floats": str(root / "floats.npz"), "wide": str(root / "wide.npz"), "flat": str(root / "flat.npz"),
            "train": str(root / "train.npz"),
            "file": str(path), "net": model, "x_test": x[30:], "y_test": y[30:]}


def test_user_model_end_to_end(user_model, tmp_path):
    out = tmp_path / "rep"
    args = ["weights", "--model", user_model["model"], "--checkpoint", user_model["checkpoint"], "--data",
            user_model["data"], "--points", "20", "--attack-points", "5", "--epsilons", EPSILONS, "--out", str(out),
            "--json"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    for name in ("results.json", "report.md", "certified_vs_epsilon.png"):
        assert (out / name).stat().st_size > 0
    res = json.loads((out / "results.json").read_text())
    assert res["points"] == summary["points"] == 20 and res["evaluated_on"] == "held-out"
    assert res["clean_accuracy"] == 1.0 and res["network_vs_model"] < 1e-5
    assert res["violations"] == summary["violations"] == 0
    keys = [f"{float(e):g}" for e in EPSILONS.split(",")]
    assert list(res["certified_fraction"]) == ["paper", "clean", "interval", "linear"]
    for cert in ("paper", "clean", "interval", "linear"):
        fractions = [res["certified_fraction"][cert][k] for k in keys]
        assert all(a >= b for a, b in zip(fractions, fractions[1:])), fractions  # non-increasing in ε
        assert fractions[0] == 1.0 and fractions[-1] == 0.0
    cf = res["certified_fraction"]
    paper = cf["paper"]
    # each certificate is at least as tight as the one before, and the relaxation gains somewhere
    for tighter, looser in (("clean", "paper"), ("interval", "clean"), ("linear", "interval")):
        assert all(cf[tighter][k] >= cf[looser][k] for k in keys), (tighter, looser)
    assert any(cf["linear"][k] > cf["clean"][k] for k in keys)
    assert all(v == 0 for a in res["attack"].values() for v in a["violations"].values())
    # the fractions are the library's certificates on the same points
    idx = torch.tensor(res["indices"])
    net = network_from_model(user_model["net"], input_shape=(1, 8, 8)).detach()
    x, y = user_model["x_test"][idx], user_model["y_test"][idx]
    for k in keys:
        assert paper[k] == float(certify(net, x, y, relative_budget(net, float(k))).double().mean())
        assert cf["linear"][k] == float(certify(net, x, y, relative_budget(net, float(k)), bound="linear").double().mean())
    # the attack check: certified points attacked and never flipped; uncertified ones flipped at the largest ε
    attack = res["attack"]
    assert sum(a["certified_attacked"] for a in attack.values()) > 0
    assert all(a["certified_flipped"] == 0 for a in attack.values())
    assert attack[keys[-1]]["uncertified_attacked"] == 5 and attack[keys[-1]]["uncertified_flipped"] > 0
    # the layers: names, norms, shares summing to 1, budgets ε‖W_l‖
    layers = res["layers"]
    assert [layer["kind"] for layer in layers] == ["Conv2d+BatchNorm", "Conv2d+BatchNorm", "Linear"]
    for cert in ("paper", "clean"):
        assert abs(sum(layer["share"][cert] for layer in layers) - 1) < 1e-9
    assert all(abs(layer["budget"]["0.01"] - 0.01 * layer["norm"]) < 1e-12 for layer in layers)
    report = (out / "report.md").read_text()
    assert "Violations in total: **0**" in report and "Which layers dominate" in report


def test_training_points_when_no_held_out_part_and_float64(user_model, tmp_path):
    out = tmp_path / "rep"
    r = CliRunner().invoke(main, ["weights", "--model", user_model["model"], "--data", user_model["train"],
                                  "--points", "100", "--attack-points", "0", "--epsilons", "1e-3", "--dtype", "float64",
                                  "--out", str(out)])
    assert r.exit_code == 0, r.output
    res = json.loads((out / "results.json").read_text())
    assert res["points"] == 30 and res["attack"]["0.001"]["certified_attacked"] == 0  # capped; no attack asked
    assert res["evaluated_on"] == "training" and res["dtype"] == "float64" and res["network_vs_model"] < 1e-12


BAD = [
    (["--model", "{model}", "--data", "{data}", "--lam", "0.2"], "--lam"),
    (["--model", "{model}", "--data", "{data}", "--dataset", "cifar10"], "--dataset"),
    (["--model", "{model}", "--data", "{data}", "--hidden", "64"], "--hidden"),
    (["--model", "{model}", "--data", "{data}", "--quick"], "--quick"),
    (["--model", "{model}", "--data", "{data}", "--attack-restarts", "3"], "--attack-restarts"),
    (["--model", "{model}", "--data", "{data}", "--budgets", "0.01"], "--budgets"),
    (["--model", "{model}"], "--data"),
    (["--model", "{model}", "--data", "{data}", "--epsilons", "-1"], "--epsilons"),
    (["--model", "{model}", "--data", "{data}", "--epsilons", "0"], "--epsilons"),
    (["--model", "{model}", "--data", "{data}", "--epsilons", "a"], "--epsilons"),
    (["--model", "{model}", "--data", "{data}", "--points", "0"], "--points"),
    (["--model", "{model}", "--data", "{data}", "--attack-points", "-1"], "--attack-points"),
    (["--model", "{file}:nothing", "--data", "{data}"], "--model"),
    (["--model", "missing.py:model", "--data", "{data}"], "--model"),
    (["--model", "{model}", "--checkpoint", "{data}", "--data", "{data}"], "--checkpoint"),
    (["--model", "{model}", "--data", "missing.npz"], "--data"),
    (["--model", "{model}", "--data", "{floats}"], "--data"),
    (["--model", "{model}", "--data", "{wide}"], "--data"),
    (["--model", "{model}", "--data", "{flat}"], "--model"),  # flat rows do not chain into a Conv2d
    (["--points", "20"], "--points"),
    (["--epsilons", "1e-3"], "--epsilons"),
    (["--checkpoint", "{checkpoint}"], "--checkpoint"),
    (["--dtype", "float64"], "--dtype"),
    (["--model", "{model}", "--data", "{data}", "--dtype", "float16"], "--dtype"),
]


@pytest.mark.parametrize("args, hint", BAD)
def test_bad_options_are_refused_before_any_work(user_model, tmp_path, args, hint):
    out = tmp_path / "r"
    rejected(["weights", *(a.format(**user_model) for a in args), "--out", str(out)], hint, out=out)
