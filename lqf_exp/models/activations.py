"""Activation factories and the activation swap (ReLU / Leaky-ReLU / GELU) used by every network we build."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

from torch import nn

from lqf_exp.options import ACTIVATIONS

DEFAULT_NEGATIVE_SLOPE = 0.01

ActivationFactory = Callable[[], nn.Module]
# The module types swap_activations replaces: every activation make_activation can build, so a swap is total.
_SWAPPABLE = (nn.ReLU, nn.LeakyReLU, nn.GELU)


def make_activation(name: str, negative_slope: float = DEFAULT_NEGATIVE_SLOPE) -> ActivationFactory:
    """Return a zero-argument factory that builds a fresh, non-in-place activation module.

    In-place activations break full backward hooks and (with slope <= 0) autograd of ``leaky_relu_``,
    and they make the jvp of the linearized model fragile, so ``inplace`` is always False. ``gelu`` (exact, not the
    tanh approximation) is smooth and ignores ``negative_slope``, which is still range-checked.
    """
    if not isinstance(name, str) or name not in ACTIVATIONS:
        raise ValueError(f"Unknown activation {name!r}; valid names are: {', '.join(ACTIVATIONS)}")
    slope = float(negative_slope)
    # Checked for relu too, so a typo in the config fails however the activation is chosen.
    if not 0.0 <= slope < 1.0:
        raise ValueError(f"activation.negative_slope must be in [0, 1), got {negative_slope!r}")
    if name == "relu":
        return partial(nn.ReLU, inplace=False)
    if name == "gelu":
        return nn.GELU
    return partial(nn.LeakyReLU, negative_slope=slope, inplace=False)


def parse_activation(activation: Mapping[str, Any] | str) -> tuple[str, float]:
    """Read ``{name, negative_slope}`` (the ``conf/activation/*.yaml`` group) into ``(name, slope)``."""
    if isinstance(activation, str):
        return activation, DEFAULT_NEGATIVE_SLOPE
    if not isinstance(activation, Mapping):
        raise ValueError(
            f"activation must be a mapping like {{name: leaky_relu, negative_slope: 0.01}}, "
            f"got {type(activation).__name__}"
        )
    unknown = sorted(set(activation.keys()) - {"name", "negative_slope"})
    if unknown:
        raise ValueError(f"Unknown activation config keys {unknown}; allowed keys: name, negative_slope")
    if "name" not in activation:
        raise ValueError(f"activation config needs a 'name' (one of: {', '.join(ACTIVATIONS)})")
    slope = activation.get("negative_slope", DEFAULT_NEGATIVE_SLOPE)
    return str(activation["name"]), float(DEFAULT_NEGATIVE_SLOPE if slope is None else slope)


def swap_activations(net: nn.Module, factory: ActivationFactory) -> int:
    """Replace every ``nn.ReLU``/``nn.LeakyReLU``/``nn.GELU`` attribute of ``net`` by ``factory()``, in place.

    Works per attribute, not per module object: torchvision blocks register one ``relu`` and call it
    several times, and a module object registered under two names gets two fresh replacements, so no
    instance ends up shared. Returns the number of attributes replaced.
    """
    if isinstance(net, _SWAPPABLE):
        raise ValueError("swap_activations needs a container module, not a bare activation")
    targets: list[tuple[nn.Module, str]] = []
    for parent in net.modules():
        # _modules keeps duplicate registrations that named_modules() would de-duplicate.
        for child_name, child in parent._modules.items():
            if isinstance(child, _SWAPPABLE):
                targets.append((parent, child_name))
    for parent, child_name in targets:
        setattr(parent, child_name, factory())
    return len(targets)


def count_activations(net: nn.Module) -> int:
    """Number of activation attributes (the count ``swap_activations`` would replace)."""
    return sum(
        isinstance(child, _SWAPPABLE)
        for parent in net.modules()
        for child in parent._modules.values()
    )
