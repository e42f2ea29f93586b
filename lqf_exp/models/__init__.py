"""Networks for LQF: architectures, activation swap and checkpoint I/O."""

from .activations import make_activation, swap_activations
from .build import ARCHS, build_network
from .small_resnet import SmallResNet
from .weights import load_network_weights, save_network_checkpoint

__all__ = [
    "ARCHS",
    "SmallResNet",
    "build_network",
    "load_network_weights",
    "make_activation",
    "save_network_checkpoint",
    "swap_activations",
]
