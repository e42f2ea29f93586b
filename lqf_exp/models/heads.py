"""Where a network's classification head is, and replacing it: the one place that knows head names.

ResNets (torchvision's and ours) call the head ``fc``; the ViT calls it ``head``. A network states its own with a
class attribute ``head_name``; one without it is taken to be a ResNet, so every network built before the ViT keeps
its ``fc``.
"""

from __future__ import annotations

from torch import nn
from torchvision.models.vision_transformer import VisionTransformer

__all__ = ["DEFAULT_HEAD_NAME", "get_head", "head_name", "replace_head"]

DEFAULT_HEAD_NAME = "fc"
# Classes from other libraries that do not declare ``head_name``: where their head is (a dotted path).
_KNOWN_HEADS: dict[type, str] = {VisionTransformer: "heads.head"}


def head_name(net: nn.Module) -> str:
    """Name of ``net``'s head module, dotted where nested (``heads.head`` in torchvision's ViT): ``net.head_name`` if
    the class declares one, else the known place for a library class, else ``"fc"``."""
    name = getattr(type(net), "head_name", _KNOWN_HEADS.get(type(net), DEFAULT_HEAD_NAME))
    if not isinstance(name, str) or not name:
        raise TypeError(f"{type(net).__name__}.head_name must be a non-empty string, got {name!r}")
    return name


def get_head(net: nn.Module) -> nn.Linear:
    """The ``nn.Linear`` head of ``net``; ``ValueError`` naming the attribute looked for otherwise."""
    name = head_name(net)
    head = dict(net.named_modules()).get(name)
    if not isinstance(head, nn.Linear):
        raise ValueError(
            f"{type(net).__name__} has no nn.Linear head named {name!r} (got {type(head).__name__}); "
            "probe, LQF and the head initializations need one"
        )
    return head


def replace_head(net: nn.Module, num_classes: int, in_features: int | None = None) -> nn.Linear:
    """Give ``net`` a fresh ``nn.Linear(in_features, num_classes)`` head (default: the old head's input size).

    Set under the same attribute, so the head keeps its place in ``named_children()`` (the block order LQF's
    ``linearize=<block>`` and the prefix cache follow).
    """
    old = get_head(net)
    head = nn.Linear(old.in_features if in_features is None else in_features, num_classes)
    parent, _, child = head_name(net).rpartition(".")
    (net.get_submodule(parent) if parent else net).add_module(child, head)
    return head
