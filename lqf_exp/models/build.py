"""``build_network``: architecture + head + weights + activation swap, the ``cfg.model`` target."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from typing import Any

from torch import nn
from torchvision import models as tvm

from . import weights as W
from .activations import make_activation, parse_activation, swap_activations
from .small_resnet import SmallResNet

log = logging.getLogger(__name__)

_TORCHVISION: dict[str, tuple[Callable[..., nn.Module], Any]] = {
    "resnet18": (tvm.resnet18, tvm.ResNet18_Weights.IMAGENET1K_V1),
    "resnet50": (tvm.resnet50, tvm.ResNet50_Weights.IMAGENET1K_V2),
}
ARCHS: tuple[str, ...] = ("small_resnet", *_TORCHVISION)
_NO_WEIGHTS = (None, "", "null", "none", "None")


def _backbone(arch: str, num_classes: int, imagenet: bool, kw: dict[str, Any]) -> nn.Module:
    """Random-init (or ImageNet) network whose ``fc`` is a fresh ``nn.Linear`` for ``num_classes``."""
    if arch == "small_resnet":
        if imagenet:
            raise ValueError(
                "small_resnet has no ImageNet weights; use model.weights=packaged, a checkpoint path, "
                "or model.weights=null"
            )
        return SmallResNet(num_classes=num_classes, **kw)
    builder, enum = _TORCHVISION[arch]
    net = builder(weights=None, **kw)  # 1000-class head, so an ImageNet state dict loads strictly
    if imagenet:
        net.load_state_dict(W.download_imagenet_state_dict(enum))
    net.fc = nn.Linear(net.fc.in_features, num_classes)
    return net


def build_network(
    arch: str,
    num_classes: int,
    activation: Mapping[str, Any] | str,
    weights: str | os.PathLike[str] | None = None,
    **kw: Any,
) -> nn.Module:
    """Build ``arch`` with a new ``fc`` head for ``num_classes``, load ``weights``, swap activations.

    ``weights``: ``None``/``"null"`` (random), ``"imagenet"`` (torchvision download, torchvision archs
    only), ``"packaged"`` (the shipped FMNIST source checkpoint for this arch and activation), or a
    checkpoint path. Activations are swapped after loading, so ReLU-trained weights are reused with
    Leaky-ReLU as-is (a post-hoc swap; the paper pretrained a Leaky-ReLU ResNet-50 instead).
    Extra ``kw`` go to the architecture constructor (e.g. ``widths`` for ``small_resnet``).
    """
    if arch not in ARCHS:
        raise ValueError(f"Unknown arch {arch!r}; valid options are: {', '.join(ARCHS)}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    act_name, slope = parse_activation(activation)
    factory = make_activation(act_name, slope)  # validate before any (slow) building or downloading
    source = None if weights in _NO_WEIGHTS else os.fspath(weights)
    if source == "packaged":
        source = os.fspath(W.packaged_checkpoint_path(arch, act_name))
    net = _backbone(arch, num_classes, imagenet=source == "imagenet", kw=dict(kw))
    if source not in (None, "imagenet"):
        info = W.load_network_weights(net, source, activation_name=act_name)
        log.info("Loaded %s weights from %s (meta: %s)", arch, source, info.get("meta"))
    n = swap_activations(net, factory)
    log.debug("Swapped %d activation modules of %s to %s", n, arch, act_name)
    return net
