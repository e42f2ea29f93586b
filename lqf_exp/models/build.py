"""``build_network``: architecture + head + weights + activation swap, the ``cfg.model`` target."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from typing import Any

from torch import nn
from torchvision import models as tvm

from lqf_exp.options import ACTIVATIONS

from . import weights as W
from .activations import ActivationFactory, make_activation, parse_activation, swap_activations
from .explicit_attention import use_explicit_attention
from .heads import get_head, head_name, replace_head
from .pooling import POOLINGS, SqrtCovPooling
from .small_resnet import SmallResNet
from .vit import vit_tiny

log = logging.getLogger(__name__)

_TORCHVISION: dict[str, tuple[Callable[..., nn.Module], Any]] = {
    "resnet18": (tvm.resnet18, tvm.ResNet18_Weights.IMAGENET1K_V1),
    "resnet50": (tvm.resnet50, tvm.ResNet50_Weights.IMAGENET1K_V2),
    "vit_b_16": (tvm.vit_b_16, tvm.ViT_B_16_Weights.IMAGENET1K_V1),
}
_VITS: dict[str, Callable[..., nn.Module]] = {"vit_tiny": vit_tiny}
ARCHS: tuple[str, ...] = ("small_resnet", *_TORCHVISION, *_VITS)
# Built with their activation (GELU) and pretrained with it: swapping it for another is not the small post-hoc change
# ReLU -> Leaky-ReLU is for a ResNet, so a transformer checkpoint's activation must match the requested one.
TRANSFORMERS = ("vit_tiny", "vit_b_16")
_NO_WEIGHTS = (None, "", "null", "none", "None")


def _backbone(
    arch: str, num_classes: int, imagenet: bool, kw: dict[str, Any], act: ActivationFactory
) -> nn.Module:
    """Random-init (or ImageNet) network whose head is a fresh ``nn.Linear`` for ``num_classes``."""
    if arch in _VITS:
        if imagenet:
            raise ValueError(f"{arch} has no ImageNet weights; use model.weights=null or a checkpoint path")
        return _VITS[arch](num_classes=num_classes, activation=act, **kw)
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
    # after loading: the ImageNet state dict holds nn.MultiheadAttention's packed projections
    use_explicit_attention(net)
    replace_head(net, num_classes)
    return net


def _check_pooling(arch: str, pooling: str, reduce_dim: int | None, iterations: int) -> None:
    if pooling not in POOLINGS:
        raise ValueError(f"Unknown pooling {pooling!r}; valid options are: {', '.join(POOLINGS)}")
    if pooling != "avg" and arch in TRANSFORMERS:
        raise ValueError(
            f"model.pooling={pooling} is not available for {arch}: a ViT classifies from its class token and has "
            "no global pooling layer to replace (sqrt_cov pooling replaces a ResNet's avgpool); use model.pooling=avg"
        )
    if reduce_dim is not None and (isinstance(reduce_dim, bool) or not isinstance(reduce_dim, int) or reduce_dim < 1):
        raise ValueError(f"pooling_reduce_dim must be null or an integer >= 1, got {reduce_dim!r}")
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"pooling_iterations must be an integer >= 1, got {iterations!r}")


def _use_sqrt_cov(net: nn.Module, num_classes: int, reduce_dim: int | None, iterations: int) -> None:
    """Replace ``avgpool`` by :class:`SqrtCovPooling` and ``fc`` by a head over its d(d+1)/2 features.

    Same attribute name, same place in ``named_children()``: ``LinearizedNetwork``'s block order and
    ``linearize=<block>`` see the pooling where the average pooling was.
    """
    pool = SqrtCovPooling(get_head(net).in_features, reduce_dim=reduce_dim, iterations=iterations)
    net.avgpool = pool
    replace_head(net, num_classes, in_features=pool.out_features)


def _check_transformer_activation(arch: str, act_name: str, native: str | None, source: str,
                                  info: Mapping[str, Any]) -> None:
    """Refuse loading a ViT checkpoint pretrained with one activation into a network with another.

    Random init (``model.weights=null``) with relu/leaky_relu stays allowed: that is an ablation of the architecture,
    not a swap of trained weights. A plain state dict records no activation and is taken to have the native one
    (``model.native_activation``, e.g. torchvision's ImageNet ViT: GELU).
    """
    if arch not in TRANSFORMERS:
        return
    recorded = W.recorded_activation(info.get("activation")) or native
    if recorded is not None and recorded != act_name:
        raise ValueError(
            f"Checkpoint {source} of {arch} was pretrained with activation {recorded!r}, but activation={act_name} "
            f"was requested: {arch}'s weights are not reused across activations. Use activation={recorded}, or "
            f"model.weights=null to train {arch} with {act_name} from random init"
        )


def build_network(
    arch: str,
    num_classes: int,
    activation: Mapping[str, Any] | str,
    weights: str | os.PathLike[str] | None = None,
    pooling: str = "avg",
    pooling_reduce_dim: int | None = None,
    pooling_iterations: int = 5,
    native_activation: str | None = None,
    **kw: Any,
) -> nn.Module:
    """Build ``arch`` with a new head for ``num_classes``, load ``weights``, swap activations.

    ``weights``: ``None``/``"null"`` (random), ``"imagenet"`` (torchvision download, torchvision archs
    only), ``"packaged"`` (the shipped FMNIST source checkpoint for this arch and activation), or a
    checkpoint path. Activations are swapped after loading, so ReLU-trained weights are reused with
    Leaky-ReLU as-is (a post-hoc swap; the paper pretrained a Leaky-ReLU ResNet-50 instead).
    ``pooling``: ``"avg"`` (the architecture's global average pooling) or ``"sqrt_cov"`` (B-LQF / MPN-COV:
    :class:`~lqf_exp.models.pooling.SqrtCovPooling` with ``pooling_reduce_dim`` and ``pooling_iterations``,
    which ``"avg"`` ignores). Loading an average-pooled checkpoint (packaged, ImageNet) keeps the backbone
    and leaves the new parts at their init: the head (another size) and any reduction layer, drawn from the
    global RNG (the pipeline seeds it before building, so w0 stays a function of the config and the seed).
    ``native_activation``: the activation the architecture is built and pretrained with (its model config states it;
    ``activation=native`` selects it). ViTs (``vit_tiny``, :mod:`lqf_exp.models.vit`, and ``vit_b_16``) are built
    with the requested activation, take ``pooling="avg"`` only, and load only a checkpoint trained with the same
    activation (a plain state dict is taken to have the native one).
    Extra ``kw`` go to the architecture constructor (e.g. ``widths`` for ``small_resnet``).
    """
    if arch not in ARCHS:
        raise ValueError(f"Unknown arch {arch!r}; valid options are: {', '.join(ARCHS)}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    _check_pooling(arch, pooling, pooling_reduce_dim, pooling_iterations)
    act_name, slope = parse_activation(activation)
    factory = make_activation(act_name, slope)  # validate before any (slow) building or downloading
    source = None if weights in _NO_WEIGHTS else os.fspath(weights)
    if native_activation is not None and native_activation not in ACTIVATIONS:
        raise ValueError(f"Unknown model.native_activation {native_activation!r}; valid names are: "
                         f"{', '.join(ACTIVATIONS)}")
    if source == "packaged":
        if arch in TRANSFORMERS:  # refused by name before a file for another activation is looked for
            _check_transformer_activation(arch, act_name, native_activation, "packaged", {})
        source = os.fspath(W.packaged_checkpoint_path(arch, act_name))
    net = _backbone(arch, num_classes, imagenet=source == "imagenet", kw=dict(kw), act=factory)
    if pooling == "sqrt_cov":
        _use_sqrt_cov(net, num_classes, pooling_reduce_dim, pooling_iterations)
    if source not in (None, "imagenet"):
        # A checkpoint saved with sqrt_cov pooling restores the reduction; any other leaves it at its init.
        fresh = ("avgpool.",) if pooling == "sqrt_cov" else ()
        info = W.load_network_weights(net, source, activation_name=act_name, fresh_prefixes=fresh,
                                      head_prefix=f"{head_name(net)}.")
        _check_transformer_activation(arch, act_name, native_activation, source, info)
        log.info("Loaded %s weights from %s (meta: %s)", arch, source, info.get("meta"))
    n = swap_activations(net, factory)
    log.debug("Swapped %d activation modules of %s to %s", n, arch, act_name)
    return net
