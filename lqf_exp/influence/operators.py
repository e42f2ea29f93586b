"""The pieces of a linearized network that influence needs, on batches: per-sample Jacobians with the prediction
errors, and the K-FAC inverse applied to many flat P-vectors at once."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import Tensor

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
    offsets, start = {}, 0
    for delta in deltas:
        offsets[id(delta)] = (start, delta.shape)
        start += delta.numel()
    layers = net.curvature_layers()
    inverses = operator.current_inverses()
    gamma = operator.gamma()

    def apply(rows: Tensor) -> Tensor:
        out = rows / gamma
        for name, (weight, bias) in layers.items():
            w_start, w_shape = offsets[id(weight)]
            w_size = weight.numel()
            joined = rows[:, w_start:w_start + w_size].reshape(len(rows), w_shape[0], -1)
            if bias is not None:
                b_start, _ = offsets[id(bias)]
                joined = torch.cat([joined, rows[:, b_start:b_start + bias.numel(), None]], dim=2)
            solved = inverses[name].apply(joined)
            out[:, w_start:w_start + w_size] = solved[..., : joined.shape[2] - int(bias is not None)].reshape(
                len(rows), -1)
            if bias is not None:
                out[:, b_start:b_start + bias.numel()] = solved[..., -1]
        return out

    return apply
