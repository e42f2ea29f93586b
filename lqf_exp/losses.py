"""Classification losses on logits, each owning its curvature: cross-entropy and MSE on scaled one-hot targets.

Both are means over the batch of a per-sample loss ``ℓ(f_n, y_n)``. For MSE the per-sample loss is
``Σ_c (f_c − α·onehot_c)²`` (a sum over classes, no ½), so its Hessian with respect to the outputs is ``2I`` per sample
(``2I/N`` for the batch mean) — the convention the K-FAC factors and the solvers follow. The paper writes its
objective as a sum over samples; a mean only rescales λ by N.

A loss answers everything a preconditioner, a solver or a head fit needs to know about it (kfac-jax style), so no
other module switches on its name: the per-sample output Hessian (``hessian_vector``), a square root of it
(``hessian_sqrt``, for type-2 K-FAC factors), sampled gradients whose covariance is that Hessian
(``sampled_gradients``, MC Fisher), the per-sample output gradient (``output_gradient``, empirical Fisher), whether
the Hessian is constant (``constant_curvature``: then the LQF objective is an exact quadratic) and how to fit a
linear head on frozen features (``fit_head``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lqf_exp.head_fit import HeadFit, fit_logistic_head, fit_ridge_head


class ClassificationLoss(nn.Module):
    """A loss on ``(logits [N, C], labels [N])``: the batch mean of ``per_sample``; ``kind`` names it in reports."""

    kind: str = ""
    constant_curvature: bool = False

    def per_sample(self, logits: Tensor, labels: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        return self.per_sample(logits, labels).mean()

    def zero_predictor_loss(self, num_classes: int) -> float:
        """The per-sample loss of the all-zero output, averaged over the ``num_classes`` labels: ``α²`` for MSE on
        ``α·onehot`` (a sum over classes), ``log C`` for CE.

        A size of the objective that does not vanish when a fit interpolates its training set (L(0) ≈ 0 there), for
        tests such as the solvers' divergence rule that would otherwise be relative to nothing.
        """
        logits = torch.zeros(num_classes, num_classes, dtype=torch.float64)
        return float(self.per_sample(logits, torch.arange(num_classes)).mean())

    def output_gradient(self, logits: Tensor, labels: Tensor) -> Tensor:  # pragma: no cover - abstract
        """``∂ℓ(f_n, y_n)/∂f_n`` for every sample, ``[N, C]``."""
        raise NotImplementedError

    def hessian_vector(self, logits: Tensor, vectors: Tensor) -> Tensor:  # pragma: no cover - abstract
        """``H_n v_n`` per sample, ``H_n = ∂²ℓ/∂f_n²`` at ``logits``; ``vectors`` is ``[N, C]`` or ``[K, N, C]``."""
        raise NotImplementedError

    def hessian_sqrt(self, logits: Tensor) -> Tensor:  # pragma: no cover - abstract
        """``S [K, N, C]`` with ``Σ_k S[k, n] S[k, n]ᵀ = H_n``."""
        raise NotImplementedError

    def sampled_gradients(
        self, logits: Tensor, samples: int, generator: torch.Generator | None = None
    ) -> Tensor:  # pragma: no cover - abstract
        """``[M, N, C]`` gradients at targets drawn from the model's predictive distribution: ``E[g gᵀ] = H_n``."""
        raise NotImplementedError

    def fit_head(
        self, features: Tensor, labels: Tensor, num_classes: int, l2: float | None
    ) -> HeadFit:  # pragma: no cover - abstract
        """The linear head minimizing this loss on frozen ``features`` with ``(l2/2)‖W‖²``; ``l2=None`` lets the
        loss choose the penalty."""
        raise NotImplementedError


