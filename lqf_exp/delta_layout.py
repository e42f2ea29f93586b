"""The one layout of δ as a flat vector: the tensors of ``LinearizedNetwork.delta_list()`` raveled and concatenated
in that order.

Solvers, the Jacobian cache, the dual system and influence all pass δ-shaped data between a list of tensors and a
flat ``[P]`` vector (or ``[..., P]`` rows); they agree on where each parameter sits only because they all use these
functions. A leaf module (torch only), so any layer may import it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["copy_flat_", "flat_size", "flatten", "slices", "unflatten"]


def flat_size(like: Sequence[Tensor]) -> int:
    """``P``: the number of entries of the flat vector."""
    return sum(t.numel() for t in like)


def slices(like: Sequence[Tensor]) -> list[slice]:
    """Where each tensor of ``like`` sits in the flat vector, in order."""
    out, start = [], 0
    for t in like:
        out.append(slice(start, start + t.numel()))
        start += t.numel()
    return out


def flatten(vectors: Sequence[Tensor]) -> Tensor:
    """One flat tensor of ``vectors`` (in their order)."""
    return torch.cat([t.reshape(-1) for t in vectors])


def unflatten(flat: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    """Views of ``flat`` shaped like ``like`` (the inverse of :func:`flatten`)."""
    return [flat[where].view(t.shape) for where, t in zip(slices(like), like, strict=True)]


def copy_flat_(flat: Tensor, tensors: Sequence[Tensor]) -> None:
    """Write ``flat`` into ``tensors`` in place (each keeps its dtype and device), outside autograd: how a solver
    sets δ (often leaf tensors that require grad) from a flat solution."""
    with torch.no_grad():
        for t, piece in zip(tensors, unflatten(flat, tensors), strict=True):
            t.copy_(piece.to(t))
