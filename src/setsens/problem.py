"""A trained model, its per-sample loss, its training data and its weights w̄ as pure functions.

Everything downstream (operators, solvers, retraining) sees the network only through
:class:`Problem`: a flat weight vector ``w`` of length ``p`` and the per-sample loss
``ℓ(x_i, y_i, w)``.  The empirical risk is ``L(x, w) = Σ_i c ℓ(x_i, y_i, w) + (λ/2)‖w‖²`` with ``c = 1/n``
(``reduction="mean"``, the default) or ``c = 1`` (``reduction="sum"``, the paper's toy example), and
weight decay λ (default 0; a model trained with weight decay is stationary only with it).

Data are held either as tensors or as a DataLoader that yields ``(x, y)`` batches in a fixed
order (a shuffling loader is rejected); either way risks and derivatives are accumulated batch by
batch, so memory does not grow with ``n``.  Buffers (BatchNorm running statistics) are fixed: the
model is evaluated in ``eval`` mode and the risk is a function of ``w`` alone; the caller's model
keeps its own mode.

A problem may hold only some rows of the data (:class:`~setsens.distributed.DistributedProblem`):
``rows`` says which (all of them here), indices are always global, and every sum over the data
passes through :meth:`Problem.reduce` (the identity here, an all-reduce there), so the operators and
``estimate`` run unchanged on a sharded problem.

The loss declares two properties the estimators depend on (attributes of the loss function, or
detected numerically on the first batch when absent): ``ignores_output_shift`` (a common shift of
the outputs changes nothing: cross-entropy) and ``is_squared_error``.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Mapping
from functools import cached_property
import warnings
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

__all__ = [
    "Problem",
    "Perturbation",
    "cross_entropy",
    "squared_error",
    "NotStationaryWarning",
]

LossFn = Callable[[Tensor, Tensor], Tensor]


def cross_entropy(outputs: Tensor, targets: Tensor) -> Tensor:
    """Per-sample cross-entropy of logits ``outputs`` (b, K) against class indices (b,)."""
    return nn.functional.cross_entropy(outputs, targets, reduction="none")


cross_entropy.ignores_output_shift = True  # softmax: a common shift of the logits changes nothing
cross_entropy.is_squared_error = False


def center_classes(u: Tensor, dim: int = -1) -> Tensor:
    """Centre over the classes along ``dim`` (``P = I − 𝟙𝟙ᵀ/K``): what a softmax loss sees of the outputs."""
    return u - u.mean(dim=dim, keepdim=True)


def _without_ones(shape) -> list[int]:
    return [d for d in shape[1:] if d != 1]


def regression_targets(outputs: Tensor, targets: Tensor) -> Tensor:
    """Targets as real values in ``outputs``' dtype and shape; integer class labels become one-hot rows, a target
    shape that differs from the outputs' only by dimensions of size 1 (``(n,)`` against ``(n, 1)``) is reshaped, and
    any other mismatch is refused: it would broadcast every point's output against every point's target."""
    if targets.dtype in (torch.int64, torch.int32) and outputs.ndim == 2:  # one-hot out of place: vmaps
        targets = targets.long()[:, None] == torch.arange(outputs.shape[1], device=outputs.device)
    if targets.shape != outputs.shape:
        if targets.shape[:1] != outputs.shape[:1] or _without_ones(targets.shape) != _without_ones(outputs.shape):
            raise ValueError(f"targets of shape {tuple(targets.shape[1:])} per point do not match outputs of shape "
                             f"{tuple(outputs.shape[1:])}: pass one target of the outputs' shape per point")
        targets = targets.reshape(outputs.shape)
    return targets.to(outputs.dtype)


def squared_error(outputs: Tensor, targets: Tensor) -> Tensor:
    """Per-sample ``½‖f(x) − y‖²``; integer targets are one-hot encoded to ``outputs``' width."""
    diff = (outputs - regression_targets(outputs, targets)).reshape(outputs.shape[0], -1)
    return 0.5 * (diff**2).sum(dim=1)