class CrossEntropyLoss(ClassificationLoss):
    """Softmax cross-entropy, mean over the batch. Its Hessian ``diag(p) − ppᵀ`` moves with the outputs."""

    kind = "ce"
    constant_curvature = False
    # ``fit_head(l2=None)`` uses this penalty: logistic regression has no closed-form leave-one-out to choose one.
    default_head_l2 = 1e-4

    def per_sample(self, logits: Tensor, labels: Tensor) -> Tensor:
        return F.cross_entropy(logits, labels, reduction="none")

    def output_gradient(self, logits: Tensor, labels: Tensor) -> Tensor:
        return logits.softmax(dim=1) - F.one_hot(labels.long(), logits.shape[1]).to(logits.dtype)

    def hessian_vector(self, logits: Tensor, vectors: Tensor) -> Tensor:
        p = logits.softmax(dim=1)
        return p * vectors - p * (p * vectors).sum(dim=-1, keepdim=True)

    def hessian_sqrt(self, logits: Tensor) -> Tensor:
        # diag(p) − ppᵀ = S Sᵀ with column c of S = √p_c (e_c − p)
        p = logits.softmax(dim=1)
        eye = torch.eye(p.shape[1], dtype=p.dtype, device=p.device)
        return p.T.sqrt()[:, :, None] * (eye[:, None, :] - p[None])

    def sampled_gradients(self, logits: Tensor, samples: int, generator: torch.Generator | None = None) -> Tensor:
        p = logits.softmax(dim=1)
        drawn = torch.multinomial(p, samples, replacement=True, generator=generator)  # (N, M)
        return p[None] - F.one_hot(drawn.T, p.shape[1]).to(p.dtype)

    def fit_head(self, features: Tensor, labels: Tensor, num_classes: int, l2: float | None) -> HeadFit:
        return fit_logistic_head(features, labels, num_classes, self.default_head_l2 if l2 is None else l2)


class ScaledMSELoss(ClassificationLoss):
    """``mean_n Σ_c (f_c(x_n) − α·onehot_c(y_n))²`` with α = ``target_scale`` (15 in the paper, after Hui & Belkin).

    Its Hessian is ``2I`` per sample whatever the outputs, so the LQF objective with it is an exact quadratic.
    """

    kind = "mse"
    constant_curvature = True

    def __init__(self, target_scale: float = 15.0) -> None:
        super().__init__()
        if not target_scale > 0:
            raise ValueError(f"loss.target_scale must be > 0, got {target_scale}")
        self.target_scale = float(target_scale)

    def targets(self, labels: Tensor, num_classes: int, dtype: torch.dtype = torch.float32) -> Tensor:
        """``α·onehot(labels)``, ``[N, C]``."""
        return F.one_hot(labels.long(), num_classes).to(dtype) * self.target_scale

    def per_sample(self, logits: Tensor, labels: Tensor) -> Tensor:
        residual = logits - self.targets(labels, logits.shape[1], logits.dtype)
        return residual.pow(2).sum(dim=1)

    def output_gradient(self, logits: Tensor, labels: Tensor) -> Tensor:
        return 2.0 * (logits - self.targets(labels, logits.shape[1], logits.dtype))

    def hessian_vector(self, logits: Tensor, vectors: Tensor) -> Tensor:
        return 2.0 * vectors

    def hessian_sqrt(self, logits: Tensor) -> Tensor:
        N, C = logits.shape
        eye = torch.eye(C, dtype=logits.dtype, device=logits.device)
        return math.sqrt(2.0) * eye[:, None, :].expand(C, N, C)  # 2I = (√2 I)(√2 I)ᵀ

    def sampled_gradients(self, logits: Tensor, samples: int, generator: torch.Generator | None = None) -> Tensor:
        # a target ỹ ~ N(f, ½I) gives the gradient 2(f − ỹ) ~ N(0, 2I), whose covariance is the Hessian 2I
        shape = (samples, *logits.shape)
        return math.sqrt(2.0) * torch.randn(shape, dtype=logits.dtype, device=logits.device, generator=generator)

    def fit_head(self, features: Tensor, labels: Tensor, num_classes: int, l2: float | None) -> HeadFit:
        """Closed-form ridge regression onto ``α·onehot``; ``l2=None`` picks the penalty by exact leave-one-out."""
        return fit_ridge_head(features, labels, num_classes, self.target_scale, l2)
