"""A user's own model, checkpoint, data and loss, from the specs ``setsens analyze`` takes.

* model: ``FILE.py:FUNCTION`` or ``package.module:FUNCTION``, a factory returning an ``nn.Module``.
* checkpoint: a state dict (``module.`` prefixes of DataParallel/DDP removed; a ``state_dict`` or
  ``model`` entry of a training checkpoint used, and within it the entries of one sub-module when exactly those fit
  the model: ``model.`` of a Lightning module, ``_orig_mod.`` of ``torch.compile``), or — only with
  ``trust=True``, since unpickling runs code — a whole pickled module.
* data: an ``.npz`` with arrays ``x``, ``y`` and optionally ``x_test``, ``y_test``; a folder in the
  ImageFolder layout (one sub-folder per class, read with Pillow; an optional ``test/`` beside
  ``train/``); or ``FILE.py:FUNCTION`` returning ``(x, y)``, ``(x, y, x_test, y_test)`` or a
  map-style ``Dataset`` of ``(x, y)`` pairs.
* loss: ``cross_entropy``, ``squared_error`` or ``FILE.py:FUNCTION`` (per-sample loss).

Every mistake raises ``ValueError`` with one line that names the spec.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from .problem import cross_entropy, squared_error

__all__ = ["Data", "load_callable", "load_model", "load_checkpoint", "load_data", "load_loss"]

LOSSES = {"cross_entropy": cross_entropy, "squared_error": squared_error}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


@dataclass
class Data:
    """Training ``(x, y)`` and optional held-out ``(x_test, y_test)`` as tensors."""

    x: Tensor
    y: Tensor
    x_test: Tensor | None = None
    y_test: Tensor | None = None

    @property
    def test(self) -> tuple[Tensor, Tensor] | None:
        return None if self.x_test is None else (self.x_test, self.y_test)


def load_callable(spec: str, what: str):
    """The object ``FUNCTION`` of ``FILE.py:FUNCTION`` or ``package.module:FUNCTION``."""
    source, sep, name = spec.rpartition(":")
    if not sep or not source or not name:
        raise ValueError(f"{what} spec {spec!r} must be FILE.py:FUNCTION or package.module:FUNCTION")
    if source.endswith(".py"):
        path = Path(source)
        if not path.is_file():
            raise ValueError(f"{what} file {source!r} does not exist")
        module_name = f"setsens_user_{path.stem}_{abs(hash(path.resolve()))}"
        module_spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[module_name] = module
        folder = str(path.resolve().parent)
        if folder not in sys.path:  # as when the file runs as a script: its siblings import
            sys.path.insert(0, folder)
        try:
            module_spec.loader.exec_module(module)
        except Exception as err:
            del sys.modules[module_name]
            raise ValueError(f"{what} file {source!r} failed to import: {type(err).__name__}: {err}") from err
    else:
        try:
            module = importlib.import_module(source)
        except ImportError as err:
            raise ValueError(f"{what} module {source!r} cannot be imported: {err}") from err
    if not hasattr(module, name):
        raise ValueError(f"{what} {source!r} has no attribute {name!r}")
    return getattr(module, name)


def load_model(spec: str) -> nn.Module:
    """Call the factory of ``spec``; it must return an ``nn.Module`` with parameters."""
    factory = load_callable(spec, "model")
    if not callable(factory):
        raise ValueError(f"model {spec!r} is not callable")
    model = factory()
    if not isinstance(model, nn.Module):
        raise ValueError(f"model factory {spec!r} returned {type(model).__name__}, not a torch.nn.Module")
    if next(iter(model.parameters()), None) is None:
        raise ValueError(f"model {spec!r} has no parameters")
    return model


def load_checkpoint(model: nn.Module | None, path: str | Path, trust: bool = False) -> nn.Module:
    """Load ``path`` into ``model`` (state dict) or, with ``trust``, return the pickled module it holds."""
    path = Path(path)
    if not path.is_file() or path.stat().st_size == 0:
        raise ValueError(f"checkpoint {str(path)!r} does not exist or is empty")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        if not trust:
            raise ValueError(f"checkpoint {str(path)!r} is not a plain state dict ({type(err).__name__}); if it is a "
                             "whole pickled module you trust, pass --trust-checkpoint") from err
        obj = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(obj, nn.Module):
        return obj
    if isinstance(obj, dict):
        for key in ("state_dict", "model_state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(f"checkpoint {str(path)!r} holds no state dict of tensors")
    if model is None:
        raise ValueError(f"checkpoint {str(path)!r} is a state dict: give --model to build the network")
    own = model.state_dict()
    state = _submodule_entries({k.removeprefix("module."): v for k, v in obj.items()}, own)
    for key in set(own) - set(state):  # batch-norm step counters, absent from checkpoints of older torch:
        if key.endswith("num_batches_tracked"):  # unused in evaluation, so they keep the model's value
            state[key] = own[key]
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = [k for k in own if k in state and own[k].shape != state[k].shape]
    if missing or unexpected or wrong:
        parts = [f"missing {missing[:3]}" if missing else "", f"unexpected {unexpected[:3]}" if unexpected else "",
                 f"shape mismatch at {wrong[:3]}" if wrong else ""]
        prefixed = next((k[: -len(o)] for k in unexpected for o in missing if k.endswith("." + o)), None)
        hint = (f"; its keys are the model's under {prefixed!r}: save that sub-module's state_dict(), or build the "
                "model that holds it" if prefixed else "")
        raise ValueError(f"checkpoint {str(path)!r} does not fit the model: " + "; ".join(p for p in parts if p)
                         + hint)
    model.load_state_dict(state)
    return model


def _fits(state: dict, own: dict) -> bool:
    needed = {k for k in own if not k.endswith("num_batches_tracked")}
    return needed <= set(state) <= set(own)


def _submodule_entries(state: dict, own: dict, depth: int = 3) -> dict:
    """``state`` itself if it fits the model's keys ``own``; else the entries under one prefix (``model.`` of a
    Lightning module, ``_orig_mod.`` of ``torch.compile``, nested up to ``depth`` levels) with the prefix removed,
    when exactly those fit; else ``state`` unchanged (the caller names what is missing)."""
    if _fits(state, own) or depth == 0:
        return state
    for head in sorted({k.split(".", 1)[0] for k in state if "." in k}):
        inner = {k[len(head) + 1:]: v for k, v in state.items() if k.startswith(head + ".")}
        found = _submodule_entries(inner, own, depth - 1)
        if _fits(found, own):
            return found
    return state


def _tensor(a) -> Tensor:
    t = torch.as_tensor(np.asarray(a))
    return t.float() if t.dtype == torch.float16 else t


def _from_npz(path: Path) -> Data:
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except Exception as err:
        raise ValueError(f"data {str(path)!r} is not a readable .npz file ({type(err).__name__})") from err
    if "x" not in arrays or "y" not in arrays:
        raise ValueError(f"data {str(path)!r} must hold arrays 'x' and 'y' (it has {sorted(arrays)})")
    if ("x_test" in arrays) != ("y_test" in arrays):
        raise ValueError(f"data {str(path)!r} has only one of 'x_test' and 'y_test'")
    test = (_tensor(arrays["x_test"]), _tensor(arrays["y_test"])) if "x_test" in arrays else (None, None)
    return Data(_tensor(arrays["x"]), _tensor(arrays["y"]), *test)


def _image_folder(root: Path) -> tuple[Tensor, Tensor]:
    from PIL import Image

    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    if not classes:
        raise ValueError(f"data folder {str(root)!r} has no class sub-folders (ImageFolder layout)")
    xs, ys = [], []
    for label, name in enumerate(classes):
        for f in sorted((root / name).iterdir()):
            if f.suffix.lower() in IMAGE_SUFFIXES:
                with Image.open(f) as img:
                    a = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
                xs.append(torch.from_numpy(a).permute(2, 0, 1))
                ys.append(label)
    if not xs:
        raise ValueError(f"data folder {str(root)!r} holds no images")
    if len({tuple(x.shape) for x in xs}) > 1:
        raise ValueError(f"images in {str(root)!r} differ in size: resize them to one size first")
    return torch.stack(xs), torch.tensor(ys)


def _from_callable(spec: str) -> Data:
    out = load_callable(spec, "data")
    out = out() if callable(out) else out
    if isinstance(out, torch.utils.data.Dataset) and not isinstance(out, (tuple, list)):
        try:
            pairs = [out[i] for i in range(len(out))]
        except Exception as err:
            raise ValueError(f"data {spec!r}: a map-style Dataset of (x, y) pairs is needed ({err})") from err
        out = (torch.stack([torch.as_tensor(p[0]) for p in pairs]), torch.as_tensor([p[1] for p in pairs]))
    if not isinstance(out, (tuple, list)) or len(out) not in (2, 4):
        raise ValueError(f"data {spec!r} must return (x, y), (x, y, x_test, y_test) or a Dataset")
    return Data(*(_tensor(a) for a in out))


def load_data(spec: str) -> Data:
    """Training (and held-out) data from ``spec`` (see the module doc), checked for consistency."""
    path = Path(spec)
    if spec.endswith(".npz"):
        if not path.is_file():
            raise ValueError(f"data file {spec!r} does not exist")
        data = _from_npz(path)
    elif path.is_dir():
        train = path / "train"
        data = Data(*_image_folder(train if train.is_dir() else path))
        if (path / "test").is_dir():
            data.x_test, data.y_test = _image_folder(path / "test")
    elif ":" in spec:
        data = _from_callable(spec)
    else:
        raise ValueError(f"data {spec!r} is neither an .npz file, an image folder nor FILE.py:FUNCTION")
    for x, y, part in ((data.x, data.y, "training"), (data.x_test, data.y_test, "held-out")):
        if x is None:
            continue
        if x.shape[0] != y.shape[0] or x.shape[0] == 0:
            raise ValueError(f"{part} data: {x.shape[0]} inputs but {y.shape[0]} targets")
        if x.is_floating_point() and not torch.isfinite(x).all():
            raise ValueError(f"{part} inputs contain NaN or Inf")
    if data.y_test is not None and (data.y_test.shape[1:] != data.y.shape[1:]
                                    or data.y_test.is_floating_point() != data.y.is_floating_point()):
        raise ValueError(f"held-out targets are {data.y_test.dtype} of shape {tuple(data.y_test.shape[1:])} per point, "
                         f"training targets {data.y.dtype} of shape {tuple(data.y.shape[1:])}: give both in one form")
    return data


def load_loss(spec: str):
    """A per-sample loss: a built-in name or ``FILE.py:FUNCTION``."""
    if spec in LOSSES:
        return LOSSES[spec]
    if ":" not in spec:
        raise ValueError(f"loss {spec!r} must be one of {sorted(LOSSES)} or FILE.py:FUNCTION")
    loss = load_callable(spec, "loss")
    if not callable(loss):
        raise ValueError(f"loss {spec!r} is not callable")
    return loss
