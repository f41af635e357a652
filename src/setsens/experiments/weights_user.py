"""``setsens weights --model FILE:FACTORY --checkpoint … --data …``: which predictions of a user's own network
survive a weight perturbation of relative size ε, and does an attack agree.

The model, checkpoint and data are read by the loaders of ``setsens analyze`` (:mod:`setsens.loading`), the
model becomes a :class:`~setsens.weights.layers.Network` (:func:`setsens.weights.network_from_model`: Linear,
Conv2d, BatchNorm folded, pooling, the CIFAR ResNet blocks), and for every ε the per-layer budgets are
‖ΔWˡ‖_∞ ≤ ε ‖Wˡ‖_∞ (:func:`~setsens.weights.relative_budget`).  On the held-out points (the training points when
the data has none, at most ``--points``) :func:`certified_run` measures, with the library doing every bound:

* the certified fraction (certified *and* correct) for the paper's bound, its ``hidden="clean"`` form, and the
  interval and linear-relaxation bounds of :mod:`setsens.weights.relaxation`;
* which layers dominate the bound: each layer's share of either norm bound when it alone is perturbed (Theorem 3
  with S = {l}, at the smallest ε; the paper form is linear in that layer's budget), and every layer's norm;
* the attack check: :func:`~setsens.weights.weight_attack` (PGD on per-input weights, towards the runner-up
  class) on up to ``--attack-points`` certified and as many uncertified correct points at each ε.  A *violation*
  is a margin change above a certificate's η (a certified point flipped is one); flips of uncertified points show
  that the check can fail.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click
import torch

__all__ = ["PAPER_ONLY", "USER_ONLY", "CERTIFICATES", "check_options", "load_network", "certified_run",
           "render_report", "plot_certified", "run"]

#: parameters of ``setsens weights`` that only the paper's experiment reads (refused with ``--model``)
PAPER_ONLY = ("dataset", "quick", "budgets", "lam", "mu", "grid_lams", "grid_mus", "train_budget", "variant",
              "epochs", "hidden", "activation", "lr", "attack_restarts", "attack_targets", "weight_attack_points",
              "weight_attack_steps", "random_samples", "gamma_rel")
#: parameters that only the user-model mode reads (refused without ``--model``)
USER_ONLY = ("checkpoint", "trust_checkpoint", "points", "epsilons", "attack_points", "dtype")
#: certificate name → the ``bound`` of :func:`setsens.weights.certify` (products of norms: paper, clean; bound
#: propagation: interval, linear — :mod:`setsens.weights.relaxation`)
CERTIFICATES = {"paper": "paper", "clean": "clean", "interval": "interval", "linear": "linear"}
#: the certificates whose per-layer shares are reported (the norm forms: one cheap bound per layer)
SHARE_FORMS = ("paper", "clean")
#: points the per-layer shares of the bound are averaged over (one bound per layer each)
SHARE_POINTS = 32


def _given(ctx: click.Context, names) -> list[str]:
    """The flags, among ``names``, that the user set on the command line (not left at their default)."""
    from click.core import ParameterSource

    flags = {p.name: p.opts[0] for p in ctx.command.params}
    return [flags[n] for n in names if ctx.get_parameter_source(n) not in (ParameterSource.DEFAULT, None)]


def check_options(ctx: click.Context, model_spec, epsilons: str) -> tuple | None:
    """Before anything is loaded: the options of the other mode refused (one line naming the first), ``--data``
    required with ``--model``, the ε list.  Returns the sorted ε (None without ``--model``)."""
    from .options import number_list

    if model_spec is None:
        for flag in _given(ctx, USER_ONLY)[:1]:
            raise click.BadParameter("applies with --model only (your own network)", param_hint=flag)
        return None
    for flag in _given(ctx, PAPER_ONLY)[:1]:
        raise click.BadParameter("belongs to the paper's experiment (it trains its own MLPs); not with --model",
                                 param_hint=flag)
    if not _given(ctx, ("data_path",)):
        raise click.UsageError("give --data with --model: an .npz (x, y[, x_test, y_test]), an image folder or "
                               "FILE.py:FUNCTION")
    return tuple(sorted(set(number_list(epsilons, "--epsilons", float, 0, open_min=True))))


def load_network(model_spec: str, checkpoint, trust: bool, data_spec: str, dtype: str | None = None):
    """``(model, network, data)`` loaded and checked (one-line click errors naming the option): the model in eval
    mode, its :class:`~setsens.weights.layers.Network` on inputs shaped like the data, integer labels of its
    classes."""
    from ..loading import load_checkpoint, load_data, load_model
    from ..weights import network_from_model

    try:
        model = load_model(model_spec)
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="--model") from None
    if checkpoint:
        try:
            model = load_checkpoint(model, checkpoint, trust=trust)
        except ValueError as err:
            raise click.BadParameter(str(err), param_hint="--checkpoint") from None
    try:
        data = load_data(data_spec)
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="--data") from None
    model.eval()
    if dtype is not None:
        model = model.to(getattr(torch, dtype))
    try:
        net = network_from_model(model, input_shape=tuple(data.x.shape[1:])).detach()
    except ValueError as err:  # UnsupportedNetworkError included
        raise click.BadParameter(f"{err} (inputs of shape {tuple(data.x.shape[1:])} from --data)",
                                 param_hint="--model") from None
    k = net[-1].shape[0]
    for y, part in ((data.y, "training"), (data.y_test, "held-out")):
        if y is None:
            continue
        if y.is_floating_point() or y.ndim != 1:
            raise click.BadParameter(f"the {part} targets must be integer class labels (N,), got {y.dtype} of "
                                     f"shape {tuple(y.shape)}", param_hint="--data")
        if len(y) and (int(y.min()) < 0 or int(y.max()) >= k):
            raise click.BadParameter(f"{part} labels span [{int(y.min())}, {int(y.max())}] but the model has {k} "
                                     "outputs", param_hint="--data")
    return model, net, data


def _key(eps: float) -> str:
    return f"{eps:g}"


def _batches(n: int, size: int):
    return [slice(s, min(s + size, n)) for s in range(0, n, size)]


def _layer_shares(net, x, y, eps: float, hidden: str) -> list[float]:
    """Each weighted layer's share of the bound (form ``hidden``) when it alone moves by its budget at ``eps``
    (mean over ``x`` of max_i η_{yi})."""
    from ..weights import margin_change_bound, relative_budget

    e = relative_budget(net, eps)
    with torch.no_grad():
        alone = torch.stack([margin_change_bound(net, x, y, e, layers=[l], hidden=hidden).amax(dim=1).mean()
                             for l in range(len(net))]).double()
    total = float(alone.sum())
    return (alone / total).tolist() if total > 0 else [0.0] * len(net)


def certified_run(net, x, y, epsilons, attack_points: int = 20, attack_steps: int = 40, seed: int = 0,
                  batch_size: int = 128, progress=None) -> dict:
    """Clean accuracy, the certified fraction per certificate and ε, the per-layer shares of the bound and the
    attack check on ``(x, y)`` (a checked batch for ``net``).  Returns a JSON-able dict."""
    from ..progress import counted
    from ..weights import forward, margin_lower_bound, margins, relative_budget, runner_up, weight_attack
    from ..weights.certify import least_lower_bound

    n, parts = x.shape[0], _batches(x.shape[0], batch_size)
    t0 = time.perf_counter()
    with torch.no_grad():
        logits = torch.cat([forward(net, x[s]) for s in parts])
    correct = logits.argmax(1) == y
    target = runner_up(logits, y)
    margin = margins(logits, y).gather(1, target[:, None]).squeeze(1)
    norms = net.norms().double()
    gen = torch.Generator().manual_seed(seed)
    certified = {c: {} for c in CERTIFICATES}
    checks = {}
    for eps in counted(progress, list(epsilons), "epsilon"):
        e = relative_budget(net, eps)
        with torch.no_grad():  # each certificate's lower bounds on m̂ once: the certificate and the attack's η
            low = {c: torch.cat([margin_lower_bound(net, x[s], y[s], e, bound=h) for s in parts])
                   for c, h in CERTIFICATES.items()}
        cert = {c: least_lower_bound(low[c], y) > 0 for c in CERTIFICATES}
        for c in CERTIFICATES:
            certified[c][_key(eps)] = float(cert[c].double().mean())
        any_cert = torch.stack(list(cert.values())).any(0)
        chosen = {"certified": any_cert.nonzero().flatten()[:attack_points],
                  "uncertified": (correct & ~any_cert).nonzero().flatten()[:attack_points]}
        idx = torch.cat(list(chosen.values()))
        check = {"certified_attacked": len(chosen["certified"]), "uncertified_attacked": len(chosen["uncertified"]),
                 "violations": {c: 0 for c in CERTIFICATES}, "ratio_max": {c: None for c in CERTIFICATES},
                 "certified_flipped": 0, "uncertified_flipped": 0}
        if len(idx) and attack_points:
            change = torch.cat([weight_attack(net, x[idx[s]], y[idx[s]], target[idx[s]], e, steps=attack_steps,
                                              generator=gen)[1] for s in _batches(len(idx), batch_size)])
            flipped = (margin[idx] - change) <= 0
            nc = len(chosen["certified"])
            check["certified_flipped"] = int(flipped[:nc].sum())
            check["uncertified_flipped"] = int(flipped[nc:].sum())
            for c in CERTIFICATES:
                # η = m − (the certificate's lower bound on m̂) for the attacked pair
                pair = low[c][idx].gather(1, target[idx, None]).squeeze(1)
                eta = margin[idx].to(pair.dtype) - pair
                change_w = change.to(eta.dtype)
                # a change above η (beyond float rounding), or a point this bound certifies flipped
                check["violations"][c] = int(((change_w > eta * (1 + 1e-5) + 1e-6) | (cert[c][idx] & flipped)).sum())
                check["ratio_max"][c] = float((change_w / eta.clamp_min(1e-300)).max())
        checks[_key(eps)] = check
    shares = {c: _layer_shares(net, x[:SHARE_POINTS], y[:SHARE_POINTS], min(epsilons), c) for c in SHARE_FORMS}
    layers = [{"index": l, "name": a.name, "kind": ("Linear" if a.conv is None else "Conv2d")
               + ("+BatchNorm" if getattr(a, "_folded", False) else ""),
               "shape": list(a.weight.shape), "norm": float(norms[l]), "share": {c: shares[c][l] for c in shares},
               "budget": {_key(eps): eps * float(norms[l]) for eps in epsilons}}
              for l, a in enumerate(net.affines)]
    return {"points": n, "clean_accuracy": float(correct.double().mean()), "epsilons": list(epsilons),
            "certified_fraction": certified, "attack": checks, "attack_steps": attack_steps,
            "attack_points": attack_points,
            "violations": sum(sum(c["violations"].values()) for c in checks.values()),
            "layers": layers, "log10_norm_product": float(norms.log10().sum()),
            "seconds": time.perf_counter() - t0}


def plot_certified(results: dict):
    """Certified fraction against ε (log axis), one line per certificate, the clean accuracy as a line."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    eps = results["epsilons"]
    for (c, fractions), style in zip(results["certified_fraction"].items(), ("o-", "s--", "^-.", "v:")):
        ax.plot(eps, [100 * fractions[_key(e)] for e in eps], style, label=f"certified ({c} bound)")
    ax.axhline(100 * results["clean_accuracy"], color="gray", lw=0.8, label="clean accuracy")
    ax.set_xscale("log")
    ax.set_ylim(-2, 102)
    ax.set_xlabel("relative budget ε  (‖ΔW_l‖_∞ ≤ ε ‖W_l‖_∞ for every layer)")
    ax.set_ylabel(f"% of {results['points']} points")
    ax.set_title(f"{Path(results['model']).name}: certified under weight perturbations")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def render_report(results: dict) -> str:
    """Markdown: the run, the certified fractions, the attack check, the dominant layers."""
    eps, cf = results["epsilons"], results["certified_fraction"]
    L = ["# Weight perturbations: your network", "", f"Command: `{results['command']}`", "",
         f"Model `{results['model']}`" + (f", checkpoint `{results['checkpoint']}`" if results["checkpoint"] else "")
         + f", data `{results['data']}`: {results['points']} {results['evaluated_on']} points (seed "
         f"{results['seed']}), {results['dtype']}, {len(results['layers'])} weighted layers (BatchNorm folded), "
         f"the folded network matches the model to {results['network_vs_model']:.2g} (largest logit difference).  "
         "Clean accuracy "         f"{100 * results['clean_accuracy']:.1f} %.", "",
         "Budgets are relative: ‖ΔW_l‖_∞ ≤ ε ‖W_l‖_∞ for every weighted layer (‖·‖_∞ of the layer's operator, a "
         "convolution's included; biases not perturbed).  Certified: correct and the bound says no margin can "
         "reach 0 (`paper`: the layer recursion of the paper's bound; `clean`: the same with the clean activations, "
         "`hidden=\"clean\"`; `interval`: interval bounds through the layers; `linear`: a linear relaxation "
         "back-substituted through the layers — `setsens.weights.relaxation`).", "",
         "## Certified fraction (%)", "", "| ε | " + " | ".join(cf) + " |", "|---|" + "---|" * len(cf)]
    for e in eps:
        L.append(f"| {e:g} | " + " | ".join(f"{100 * cf[c][_key(e)]:.1f}" for c in cf) + " |")
    L += ["", "## Attack check", "",
          f"Weight-space PGD ({results['attack_steps']} steps, per-input perturbations inside the budget set, towards "
          "the runner-up class) at each ε on the first certified points (by either bound) and as many uncertified "
          f"correct points, at most {results['attack_points']} of each.  A "
          "violation is a margin change above the certificate's bound η (must be 0); ratio = largest change ÷ η.", "",
          "| ε | certified attacked | flipped | uncertified attacked | flipped | violations (" + ", ".join(cf)
          + ") | ratio max (" + ", ".join(cf) + ") |", "|---|---|---|---|---|---|---|"]
    for e in eps:
        a = results["attack"][_key(e)]
        ratios = ", ".join("—" if r is None else f"{r:.2g}" for r in a["ratio_max"].values())
        L.append(f"| {e:g} | {a['certified_attacked']} | {a['certified_flipped']} | {a['uncertified_attacked']} | "
                 f"{a['uncertified_flipped']} | {', '.join(str(v) for v in a['violations'].values())} | {ratios} |")
    L += ["", f"Violations in total: **{results['violations']}**.", "",
          "## Which layers dominate the bound", "",
          "Share: each layer's part of the bound when it alone moves by its budget (Theorem 3 with S = {l}), at the "
          f"smallest ε, mean over the first {min(SHARE_POINTS, results['points'])} points of the largest η; sorted by "
          "the clean form's share.  With relative budgets the paper form gives every hidden layer of a chain the "
          "same part (Theorem 1: ε Π_l M_l B), so there the norms decide: Π_l ‖W_l‖_∞ = "
          f"10^{results['log10_norm_product']:.1f}.  The clean form weighs each layer by the clean activations it "
          "sees.", "",
          "| layer | name | kind | ‖W_l‖_∞ | share (" + ", ".join(SHARE_FORMS) + ") |", "|---|---|---|---|---|"]
    top = sorted(results["layers"], key=lambda r: -r["share"]["clean"])[:10]
    for r in top:
        L.append(f"| {r['index']} | `{r['name']}` | {r['kind']} | {r['norm']:.3g} | "
                 + ", ".join(f"{100 * v:.1f} %" for v in r["share"].values()) + " |")
    if len(results["layers"]) > len(top):
        L.append(f"\n({len(results['layers']) - len(top)} more layers in results.json; largest norms: "
                 + ", ".join(f"{r['name']} {r['norm']:.3g}" for r in
                             sorted(results["layers"], key=lambda r: -r["norm"])[:5]) + ".)")
    L += ["", "![certified fraction](certified_vs_epsilon.png)", ""]
    return "\n".join(L)


