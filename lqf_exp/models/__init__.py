"""Networks for LQF: architectures, pooling, activation swap and checkpoint I/O."""

from .activations import make_activation, swap_activations
from .build import ARCHS, build_network
from .heads import get_head, head_name, replace_head
from .pooling import POOLINGS, SqrtCovPooling
from .small_resnet import SmallResNet
from .vit import VisionTransformer, vit_tiny
from .weights import load_network_weights, save_network_checkpoint

__all__ = [
    "ARCHS",
    "POOLINGS",
    "SmallResNet",
    "SqrtCovPooling",
    "VisionTransformer",
    "build_network",
    "get_head",
    "head_name",
    "load_network_weights",
    "make_activation",
    "replace_head",
    "save_network_checkpoint",
    "swap_activations",
    "vit_tiny",
]