squared_error.ignores_output_shift = False
squared_error.is_squared_error = True


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    """Evaluate ``model`` in eval mode and give it back in the mode the caller left it in."""
    modes = [m.training for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, mode in zip(model.modules(), modes):
            m.training = mode


@contextlib.contextmanager
def _differentiable_kernels():
    """Attention through its math kernel, not the fused ones (the transformer fast path and flash
    attention on the CPU have no forward-mode derivative); the caller's setting comes back."""
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


_DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _as_dtype(dtype) -> torch.dtype | None:
    """``dtype`` as a floating torch dtype (its name as a string accepted); None stays None."""
    if isinstance(dtype, str):
        if dtype.removeprefix("torch.") not in _DTYPES:
            raise ValueError(f"dtype {dtype!r} is not a dtype setsens computes in: pass one of {', '.join(_DTYPES)}")
        return _DTYPES[dtype.removeprefix("torch.")]
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch dtype or one of {', '.join(_DTYPES)}, got {dtype!r}")
    if dtype is not None and not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating dtype (w and the inputs are real), got {dtype}: pass torch.float64")
    return dtype


def _as_device(device) -> torch.device | None:
    """``device`` as a torch device that is available here; None stays None."""
    if device is None:
        return None
    try:
        device = torch.device(device)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError, TypeError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"device {str(device)!r} is not available here ({reason}): pass device='cpu' "
                         "or one torch reports available") from None
    return device


def _describe(obj) -> str:
    if isinstance(obj, (tuple, list)):
        return f"a {type(obj).__name__} of length {len(obj)}"
    return f"a {type(obj).__name__}"


def _as_data_tensor(t, name: str) -> Tensor:
    """One half of an ``(inputs, targets)`` pair as a tensor with a leading dimension of points."""
    try:
        t = torch.as_tensor(t)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"data: {name} is {_describe(t)}: pass (inputs, targets) tensors or a DataLoader") from None
    if t.ndim == 0:
        raise ValueError(f"data: {name} is a scalar: pass one row per training point")
    return t


def _data_kind(data) -> str:
    """``"tensors"`` for an ``(inputs, targets)`` pair, ``"loader"`` for an iterable of batches (a DataLoader, a
    list of pairs); anything else is refused before any work."""
    if isinstance(data, torch.utils.data.Dataset):
        raise TypeError("data is a Dataset: wrap it in DataLoader(dataset, batch_size=…, shuffle=False)")
    if isinstance(data, (tuple, list)):
        if len(data) == 2:
            return "tensors"
        if data and all(isinstance(b, (tuple, list)) and len(b) == 2 for b in data):
            return "loader"
    elif not isinstance(data, (Tensor, Mapping, str, bytes)) and hasattr(data, "__iter__"):
        return "loader"
    raise TypeError(f"data is {_describe(data)}: pass (inputs, targets) tensors or a DataLoader yielding them")


def _check_batch(batch) -> None:
    """A loader's batch must be an ``(inputs, targets)`` pair of tensors."""
    if isinstance(batch, Mapping):
        raise TypeError(f"data: the DataLoader's batches are dicts (keys {list(batch)[:4]}): make it yield "
                        "(inputs, targets) tuples, e.g. with a collate_fn")
    if not (isinstance(batch, (tuple, list)) and len(batch) == 2 and all(isinstance(t, Tensor) for t in batch)):
        raise TypeError(f"data: the DataLoader's batches are {_describe(batch)}: make it yield (inputs, targets) "
                        "tensor pairs")


def _check_finite(inputs: Tensor, targets: Tensor, where: str = "") -> None:
    if inputs.is_floating_point() and not torch.isfinite(inputs).all():
        raise ValueError(f"training inputs contain NaN or Inf{where}")
    if targets.is_floating_point() and not torch.isfinite(targets).all():
        raise ValueError(f"training targets contain NaN or Inf{where}: drop or fill those points")


class NotStationaryWarning(UserWarning):
    """w̄ is not (close to) a stationary point of the risk: first-order theory may not apply."""


