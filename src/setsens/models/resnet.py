"""The CIFAR ResNet family of He et al. (2016, section 4.2) with option-A shortcuts.

Depth ``6k + 2`` (20, 32, 44, 56, 110, …): a 3×3 stem with 16 channels, three stages of ``k``
basic blocks with 16/32/64 channels (stride 2 at the start of stages 2 and 3), global average
pooling and a linear 64→10 head.  Option-A shortcuts subsample by 2 and zero-pad the new channels,
so they carry no parameters.  Parameters are named ``conv1``, ``bn1``, ``layer{1,2,3}.{block}.conv{1,2}``,
``layer{1,2,3}.{block}.bn{1,2}`` and ``linear``; :func:`load_cifar_resnet` reads state dicts with these names,
also when saved from ``DataParallel`` (``module.`` prefixes).  ResNet-56 has 853,018 parameters.

The network takes RGB images in [0, 1]; the per-channel normalisation (:data:`CIFAR_MEAN`, :data:`CIFAR_STD`)
is a fixed (non-persistent) buffer of the model, so data perturbations are measured in pixel space.
BatchNorm is used in ``eval`` mode with its running statistics: the function of the weights is fixed.

>>> sum(p.numel() for p in cifar_resnet(56).parameters())
853018
>>> sum(p.numel() for p in cifar_resnet(20).parameters())
269722
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["cifar_resnet", "load_cifar_resnet", "CifarResNet", "CIFAR_MEAN", "CIFAR_STD", "DEPTHS"]

#: The per-channel normalisation the model applies to its inputs (ImageNet statistics).
CIFAR_MEAN = (0.485, 0.456, 0.406)
CIFAR_STD = (0.229, 0.224, 0.225)
#: The depths of the paper (any ``6k + 2`` works).
DEPTHS = (20, 32, 44, 56, 110, 1202)


class _ShortcutA(nn.Module):
    """Option A: ``x[:, :, ::2, ::2]`` zero-padded by ``pad`` channels on each side (no parameters)."""

    def __init__(self, pad: int):
        super().__init__()
        self.pad = pad

    def forward(self, x: Tensor) -> Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = _ShortcutA(planes // 4)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6k+2) for 32×32 RGB inputs in [0, 1] (normalisation built in when ``normalize``)."""

    def __init__(self, blocks_per_stage: int, num_classes: int = 10, normalize: bool = True):
        super().__init__()
        self.depth = 6 * blocks_per_stage + 2
        self.normalize = normalize
        self.register_buffer("input_mean", torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("input_std", torch.tensor(CIFAR_STD).view(1, 3, 1, 1), persistent=False)
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.in_planes = 16
        self.layer1 = self._stage(16, blocks_per_stage, 1)
        self.layer2 = self._stage(32, blocks_per_stage, 2)
        self.layer3 = self._stage(64, blocks_per_stage, 2)
        self.linear = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def _stage(self, planes: int, n: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (n - 1):
            layers.append(BasicBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"CifarResNet expects images of shape (b, 3, H, W), got {tuple(x.shape)}")
        if self.normalize:
            x = (x - self.input_mean) / self.input_std
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


def cifar_resnet(depth: int = 56, num_classes: int = 10, normalize: bool = True) -> CifarResNet:
    """A randomly initialised CIFAR ResNet of the given depth (``6k + 2``)."""
    depth = int(depth)
    if depth < 8 or (depth - 2) % 6 != 0:
        raise ValueError(
            f"unknown CIFAR ResNet depth {depth}: the depth must be 6k + 2 (e.g. {', '.join(map(str, DEPTHS))})"
        )
    return CifarResNet((depth - 2) // 6, num_classes, normalize)


def _strip_prefix(state: dict) -> dict:
    out = {}
    for k, v in state.items():
        for prefix in ("module.", "_orig_mod.", "model."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def load_cifar_resnet(
    path: str | os.PathLike,
    depth: int | None = None,
    num_classes: int = 10,
    normalize: bool = True,
    map_location: str | torch.device = "cpu",
) -> CifarResNet:
    """Load a CIFAR ResNet checkpoint with :func:`cifar_resnet`'s parameter names into it.

    Accepts a raw state dict or a dict with ``"state_dict"`` (or ``"model"``); strips ``module.``
    prefixes.  ``depth`` defaults to the one implied by the number of blocks in the checkpoint.
    The model is returned in ``eval`` mode.  Raises ``FileNotFoundError`` for a missing file and
    ``ValueError`` when the keys or shapes do not match the architecture.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    # Checkpoints of this layout are pickles that may hold non-tensor metadata (best_prec1, …).
    raw = torch.load(path, map_location=map_location, weights_only=False)
    state = raw
    if isinstance(raw, dict):
        for key in ("state_dict", "model", "model_state_dict"):
            if key in raw and isinstance(raw[key], dict):
                state = raw[key]
                break
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors")
    state = _strip_prefix(state)
    blocks = {int(k.split(".")[1]) for k in state if k.startswith("layer1.")}
    inferred = 6 * (max(blocks) + 1) + 2 if blocks else None
    if depth is None:
        if inferred is None:
            raise ValueError(f"{path}: no 'layer1.*' keys — not a CIFAR ResNet state dict (keys: {list(state)[:5]} …)")
        depth = inferred
    elif inferred is not None and inferred != depth:
        raise ValueError(f"{path} holds a ResNet-{inferred}, but depth {depth} was requested")
    model = cifar_resnet(depth, num_classes, normalize)
    expected = model.state_dict()
    # Checkpoints saved before PyTorch 0.4.1 lack BatchNorm's ``num_batches_tracked`` (unused in eval).
    for k in expected:
        if k.endswith("num_batches_tracked") and k not in state:
            state[k] = expected[k]
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{path}: state-dict keys do not match ResNet-{depth}: missing {missing[:5]}"
            f"{' …' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}{' …' if len(unexpected) > 5 else ''}"
        )
    bad = [k for k in expected if expected[k].shape != state[k].shape]
    if bad:
        k = bad[0]
        raise ValueError(f"{path}: shape mismatch for {k}: checkpoint {tuple(state[k].shape)}, "
                         f"model {tuple(expected[k].shape)}")
    model.load_state_dict(state)
    return model.eval()
