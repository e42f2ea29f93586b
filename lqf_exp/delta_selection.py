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


# Normalization layers whose affine parameters bn_affine=freeze keeps at w0.
_NORMS = (_BatchNorm, nn.LayerNorm, nn.GroupNorm)
# linearize=attention (TAFT): the Linear children of every module that names them in ``projection_names``
ATTENTION = "attention"


def _attention_projections(net: nn.Module) -> set[str]:
    return {f"{name}.{child}" if name else child for name, module in net.named_modules()
            for child in getattr(module, "projection_names", ())}


def select_deltas(net: nn.Module, linearize: str, bn_affine: str, head_name: str) -> DeltaSelection:
    """Which parameters of ``net`` get a δ.

    ``linearize``: ``"all"`` (every parameter); ``"head"`` (the module ``head_name``); ``"attention"`` (TAFT: the
    projections that attention modules list in ``projection_names``, e.g. q, k, v and out of every ViT block; MLPs and
    embeddings frozen); or the name of a module, top-level (``layer3``) or nested (``blocks.2``): that module and
    every module after it in registration order (forward order in the ResNets and ViTs here). The top-level children
    before the one that holds it form the frozen prefix. ``bn_affine``: ``freeze`` (the affine parameters of
    BatchNorm, LayerNorm and GroupNorm stay at w0, so in a ResNet every δ belongs to a Conv2d/Linear layer, the layers
    K-FAC preconditions) or ``linearize`` (they get δs too). Raises ``ValueError`` naming the valid choices.
    """
    if bn_affine not in BN_AFFINE:
        raise ValueError(f"bn_affine must be one of {BN_AFFINE}, got {bn_affine!r}")
    children = [n for n, _ in net.named_children()]
    modules = dict(net.named_modules())
    order = {name: index for index, name in enumerate(modules)}
    frozen = {n for n, m in modules.items() if isinstance(m, _NORMS)} if bn_affine == "freeze" else set()
    owners = {name: name.rpartition(".")[0] for name, _ in net.named_parameters()}
    if linearize in ("all", ATTENTION):
        blocks = children
        chosen = _attention_projections(net) if linearize == ATTENTION else set(modules)
        if linearize == ATTENTION and not chosen:
            raise ValueError("linearize='attention' needs attention modules that list their projections in "
                             "`projection_names` (lqf_exp.models.vit); this network has none")
        names = tuple(n for n, owner in owners.items() if owner in chosen and owner not in frozen)
    else:
        start = head_name if linearize == "head" else linearize
        if start not in modules or start == "":
            raise ValueError(f"Unknown linearize={linearize!r}; valid: 'all', 'head', '{ATTENTION}', or the name of "
                             f"a module, top-level ({children}) or nested (e.g. {children[-1]!r}.0)")
        blocks = children[children.index(start.split(".")[0]):]
        if any(True for _ in net.parameters(recurse=False)):
            # The root's forward does work of its own between its children (torchvision's ViT: the class token after
            # conv_proj), so the children before the block are no prefix that could run apart: none is split off.
            blocks = children
        names = tuple(n for n, owner in owners.items() if order[owner] >= order[start] and owner not in frozen)
    if not names:
        raise ValueError(f"linearize={linearize!r} selects no parameter to train")
    _check_head(net, names, head_name)
    return DeltaSelection(tuple(blocks), names, tuple(c for c in children if c not in blocks))


def _check_head(net: nn.Module, names: tuple[str, ...], head_name: str) -> None:
    weight = getattr(dict(net.named_modules()).get(head_name), "weight", None)
    backbone = any(not n.startswith(head_name + ".") for n in names)
    if backbone and isinstance(weight, Tensor) and not bool(weight.detach().any()):
        raise ValueError(
            f"The base head net.{head_name}.weight is all zeros. Every backbone direction of the Jacobian passes "
            "through the head, so a zero head makes J zero for all backbone weights and only the head would learn "
            "(LQF would collapse to a linear probe). Initialize the head with lqf_exp.head_init.init_head (probe or "
            "random) before linearizing."
        )