@dataclass(frozen=True)
class Perturbation:
    """Δx supported on the training points ``indices``: point ``indices[j]`` moves by ``delta[j]``."""

    indices: Tensor
    delta: Tensor

    def __post_init__(self):
        if not isinstance(self.delta, Tensor):
            raise TypeError(f"perturbation delta must be a tensor (one row per index), got {_describe(self.delta)}")
        if self.delta.ndim == 0 or not self.delta.is_floating_point():
            raise ValueError(f"perturbation delta must be a floating tensor with one row per index, got "
                             f"{self.delta.dtype} of shape {tuple(self.delta.shape)}")
        idx = torch.as_tensor(self.indices)
        if idx.is_floating_point() or idx.is_complex() or idx.dtype == torch.bool:
            raise TypeError(f"perturbation indices must be integers, got {idx.dtype}")
        idx = idx.long().reshape(-1)
        object.__setattr__(self, "indices", idx)
        if self.delta.shape[0] != idx.numel():
            raise ValueError(
                f"perturbation has {idx.numel()} indices but delta has {self.delta.shape[0]} rows"
            )
        if idx.unique().numel() != idx.numel():
            raise ValueError("perturbation indices must be distinct")
        if not torch.isfinite(self.delta).all():
            raise ValueError("perturbation delta contains NaN or Inf")

    def norm(self) -> float:
        """‖Δx‖ (Euclidean norm over all perturbed points together)."""
        return float(self.delta.double().norm())

    def scaled(self, factor: float) -> "Perturbation":
        return Perturbation(self.indices, self.delta * factor)


