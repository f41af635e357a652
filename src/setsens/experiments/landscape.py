"""``setsens landscape``: loss landscape of the perturbed problem through w̄ (Figure 4's analogue).

Reads a ``setsens resnet`` run directory (its config and the saved estimates under ``state/``),
rebuilds the perturbed problem, and evaluates the loss on a 2-D plane: ``--plane estimate``
(w̄ → estimate and an orthogonal filter-normalised random direction; the estimates lie on or are
projected onto it) or ``--plane filter`` (two filter-normalised random directions, Li et al. 2018).
Writes ``landscape.json``, ``landscape_contour.png`` and ``landscape_surface.png``.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import click
import torch

from .bars import Bars
from .options import first_line, number_list

__all__ = ["command"]


def _run_config(run_dir: Path, estimates: str, n: int | None) -> tuple[dict, list[Path]]:
    """The run's settings and saved estimates, with its checkpoint and data checked (in seconds)."""
    from .resnet import ResnetConfig, _check_inputs

    cfg_file = run_dir / "config.json"
    if not cfg_file.is_file():
        raise click.BadParameter(f"no config.json in {run_dir}: not a `setsens resnet` run", param_hint="--run")
    try:
        cfg = asdict(ResnetConfig(**json.loads(cfg_file.read_text())))
    except (ValueError, TypeError) as err:
        raise click.BadParameter(f"{cfg_file} is not a `setsens resnet` config ({type(err).__name__}: "
                                 f"{first_line(err)})", param_hint="--run") from None
    files = sorted((run_dir / "state").glob(f"estimate_{estimates}_*.pt"))
    if not files:
        raise click.BadParameter(f"no saved estimates 'state/estimate_{estimates}_*.pt' in {run_dir}",
                                 param_hint="--run")
    try:
        _check_inputs(cfg)
    except click.BadParameter as err:
        raise click.BadParameter(f"the run's {err.param_hint}: {err.message}", param_hint="--run") from None
    if n is not None and n > cfg["n"]:
        raise click.BadParameter(f"the run has {cfg['n']} images, cannot evaluate on {n}", param_hint="--n")
    return cfg, files


@click.command("landscape")
@click.option("--run", "run_dir", required=True, type=click.Path(path_type=Path),
              help="A `setsens resnet` run directory.")
@click.option("--estimates", default="seed", type=click.Choice(["seed", "table1"]), show_default=True,
              help="Which saved estimates to mark (the multi-start study or Table 1's).")
@click.option("--plane", default="estimate", type=click.Choice(["estimate", "filter"]), show_default=True)
@click.option("--grid", type=click.IntRange(2), default=11, show_default=True, help="Points per axis.")
@click.option("--range", "span", default="-0.5,1.5", show_default=True, help="α and β range (units of the directions).")
@click.option("--n", type=click.IntRange(1), default=None,
              help="Evaluate on the first n images only (default: the run's n).")
@click.option("--seed", type=click.IntRange(0), default=0, show_default=True)
@click.option("--out", default=None, help="Output directory (default: the run directory).")
@click.option("--progress/--no-progress", default=True, show_default=True)
def command(run_dir, estimates, plane, grid, span, n, seed, out, progress):
    """Contour and 3-D surface of the perturbed loss around w̄ with w̄ and the estimates marked."""
    from ..data.cifar import load_cifar10
    from ..landscape import landscape, plane_directions, plot_landscape
    from ..models.resnet import load_cifar_resnet
    from ..problem import Perturbation, Problem, cross_entropy
    from ..report import prepare_out_dir, save_figure, write_json

    span_t = number_list(span, "--range")
    if len(span_t) != 2 or not span_t[0] < span_t[1]:
        raise click.BadParameter(f"expected 'lo,hi' with lo < hi, got {span!r}", param_hint="--range")
    lo, hi = span_t
    cfg, files = _run_config(run_dir, estimates, n)
    out = prepare_out_dir(out) if out else run_dir
    dtype = getattr(torch, cfg["dtype"])
    model = load_cifar_resnet(cfg["checkpoint"], cfg["depth"]).to(cfg["device"], dtype)
    x, y = load_cifar10(cfg["data"], "train", n=cfg["n"], seed=cfg["subset_seed"], dtype=dtype)
    if n is not None:
        x, y = x[:n], y[:n]
    problem = Problem(model, cross_entropy, (x, y), batch_size=cfg["batch_size"], dtype=dtype, device=cfg["device"])
    saved = [torch.load(f, weights_only=False) for f in files]
    keep = saved[0]["indices"] < problem.n
    pert = Perturbation(saved[0]["indices"][keep], saved[0]["delta"][keep])
    wbar = problem.params
    marks = {"original": wbar} | {f.stem.replace("estimate_", ""): wbar + s["v"].to(wbar) for f, s in zip(files, saved)}
    first_est = marks[next(k for k in marks if k != "original")]
    d1, d2 = plane_directions(problem, first_est, torch.Generator().manual_seed(seed), kind=plane)
    axis = torch.linspace(lo, hi, grid).tolist()
    with Bars(enabled=progress, units={"landscape": "pt"}) as bars:
        ls = landscape(problem, d1, d2, axis, axis, perturbation=pert, marks=marks, kind=plane, progress=bars)
    write_json(out / "landscape.json", ls.to_dict())
    title = f"ResNet-{cfg['depth']}, {pert.indices.numel()} perturbed points ({plane} plane)"
    fc, fs = plot_landscape(ls, title)
    save_figure(fc, out / "landscape_contour.png")
    save_figure(fs, out / "landscape_surface.png")
    for k, (a, b, off, l) in ls.marks.items():
        click.echo(f"{k:16s} α={a:+.3f} β={b:+.3f} off-plane={off:.2e} loss={l:.4e}")
    click.echo(f"min loss on grid {ls.loss.min():.4e}, written to {out}/landscape_*.png", err=True)