def run(model_spec, checkpoint, trust_checkpoint, data_spec, epsilons, points, attack_points, attack_steps, seed,
        batch_size, out, as_json, dtype=None) -> None:
    """The user-model mode of ``setsens weights`` (options already checked by :func:`check_options`)."""
    from ..report import prepare_out_dir, save_figure, write_json, write_text
    from ..weights import forward
    from .bars import Bars

    log = (lambda msg: click.echo(msg, err=True)) if as_json else click.echo
    model, net, data = load_network(model_spec, checkpoint, trust_checkpoint, data_spec, dtype)
    held = data.x_test is not None
    x, y = (data.x_test, data.y_test) if held else (data.x, data.y)
    out_dir = prepare_out_dir(out)
    chosen = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:points].sort().values
    x, y = x[chosen].to(net[0].dtype), y[chosen].long()
    with torch.no_grad():
        gap = float((torch.cat([model(x[s]) for s in _batches(len(x), batch_size)])
                     - torch.cat([forward(net, x[s]) for s in _batches(len(x), batch_size)])).abs().max())
    log(f"{type(model).__name__}: {len(net)} weighted layers, {len(x)} {'held-out' if held else 'training'} points, "
        f"ε = {', '.join(f'{e:g}' for e in epsilons)}…")
    with Bars({"epsilon": "ε values (certificates and attack)"}) as bars:
        results = certified_run(net, x, y, epsilons, attack_points, attack_steps, seed, batch_size, progress=bars)
    command_line = "setsens weights " + " ".join(sys.argv[2:]) if len(sys.argv) > 1 else "setsens weights"
    results = {"model": model_spec, "checkpoint": checkpoint, "data": data_spec, "command": command_line,
               "evaluated_on": "held-out" if held else "training", "seed": seed,
               "dtype": str(net[0].dtype).removeprefix("torch."), "indices": chosen.tolist(),
               "network_vs_model": gap, **results}
    write_json(out_dir / "results.json", results)
    write_text(out_dir / "report.md", render_report(results))
    save_figure(plot_certified(results), out_dir / "certified_vs_epsilon.png")
    if as_json:
        keys = ("points", "clean_accuracy", "certified_fraction", "violations", "network_vs_model")
        click.echo(json.dumps({k: results[k] for k in keys}, indent=2))
    else:
        for c, fractions in results["certified_fraction"].items():
            log(f"certified ({c}): " + ", ".join(f"{100 * f:.1f} % at ε = {e}" for e, f in fractions.items()))
        top = max(results["layers"], key=lambda r: r["share"]["clean"])
        log(f"violations: {results['violations']}; the largest share of the clean bound: layer {top['index']} "
            f"({top['name']}, {100 * top['share']['clean']:.0f} %)")
        log(f"report written to {out_dir}/ (report.md, results.json, certified_vs_epsilon.png)")
