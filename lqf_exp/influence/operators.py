"""The pieces of a linearized network that influence needs, on batches: per-sample Jacobians with the prediction
errors, and the K-FAC inverse applied to many flat P-vectors at once."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import Tensor

from lqf_exp.delta_layout import slices
from lqf_exp.linearize import LinearizedNetwork
from lqf_exp.losses import ClassificationLoss
from lqf_exp.precond import KFACOperator

from .core import RowOperator

__all__ = ["jacobian_chunks", "kfac_rows"]


def jacobian_chunks(net: LinearizedNetwork, loss: ClassificationLoss, batches: Iterable[tuple[Tensor, Tensor]],
                    dtype: torch.dtype = torch.float32) -> Iterator[tuple[Tensor, Tensor]]:
    """``(J [B, C, P], e [B, C])`` per batch: Jacobians at w0 and prediction errors ``α·onehot − f_lin(x)`` at the
    current δ (float64)."""
    for x, y in batches:
        with torch.no_grad():
            outputs = net(x)
            residual = loss.targets(y, outputs.shape[1], torch.float64) - outputs.double()
        yield net.jacobian(x).detach().to(dtype), residual


def kfac_rows(operator: KFACOperator, net: LinearizedNetwork) -> RowOperator:
    """``(G ⊗ A + γI)⁻¹`` of ``operator`` on rows ``[K, P]`` laid out as ``net.delta_list()``; entries of δs
    outside every preconditioned layer (none with the default ``bn_affine=freeze``) are divided by γ."""
    deltas = net.delta_list()
    # Layers name their δ tensors, not positions: find each one's columns by identity.
    where = {id(delta): columns for delta, columns in zip(deltas, slices(deltas), strict=True)}
    layers = net.curvature_layers()
    inverses = operator.current_inverses()
    gamma = operator.gamma()

    def apply(rows: Tensor) -> Tensor:
        out = rows / gamma
        for name, (weight, bias) in layers.items():
            w_cols = where[id(weight)]
            joined = rows[:, w_cols].reshape(len(rows), weight.shape[0], -1)
            if bias is not None:
                b_cols = where[id(bias)]
                joined = torch.cat([joined, rows[:, b_cols, None]], dim=2)
            solved = inverses[name].apply(joined)
            out[:, w_cols] = solved[..., : joined.shape[2] - int(bias is not None)].reshape(len(rows), -1)
            if bias is not None:
                out[:, b_cols] = solved[..., -1]
        return out

    return apply