class Problem:
    """The risk ``L(x, w)`` of ``model`` with per-sample ``loss`` on ``data``, at weights w̄.

    Args:
        model: any ``nn.Module``; its current parameters are w̄ unless ``params`` is given.
        loss: per-sample loss ``loss(outputs, targets) -> (b,)``.
        data: ``(inputs, targets)`` tensors, or a DataLoader yielding them in a fixed order (not a Dataset,
            not dict batches).  Integer targets shaped as class labels must lie in ``[0, K)``, K the output width.
        params: optional flat w̄ (length ``p``); defaults to the model's parameters.
        batch_size: batch size for tensor data (ignored for a DataLoader).
        dtype, device: where and in which precision w and the data live (default: the model's); ``dtype`` a
            floating torch dtype or its name (``"float64"``), ``device`` one available here.
        reduction: ``"mean"`` (``L = (1/n) Σ ℓ_i``) or ``"sum"``.
        weight_decay: λ ≥ 0 of the term ``(λ/2)‖w‖²`` (shared out over the batches of a pass).
    """

    def __init__(
        self,
        model: nn.Module,
        loss: LossFn,
        data,
        params: Tensor | None = None,
        *,
        batch_size: int = 256,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        reduction: str = "mean",
        weight_decay: float = 0.0,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model is {_describe(model)}: pass a torch.nn.Module")
        if not callable(loss):
            raise TypeError(f"loss is {_describe(loss)}: pass a per-sample loss(outputs, targets) -> (b,)")
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        if not weight_decay >= 0:
            raise ValueError(f"weight_decay must be ≥ 0, got {weight_decay}")
        self.weight_decay = float(weight_decay)
        dtype, device = _as_dtype(dtype), _as_device(device)
        first = next(iter(model.parameters()), None)
        if first is None:
            raise ValueError("the model has no parameters")
        kind = _data_kind(data)
        self.dtype = dtype or first.dtype
        self.device = device or first.device
        self.model = model
        self.loss = loss
        self.reduction = reduction
        self.names = [name for name, _ in model.named_parameters()]
        self.shapes = [tuple(t.shape) for _, t in model.named_parameters()]
        self.sizes = [math.prod(s) for s in self.shapes]
        self.p = sum(self.sizes)
        self.buffers = {
            k: (b.to(self.device, self.dtype) if b.is_floating_point() else b.to(self.device))
            for k, b in model.named_buffers()
        }
        if params is None:
            params = torch.cat([t.detach().reshape(-1) for t in model.parameters()])
        params = torch.as_tensor(params)
        if params.shape != (self.p,):
            raise ValueError(f"params must be a flat vector of length p={self.p}, got {tuple(params.shape)}")
        self.params = params.detach().to(self.device, self.dtype).clone()
        if not torch.isfinite(self.params).all():
            raise ValueError("the weights w̄ contain NaN or Inf")

        if kind == "tensors":
            inputs, targets = (_as_data_tensor(t, name) for t, name in zip(data, ("inputs", "targets")))
            if inputs.shape[0] != targets.shape[0]:
                raise ValueError(
                    f"inputs have {inputs.shape[0]} rows but targets have {targets.shape[0]}"
                )
            _check_finite(inputs, targets)
            self.inputs, self.targets, self.loader = inputs, targets, None
            self.n = inputs.shape[0]
            self.batch_size = int(batch_size)
            if self.n == 0:
                raise ValueError("the training data are empty")
        else:
            if isinstance(getattr(data, "sampler", None), torch.utils.data.RandomSampler):
                raise ValueError("the DataLoader shuffles: pass shuffle=False (risks and J Δx need a fixed order)")
            self.inputs = self.targets = None
            self.loader = data
            self.batch_size = None
            batch = next(iter(data), None)
            if batch is None:
                raise ValueError("the training data are empty")
            _check_batch(batch)
            _check_finite(*batch, " (in the DataLoader's first batch)")
        self.input_shape = tuple(self._first_batch()[0].shape[1:])
        self.column_targets = False  # set by the check below: real targets (n,) of a one-output model read as (n, 1)
        self._check_model_accepts_data()  # one forward on the first batch, before any pass over the data
        if self.loader is not None:
            self.n = sum(int(x.shape[0]) for x, _ in self.loader)
            if not torch.equal(self._first_batch()[1], self._first_batch()[1]):
                raise ValueError("the DataLoader yields its data in a different order each time: fix the order")
        self.rows = range(self.n)  # the global rows held here: all of them
        self.loss_ignores_output_shift = self._loss_property("ignores_output_shift", self._detect_shift_invariance)
        self.loss_is_squared_error = self._loss_property("is_squared_error", self._detect_squared_error)

    def with_dtype(self, dtype: torch.dtype) -> "Problem":
        """The same problem (model, data, w̄, rows) computed in ``dtype`` (a shallow copy; the data are cast batch
        by batch as always)."""
        other = copy.copy(self)
        other.dtype = dtype
        other.params = self.params.to(dtype)
        other.buffers = {k: (b.to(dtype) if b.is_floating_point() else b) for k, b in self.buffers.items()}
        return other

    # -- parameters ---------------------------------------------------------------------------
    def unflatten(self, w: Tensor) -> dict[str, Tensor]:
        """Flat vector → ``{name: tensor}`` as ``functional_call`` expects."""
        return {n: t.view(s) for n, t, s in zip(self.names, torch.split(w, self.sizes), self.shapes)}

    def flatten(self, tensors: Iterable[Tensor]) -> Tensor:
        return torch.cat([t.reshape(-1) for t in tensors])

    def blocks(self) -> list[tuple[str, slice]]:
        """``(parameter name, slice of the flat vector)`` for each parameter tensor."""
        out, start = [], 0
        for name, size in zip(self.names, self.sizes):
            out.append((name, slice(start, start + size)))
            start += size
        return out

    def load_into(self, model: nn.Module, w: Tensor) -> nn.Module:
        """Write flat weights ``w`` into ``model`` (in place) and return it."""
        with torch.no_grad():
            for t, v in zip(model.parameters(), torch.split(w, self.sizes)):
                t.copy_(v.view_as(t).to(t))
        return model

    # -- data ---------------------------------------------------------------------------------
    @property
    def weight(self) -> float:
        """The factor ``c`` in ``L = Σ_i c ℓ_i``."""
        return 1.0 / self.n if self.reduction == "mean" else 1.0

    def reduce(self, total):
        """The sum over all rows of a sum over the rows held here (a tensor or a float): itself."""
        return total

    def holds(self, indices) -> Tensor:
        """Which of the (global) ``indices`` are rows held here, a boolean mask."""
        idx = torch.as_tensor(indices).long().reshape(-1).cpu()
        return (idx >= self.rows.start) & (idx < self.rows.stop)

    def localize(self, perturbation: Perturbation | None) -> Perturbation | None:
        """The part of ``perturbation`` on the rows held here, indexed from the first of them
        (None if none)."""
        if perturbation is None:
            return None
        mine = self.holds(perturbation.indices)
        if self.rows.start == 0 and mine.all():
            return perturbation
        if not mine.any():
            return None
        delta = perturbation.delta[mine.to(perturbation.delta.device)]
        return Perturbation(perturbation.indices[mine] - self.rows.start, delta)

    def _cast(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        x = x.to(self.device)
        if x.is_floating_point():
            x = x.to(self.dtype)
        y = y.to(self.device)
        if y.is_floating_point():
            y = y.to(self.dtype)
        if self.column_targets:
            y = y.reshape(-1, 1)
        return x, y

    def _raw_batches(self) -> Iterator[tuple[Tensor, Tensor]]:
        if self.loader is None:
            for s in range(0, len(self.inputs), self.batch_size):
                yield self.inputs[s : s + self.batch_size], self.targets[s : s + self.batch_size]
        else:
            for x, y in self.loader:
                yield x, y

    def _first_batch(self):
        return next(iter(self._raw_batches()))

    def displaced_batches(self, perturbation: Perturbation | None = None
                          ) -> Iterator[tuple[Tensor, Tensor, Tensor | None]]:
        """Batches of the rows held here, ``(x, y, D)`` in order, on device and in dtype: clean inputs, targets
        and Δx placed on the batch's moved rows (``perturbation`` globally indexed; None where none moved)."""
        perturbation = self.localize(perturbation)
        start = 0
        for x, y in self._raw_batches():
            x, y = self._cast(x, y)
            d = None
            if perturbation is not None:
                idx = perturbation.indices.to(self.device)
                inside = (idx >= start) & (idx < start + x.shape[0])
                if inside.any():
                    d = torch.zeros_like(x)
                    d[idx[inside] - start] = perturbation.delta.to(x)[inside]
            start += x.shape[0]
            yield x, y, d

    def batches(self, perturbation: Perturbation | None = None) -> Iterator[tuple[Tensor, Tensor]]:
        """Batches of the rows held here, ``(x, y)`` in order, on device and in dtype, with
        ``perturbation`` (globally indexed) applied."""
        for x, y, d in self.displaced_batches(perturbation):
            yield (x if d is None else x + d), y

    def points(self, indices: Tensor) -> tuple[Tensor, Tensor]:
        """The training points ``indices`` (held here) as ``(x, y)`` on device and in dtype."""
        idx = self.check_indices(indices)
        if not self.holds(idx).all():
            raise IndexError(f"training points {idx[~self.holds(idx)].tolist()[:5]} are not held by this process")
        idx = idx - self.rows.start
        if self.loader is None:
            return self._cast(self.inputs[idx], self.targets[idx])
        xs, ys = [None] * idx.numel(), [None] * idx.numel()
        pos = {int(i): j for j, i in enumerate(idx)}
        start = 0
        for x, y in self._raw_batches():
            for i in range(start, start + x.shape[0]):
                if i in pos:
                    xs[pos[i]], ys[pos[i]] = x[i - start], y[i - start]
            start += x.shape[0]
        return self._cast(torch.stack(xs), torch.stack(ys))

    def check_indices(self, indices) -> Tensor:
        idx = torch.as_tensor(indices).long().reshape(-1).cpu()  # index lists live on the CPU
        if idx.numel() == 0:
            raise ValueError("no training points selected")
        bad = idx[(idx < 0) | (idx >= self.n)]
        if bad.numel():
            raise IndexError(f"training point indices {bad.tolist()[:5]} out of range [0, {self.n})")
        return idx

    def check_perturbation(self, perturbation: Perturbation) -> Perturbation:
        """Validate indices, shape and size of Δx against the data; returns it unchanged."""
        self.check_indices(perturbation.indices)
        if tuple(perturbation.delta.shape[1:]) != self.input_shape:
            raise ValueError(
                f"perturbation delta has point shape {tuple(perturbation.delta.shape[1:])}, "
                f"the data have {self.input_shape}"
            )
        if perturbation.norm() == 0.0:
            raise ValueError("the perturbation Δx is zero: there is nothing to analyse")
        return perturbation

    def _check_model_accepts_data(self):
        """The model on two points of the first batch returns a tensor, the targets' class labels (all of them for
        tensor data, the first batch's for a loader) lie within its output width, the loss gives one value each, and
        each point's loss is its own: targets that broadcast against the outputs would mix the points.  Real targets
        of shape (n,) that mix the points of a one-output model are read as (n, 1) when that cures it
        (:attr:`column_targets`); anything else that mixes them is refused."""
        x, labels = self._cast(*self._first_batch())
        x, y = x[:2], labels[:2]
        try:
            out = self.outputs(self.params, x)
            if not isinstance(out, Tensor):
                kind = (f"dict (keys {list(out)[:4]})" if isinstance(out, Mapping)
                        else "tuple" if isinstance(out, tuple) else type(out).__name__)
                raise TypeError(f"the model returned a {kind}: pass a model whose forward returns the output tensor, "
                                "or wrap it")
            self._check_labels(labels if self.targets is None else self.targets, out)
            if y.is_floating_point() and self.loss is cross_entropy and y.ndim == out.ndim - 1:
                raise ValueError(f"the targets are real numbers ({y.dtype}) but cross_entropy takes integer class "
                                 "labels: for regression targets use the loss squared_error")
            with torch.no_grad():
                losses, mixed = self._point_losses(out, y)
                if mixed and y.is_floating_point() and y.ndim == 1 and out.shape[1:] == (1,):
                    column = self._point_losses(out, y[:, None])
                    if column[0].shape == losses.shape and not column[1]:
                        self.column_targets, y, (losses, mixed) = True, y[:, None], column
        except RuntimeError as err:
            raise ValueError(
                f"the model cannot be applied to inputs of shape {tuple(x.shape[1:])} "
                f"with targets of shape {tuple(y.shape[1:])}: {err}"
            ) from err
        if losses.shape != (x.shape[0],):
            raise ValueError(
                f"the loss must return one value per sample, shape ({x.shape[0]},), got {tuple(losses.shape)}"
            )
        if mixed:
            raise ValueError(f"a point's loss depends on the other points of its batch: targets of shape "
                             f"{tuple(y.shape[1:])} per point broadcast against outputs of shape "
                             f"{tuple(out.shape[1:])}; pass one target of the outputs' shape per point")

    def _point_losses(self, out: Tensor, y: Tensor) -> tuple[Tensor, bool]:
        """The loss of each point of a batch, and whether it differs from the point's loss alone."""
        losses = self.loss(out, y)
        if losses.shape != (out.shape[0],):
            return losses, False
        alone = torch.cat([self.loss(out[i : i + 1], y[i : i + 1]).reshape(-1) for i in range(out.shape[0])])
        return losses, not torch.allclose(alone, losses, rtol=1e-4, atol=1e-6 * float(losses.abs().max()))

    def _check_labels(self, targets: Tensor, out: Tensor) -> None:
        """Integer targets shaped as class labels of ``out`` (one fewer dimension) lie in ``[0, K)``, K = ``out``'s
        dimension 1 (with one output and a loss other than :func:`squared_error` they are not class indices)."""
        if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
            return
        if out.ndim < 2 or targets.ndim != out.ndim - 1 or (out.shape[1] == 1 and self.loss is not squared_error):
            return
        k = out.shape[1]
        bad = ((targets < 0) | (targets >= k)).reshape(targets.shape[0], -1).any(dim=1)
        if bad.any():
            i = int(bad.nonzero()[0])
            row = targets[i].reshape(-1)
            raise ValueError(f"targets: class labels must lie in [0, {k}) (the model's output width), point {i} has "
                             f"{row[(row < 0) | (row >= k)][:3].tolist()}: pass labels 0 … {k - 1} or a model with "
                             "more outputs")

    def _loss_property(self, name: str, detect) -> bool:
        declared = getattr(self.loss, name, None)
        return bool(declared) if declared is not None else detect()

    @cached_property
    def _probe(self) -> tuple[Tensor, Tensor]:
        """Outputs at w̄ on four training points, randomly displaced, with their targets (one forward
        pass, shared by the loss-property detectors)."""
        x, y = self._cast(*self._first_batch())
        with torch.no_grad():
            out = self.outputs(self.params, x[:4])
        g = torch.Generator().manual_seed(0)
        return out + torch.randn(out.shape, generator=g, dtype=torch.float64).to(out), y[:4]

    def _detect_shift_invariance(self) -> bool:
        out, y = self._probe
        if out.ndim < 2:
            return False
        with torch.no_grad():
            a, b = self.loss(out, y), self.loss(out + 0.7, y)
        return bool(torch.allclose(a, b, rtol=1e-5, atol=1e-6))

    def _detect_squared_error(self) -> bool:
        out, y = self._probe
        try:
            with torch.no_grad():
                return bool(torch.allclose(self.loss(out, y), squared_error(out, y), rtol=1e-5, atol=1e-7))
        except Exception:  # targets a squared error cannot take: not one
            return False

    # -- the risk as a pure function of w -------------------------------------------------------
    def outputs(self, w: Tensor, x: Tensor) -> Tensor:
        """``f(x, w)`` for a batch in eval mode, buffers fixed: pure in ``w`` and ``x`` (torch.func-safe)."""
        with _eval_mode(self.model), _differentiable_kernels():
            return functional_call(self.model, (self.unflatten(w), self.buffers), (x,))

    def as_loss_sees(self, out: Tensor) -> Tensor:
        """Outputs flat per point, as the loss sees them: centred over the classes when it ignores a common shift
        (softmax), where a common shift of the logits is no change at all."""
        out = out.reshape(out.shape[0], -1)
        return center_classes(out) if self.loss_ignores_output_shift else out

    def per_sample_loss(self, w: Tensor, x: Tensor, y: Tensor) -> Tensor:
        """``ℓ(x_i, y_i, w)`` for a batch, shape (b,): pure in ``w`` and ``x`` (torch.func-safe)."""
        return self.loss(self.outputs(w, x), y)

    def batch_risk(self, w: Tensor, x: Tensor, y: Tensor) -> Tensor:
        """``Σ_{i in batch} c ℓ_i`` (+ the batch's share ``b/n`` of ``(λ/2)‖w‖²``) — its contribution to ``L``."""
        risk = self.per_sample_loss(w, x, y).sum() * self.weight
        if self.weight_decay:
            risk = risk + 0.5 * self.weight_decay * (w * w).sum() * (x.shape[0] / self.n)
        return risk

    def risk(self, w: Tensor | None = None, perturbation: Perturbation | None = None) -> float:
        """``L(x, w)`` (on the perturbed data if given); costs one forward pass over the data."""
        w = self.params if w is None else w
        with torch.no_grad():
            total = sum(float(self.batch_risk(w, x, y)) for x, y in self.batches(perturbation))
        return self.reduce(total)

    def gradient(self, w: Tensor | None = None, perturbation: Perturbation | None = None) -> Tensor:
        """``∇_w L(x, w)``; costs one forward and backward pass over the data."""
        w = self.params if w is None else w
        g = torch.zeros_like(w)
        grad = torch.func.grad(self.batch_risk)
        for x, y in self.batches(perturbation):
            g += grad(w, x, y)
        return self.reduce(g)

    def loss_on(self, indices, w: Tensor | None = None, perturbation: Perturbation | None = None) -> float:
        """Mean per-sample loss on the training points ``indices`` (perturbed if given).

        Each point's loss is computed where the point is held and the losses are summed through
        :meth:`reduce` (on a sharded problem every process must call this; all get the same value).
        """
        w = self.params if w is None else w
        idx = self.check_indices(indices)

        def losses(x, y, mine):
            if perturbation is not None:
                where = {int(i): j for j, i in enumerate(perturbation.indices)}
                x = x.clone()
                for r, i in enumerate(idx[mine].tolist()):
                    if i in where:
                        x[r] += perturbation.delta[where[i]].to(x)
            with torch.no_grad():
                return self.per_sample_loss(w, x, y)

        return float(self.per_point(idx, losses).mean())

    def per_point(self, indices: Tensor, rows, shape: tuple = ()) -> Tensor:
        """``(|indices|, *shape)``: ``rows(x, y, mine)`` for the indexed points held here (``x, y`` their
        data, ``mine`` the mask of them among ``indices``), zeros for the others, summed through
        :meth:`reduce`: each point is computed where it is held, and every process gets the same tensor."""
        mine = self.holds(indices)
        out = torch.zeros((len(mine), *shape), dtype=self.dtype, device=self.device)
        if mine.any():
            x, y = self.points(indices[mine])
            out[mine.to(out.device)] = rows(x, y, mine).to(out)
        return self.reduce(out)

    def stationarity(self, w: Tensor | None = None, reference: float | None = None, rtol: float = 0.1,
                     warn: bool = True) -> dict:
        """Is w stationary at the scale that matters?  ``‖∇L‖`` relative to ``reference``.

        Pass ``reference = ‖J Δx‖`` (the change of ∇L the perturbation causes): a ratio near 1 means
        the first-order estimate answers the gradient that is already there, not the perturbation.
        Without a reference the ratio is taken against ``‖w‖`` (a weaker check).  Warns past ``rtol``.
        """
        w = self.params if w is None else w
        g = float(self.gradient(w).norm())
        scale = float(w.norm()) if reference is None else reference
        rel = g / max(scale, 1e-30)
        if warn and rel > rtol:
            against = "‖w‖" if reference is None else "‖J Δx‖"
            warnings.warn(
                f"w̄ is not a stationary point: ‖∇L‖ = {g:.3e} is {rel:.2e} of {against} (> {rtol:g}); "
                "first-order set estimates assume ∇L(x̄, w̄) = 0 — continuing",
                NotStationaryWarning,
                stacklevel=2,
            )
        return {"grad_norm": g, "relative_grad_norm": rel, "risk": self.risk(w)}
