"""Linear heads fitted on frozen features: ridge regression (with its exact leave-one-out) and logistic regression.

Conventions follow :mod:`lqf_exp.losses`: the MSE is the batch mean of ``Σ_c (f_c − α·onehot_c)²`` and an L2
coefficient ``l2`` adds ``(l2/2)·‖W‖²``; biases are never penalized. Leave-one-out keeps the penalty of the full
problem fixed (the sum form ``Σ_n ℓ_n + (N·l2/2)‖W‖²``), which is what makes it exact in closed form.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "L2_GRID", "HeadFit", "fit_logistic_head", "fit_ridge_head", "ridge_hat_matrix", "ridge_head", "ridge_loo_errors",
    "select_ridge_l2",
]

# The log grid the leave-one-out choices search (penalty per sample, as in ``(l2/2)‖W‖²`` of a batch mean).
L2_GRID: tuple[float, ...] = tuple(10.0 ** (k / 2) for k in range(-12, 9))


@dataclass
class HeadFit:
    """A fitted head: ``weight [C, D]``, ``bias [C]``, the penalty used, and — for a linear smoother of the targets
    (ridge) — a function giving its ``[N, N]`` hat matrix on the training samples (built only when asked)."""

    weight: Tensor
    bias: Tensor
    l2: float
    smoother: Callable[[], Tensor] | None = None


def _centred(features: Tensor, labels: Tensor, num_classes: int, target_scale: float) -> tuple[Tensor, ...]:
    X = features.detach().to(torch.float64).flatten(1)
    T = target_scale * F.one_hot(labels.long().cpu(), num_classes).to(X)
    mu_x, mu_t = X.mean(0), T.mean(0)
    return X - mu_x, T - mu_t, mu_x, mu_t


def ridge_head(
    features: Tensor, labels: Tensor, num_classes: int, target_scale: float = 15.0, l2: float = 1e-4
) -> tuple[Tensor, Tensor]:
    """Closed-form head minimizing ``mean_n ‖W f_n + b − α·onehot(y_n)‖² + (l2/2)·‖W‖²`` (bias unpenalized).

    Solved in float64; returns ``(weight [C, D], bias [C])`` in the dtype of ``features``.
    """
    Xc, Tc, mu_x, mu_t = _centred(features, labels, num_classes, target_scale)
    N, D = Xc.shape
    # Normal equations of the centred problem, multiplied by N: (XcᵀXc + N·l2/2·I) Wᵀ = XcᵀTc.
    # With l2 = 0 the system may be singular (D ≥ N): take the minimum-norm least-squares solution instead.
    A = Xc.T @ Xc + (N * l2 / 2) * torch.eye(D, dtype=Xc.dtype)
    Wt = torch.linalg.solve(A, Xc.T @ Tc) if l2 > 0 else torch.linalg.lstsq(Xc, Tc, driver="gelsd").solution
    bias = mu_t - mu_x @ Wt
    return Wt.T.contiguous().to(features.dtype), bias.to(features.dtype)


def ridge_loo_errors(
    features: Tensor, labels: Tensor, num_classes: int, target_scale: float = 15.0, grid: tuple[float, ...] = L2_GRID
) -> Tensor:
    """Exact leave-one-out error ``mean_i ‖y_i − ŷ_{−i}(x_i)‖²`` of the ridge head for every ``l2`` of ``grid``.

    Ridge with an unpenalized bias is a linear smoother with hat matrix ``H = Xc(XcᵀXc + μI)⁻¹Xcᵀ + 11ᵀ/N``
    (μ = N·l2/2), so the left-out residual is ``e_i / (1 − H_ii)``; one eigendecomposition serves the whole grid.
    """
    Xc, Tc, _, _ = _centred(features, labels, num_classes, target_scale)
    N = Xc.shape[0]
    s, V = torch.linalg.eigh(Xc.T @ Xc)
    s = s.clamp_min(0.0)
    XV, VtXtT = Xc @ V, V.T @ (Xc.T @ Tc)
    errors = []
    for l2 in grid:
        inv = 1.0 / (s + N * float(l2) / 2)
        leverage = (XV.pow(2) * inv).sum(dim=1) + 1.0 / N
        residual = Tc - XV @ (inv[:, None] * VtXtT)
        errors.append((residual / (1.0 - leverage)[:, None]).pow(2).sum(dim=1).mean())
    return torch.stack(errors)


def select_ridge_l2(
    features: Tensor, labels: Tensor, num_classes: int, target_scale: float = 15.0, grid: tuple[float, ...] = L2_GRID
) -> float:
    """The ``l2`` of ``grid`` with the smallest exact leave-one-out error of the ridge head."""
    errors = ridge_loo_errors(features, labels, num_classes, target_scale, grid)
    return float(grid[int(torch.argmin(errors))])


def ridge_hat_matrix(features: Tensor, l2: float) -> Tensor:
    """``H = Xc(XcᵀXc + μI)⁻¹Xcᵀ + 11ᵀ/N`` (μ = N·l2/2, float64): fitted outputs = H · targets, per class."""
    X = features.detach().to(torch.float64).flatten(1)
    Xc = X - X.mean(0)
    N, D = Xc.shape
    system = Xc.T @ Xc + (N * l2 / 2) * torch.eye(D, dtype=Xc.dtype)
    return Xc @ torch.linalg.solve(system, Xc.T) + 1.0 / N


def fit_ridge_head(
    features: Tensor, labels: Tensor, num_classes: int, target_scale: float, l2: float | None
) -> HeadFit:
    """:func:`ridge_head` with ``l2``, or with the leave-one-out choice of :func:`select_ridge_l2` when None."""
    if l2 is None:
        l2 = select_ridge_l2(features, labels, num_classes, target_scale)
    weight, bias = ridge_head(features, labels, num_classes, target_scale, l2)
    return HeadFit(weight, bias, float(l2), smoother=lambda: ridge_hat_matrix(features, float(l2)))


def fit_logistic_head(
    features: Tensor, labels: Tensor, num_classes: int, l2: float = 1e-4, steps: int = 100
) -> HeadFit:
    """Logistic-regression head: full-batch L-BFGS from zero on ``CE + (l2/2)·‖W‖²`` (deterministic).

    Weights come back in the dtype of ``features``.
    """
    X = features.detach().to(torch.float64).flatten(1)
    y = labels.long().cpu()
    # Standardize for conditioning; the scale is folded back into W and b at the end.
    mu, sd = X.mean(0), X.std(0, unbiased=False).clamp_min(1e-12)
    Z = (X - mu) / sd
    W = torch.zeros(num_classes, X.shape[1], dtype=X.dtype, requires_grad=True)
    b = torch.zeros(num_classes, dtype=X.dtype, requires_grad=True)
    opt = torch.optim.LBFGS([W, b], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-10, tolerance_change=1e-12)

    def closure() -> Tensor:
        opt.zero_grad()
        Wx = W / sd  # penalty on the weight in the original feature coordinates
        loss = F.cross_entropy(Z @ W.T + b, y) + l2 / 2 * Wx.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        weight = W / sd
        bias = b - weight @ mu
    if not (math.isfinite(float(weight.abs().max())) and math.isfinite(float(bias.abs().max()))):
        raise RuntimeError("the logistic-regression head fit produced non-finite weights")
    return HeadFit(weight.to(features.dtype), bias.to(features.dtype), float(l2))
