"""Networks for LQF: architectures, pooling, activation swap and checkpoint I/O."""

from .activations import make_activation, swap_activations
from .build import ARCHS, build_network
from .pooling import POOLINGS, SqrtCovPooling
from .small_resnet import SmallResNet
from .weights import load_network_weights, save_network_checkpoint

__all__ = [
    "ARCHS",
    "POOLINGS",
    "SmallResNet",
    "SqrtCovPooling",
    "build_network",
    "load_network_weights",
    "make_activation",
    "save_network_checkpoint",
    "swap_activations",
]
