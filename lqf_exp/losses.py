"""Classification losses on logits: cross-entropy and MSE on scaled one-hot targets.

Both are means over the batch of a per-sample loss. For MSE the per-sample loss is ``Σ_c (f_c − α·onehot_c)²``
(a sum over classes, no ½), so with N samples the Hessian with respect to the outputs is ``2I/N`` per sample — the
convention the K-FAC factors follow. The paper writes its objective as a sum over samples; a mean only rescales
the learning rate and λ by N.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class ClassificationLoss(nn.Module):
    """A loss on ``(logits [N, C], labels [N])``; ``kind`` tells preconditioners which Hessian it has."""

    kind: str = ""

    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


class CrossEntropyLoss(ClassificationLoss):
    """Softmax cross-entropy, mean over the batch."""

    kind = "ce"

    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        return F.cross_entropy(logits, labels)


class ScaledMSELoss(ClassificationLoss):
    """``mean_n Σ_c (f_c(x_n) − α·onehot_c(y_n))²`` with α = ``target_scale`` (15 in the paper, after Hui & Belkin)."""

    kind = "mse"

    def __init__(self, target_scale: float = 15.0) -> None:
        super().__init__()
        if not target_scale > 0:
            raise ValueError(f"loss.target_scale must be > 0, got {target_scale}")
        self.target_scale = float(target_scale)

    def targets(self, labels: Tensor, num_classes: int, dtype: torch.dtype) -> Tensor:
        return F.one_hot(labels, num_classes).to(dtype) * self.target_scale

    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        residual = logits - self.targets(labels, logits.shape[1], logits.dtype)
        return residual.pow(2).sum(dim=1).mean()
