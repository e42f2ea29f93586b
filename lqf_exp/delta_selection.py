"""Which parameters of a network get a δ in LQF (``method.linearize``, ``method.bn_affine``), and the checks on it."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from lqf_exp.options import BN_AFFINE

__all__ = ["DeltaSelection", "delta_key", "select_deltas"]


def delta_key(name: str) -> str:
    """The key of parameter ``name`` in a ``ParameterDict`` (keys cannot contain dots)."""
    return name.replace(".", "__")


@dataclass(frozen=True)
class DeltaSelection:
    """``blocks``: the top-level children that carry a tangent, in forward order (the earlier ones form the frozen
    prefix); ``names``: the parameters with a δ, in ``net.named_parameters()`` order (the order of every vector a
    solver handles)."""

    blocks: tuple[str, ...]
    names: tuple[str, ...]
    prefix: tuple[str, ...]


def select_deltas(net: nn.Module, linearize: str, bn_affine: str, head_name: str) -> DeltaSelection:
    """``linearize``: ``"all"``, ``"head"`` (the module ``head_name``), or a top-level child of ``net``: that child
    and every later one. ``bn_affine``: ``freeze`` (BatchNorm γ/β stay at w0, so every δ belongs to a Conv2d/Linear
    layer, the layers K-FAC preconditions) or ``linearize`` (γ/β get δs too). Raises ``ValueError`` naming the valid
    choices."""
    if bn_affine not in BN_AFFINE:
        raise ValueError(f"bn_affine must be one of {BN_AFFINE}, got {bn_affine!r}")
    children = [n for n, _ in net.named_children()]
    start = head_name if linearize == "head" else linearize
    if linearize == "all":
        blocks = children
    elif start in children:
        blocks = children[children.index(start):]
    else:
        raise ValueError(f"Unknown linearize={linearize!r}; valid: 'all', 'head', or a top-level child of the "
                         f"network: {children}")
    if linearize == "head" and not isinstance(getattr(net, head_name, None), nn.Module):
        raise ValueError(f"linearize='head' needs a head module net.{head_name}")
    frozen_bn = {n for n, m in net.named_modules() if isinstance(m, _BatchNorm)} if bn_affine == "freeze" else set()
    names = tuple(name for name, _ in net.named_parameters()
                  if name.split(".")[0] in blocks and name.rpartition(".")[0] not in frozen_bn)
    if not names:
        raise ValueError(f"linearize={linearize!r} selects no parameter to train")
    _check_head(net, names, head_name)
    return DeltaSelection(tuple(blocks), names, tuple(c for c in children if c not in blocks))


def _check_head(net: nn.Module, names: tuple[str, ...], head_name: str) -> None:
    weight = getattr(getattr(net, head_name, None), "weight", None)
    backbone = any(not n.startswith(head_name + ".") for n in names)
    if backbone and isinstance(weight, Tensor) and not bool(weight.detach().any()):
        raise ValueError(
            f"The base head net.{head_name}.weight is all zeros. Every backbone direction of the Jacobian passes "
            "through the head, so a zero head makes J zero for all backbone weights and only the head would learn "
            "(LQF would collapse to a linear probe). Initialize the head with lqf_exp.head_init.init_head (probe or "
            "random) before linearizing."
        )
