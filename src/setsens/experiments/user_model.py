"""A user's model, checkpoint, data and loss as command-line options, turned into a checked
:class:`~setsens.problem.Problem` (shared by ``setsens analyze`` and ``setsens audit``).

Everything is loaded and checked before any work starts: specs, checkpoint against the model,
data shapes against the model, labels against its outputs, the device.
"""

from __future__ import annotations

import click
import torch

from ..loading import load_checkpoint, load_data, load_loss, load_model
from ..problem import cross_entropy

DTYPES = {"float32": torch.float32, "float64": torch.float64}

OPTIONS = [
    click.option("--model", "model_spec", help="FILE.py:FUNCTION or package.module:FUNCTION returning an nn.Module."),
    click.option("--checkpoint", type=click.Path(dir_okay=False), help="State dict (or a trusted pickled module)."),
    click.option("--trust-checkpoint", is_flag=True, help="Allow unpickling a whole module (runs its code)."),
    click.option("--data", "data_spec", help=".npz (x, y[, x_test, y_test]), an image folder, or FILE.py:FUNCTION."),
    click.option("--loss", "loss_spec", default="cross_entropy", show_default=True,
                 help="cross_entropy, squared_error or FILE.py:FUNCTION (per-sample loss)."),
    click.option("--weight-decay", default=0.0, show_default=True, type=click.FloatRange(0),
                 help="λ of the (λ/2)‖w‖² term the model was trained with (part of the risk)."),
    click.option("--polish", default=0, show_default=True, type=click.IntRange(0),
                 help="First fine-tune w̄ with this many full-batch L-BFGS iterations (towards a stationary point)."),
    click.option("--device", default="cpu", show_default=True),
    click.option("--dtype", type=click.Choice(sorted(DTYPES)), help="Precision [default: the model's]."),
    click.option("--batch-size", default=256, show_default=True, type=click.IntRange(1)),
]


def model_options(command):
    """The options that name a user's model (``--model``, ``--checkpoint``, ``--data``, ``--loss``, …)."""
    for option in reversed(OPTIONS):
        command = option(command)
    return command


def _check_labels(problem, data) -> None:
    """Integer labels of a K-output model (a classifier) must lie in [0, K)."""
    x, _ = problem.points(torch.tensor([0]))
    out = problem.outputs(problem.params, x)
    if out.ndim != 2:
        return
    k = out.shape[1]
    for y, part in ((data.y, "training"), (data.y_test, "held-out")):
        if y is None or y.is_floating_point():
            continue
        if int(y.min()) < 0 or int(y.max()) >= k:
            raise click.BadParameter(f"{part} labels span [{int(y.min())}, {int(y.max())}] but the model has {k} "
                                     "outputs", param_hint="--data")


#: a polish that moves w̄ by more than this fraction of ‖w̄‖ is reported as a warning line
POLISH_MOVE_WARNING = 0.1


def _held_out(problem, test, weights: dict) -> dict:
    """Mean loss on the held-out ``test = (x, y)`` at each of ``weights`` (and accuracy when ``y`` are class labels
    of a classifier): ``{"loss_<name>": …, "accuracy_<name>": …}``."""
    from ..analysis import outputs_on
    from ..problem import Problem

    held = Problem(problem.model, problem.loss, test, problem.params, batch_size=problem.batch_size or 256,
                   device=problem.device, dtype=problem.dtype)
    record = {}
    for name, w in weights.items():
        record[f"loss_{name}"] = held.risk(w)
        out = outputs_on(problem, w, test[0])
        if out.ndim == 2 and out.shape[1] > 1 and not test[1].is_floating_point():
            record[f"accuracy_{name}"] = float((out.argmax(1).cpu() == test[1]).double().mean())
    return record


def _polish(problem, iterations: int, test, log):
    """w̄ fine-tuned by L-BFGS on the training risk, and what it took and changed: the move against ‖w̄‖, the
    training risk, and the held-out loss and accuracy (``test``, or None).  The analysis is then of the polished
    weights, so a large move (over :data:`POLISH_MOVE_WARNING` of ‖w̄‖) is a warning line."""
    from ..retrain import retrain

    before = float(problem.gradient().norm())
    log(f"polish: L-BFGS, at most {iterations} iterations from ‖∇L‖ = {before:.3g}…")
    fit = retrain(problem, gtol=0.0, max_iter=iterations)
    norm = float(problem.params.norm())
    record = {"iterations": fit.iterations, "grad_norm_before": before, "grad_norm_after": fit.grad_norm,
              "risk_before": problem.risk(), "risk_after": fit.risk, "weights_moved": fit.distance,
              "weights_norm": norm, "relative_move": fit.distance / max(norm, 1e-30)}
    if test is not None:
        record["held_out"] = _held_out(problem, test, {"before": problem.params, "after": fit.w})
    log("polish: " + polish_summary(record))
    if record["relative_move"] > POLISH_MOVE_WARNING:
        log(f"warning: the polish moved w̄ by {record['relative_move']:.0%} of ‖w̄‖ (over "
            f"{POLISH_MOVE_WARNING:.0%}): the analysis is of a different model than the one trained; polish less, or "
            "give the --weight-decay that matches the training (README: Which --weight-decay)")
    return fit.w, record


def polish_summary(record: dict) -> str:
    """One line: what the polish did to w̄ (for the log and the reports of ``analyze`` and ``audit``)."""
    line = (f"{record['iterations']} L-BFGS iterations, ‖∇L‖ {record['grad_norm_before']:.3g} → "
            f"{record['grad_norm_after']:.3g}; w̄ moved {record['weights_moved']:.3g} = "
            f"{record['relative_move']:.2%} of ‖w̄‖ = {record['weights_norm']:.3g}; training risk "
            f"{record['risk_before']:.4g} → {record['risk_after']:.4g}")
    held = record.get("held_out")
    if held:
        line += f"; held-out loss {held['loss_before']:.4g} → {held['loss_after']:.4g}"
        if "accuracy_before" in held:
            line += f", accuracy {held['accuracy_before']:.4f} → {held['accuracy_after']:.4f}"
    return line


def load_problem(model_spec, checkpoint, trust_checkpoint, data_spec, loss_spec, weight_decay, polish, device,
                 dtype, batch_size, log=click.echo, check=None):
    """The checked problem, the data (with any held-out part) and the polish record (or None); ``check(problem,
    data)``, the caller's own checks, runs before the polish (the first work)."""
    from ..problem import Problem

    if model_spec is None and checkpoint is None:
        raise click.UsageError("give --model (and usually --checkpoint)")
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as err:
        raise click.BadParameter(f"device {device!r} is not available ({err})", param_hint="--device") from None
    model = load_model(model_spec) if model_spec else None
    if checkpoint:
        model = load_checkpoint(model, checkpoint, trust=trust_checkpoint)
    loss = load_loss(loss_spec)
    data = load_data(data_spec)
    if loss is cross_entropy and data.y.is_floating_point() and data.y.ndim == 1:
        raise click.BadParameter(f"the targets are real numbers ({data.y.dtype}) but the loss is cross_entropy "
                                 "(integer class labels): pass --loss squared_error",
                                 param_hint="--loss")

    def problem_at(params=None):
        return Problem(model, loss, (data.x, data.y), params, batch_size=batch_size, device=device,
                       dtype=DTYPES[dtype] if dtype else None, weight_decay=weight_decay)

    problem = problem_at()
    _check_labels(problem, data)
    if check is not None:
        check(problem, data)
    polished = None
    if polish:
        w, polished = _polish(problem, polish, data.test, log)
        problem = problem_at(w)
    return problem, data, polished
