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
    "L2_GRID", "PROBE_L2_GRID", "HeadFit", "ValidatedHeadFit", "fit_head_on_validation", "fit_logistic_head",
    "fit_ridge_head", "ridge_hat_matrix", "ridge_head", "ridge_loo_errors", "select_ridge_l2",
]

# The log grid the leave-one-out choices search (penalty per sample, as in ``(l2/2)‖W‖²`` of a batch mean).
L2_GRID: tuple[float, ...] = tuple(10.0 ** (k / 2) for k in range(-12, 9))
# Coarser, for choices that need one fit per value (a logistic head has no closed-form path over l2).
PROBE_L2_GRID: tuple[float, ...] = tuple(10.0**k for k in range(-6, 3))


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
    if l2 <= 0:
        Wt = torch.linalg.lstsq(Xc, Tc, driver="gelsd").solution
    elif N < D:  # push-through: (XcᵀXc + μI)⁻¹Xcᵀ = Xcᵀ(XcXcᵀ + μI)⁻¹, an N×N system
        Wt = Xc.T @ torch.linalg.solve(Xc @ Xc.T + (N * l2 / 2) * torch.eye(N, dtype=Xc.dtype), Tc)
    else:
        Wt = torch.linalg.solve(Xc.T @ Xc + (N * l2 / 2) * torch.eye(D, dtype=Xc.dtype), Xc.T @ Tc)
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
    N, D = Xc.shape
    # H − 11ᵀ/N = U diag(s/(s+μ)) Uᵀ with U, s the eigenpairs of the N×N Gram XcXcᵀ; from the D×D side when D < N
    # (U = XcV/√s): the cost is that of the smaller of the two matrices (a 2080-wide bilinear head at a few shots).
    if N <= D:
        s, U = torch.linalg.eigh(Xc @ Xc.T)
    else:
        s, V = torch.linalg.eigh(Xc.T @ Xc)
        U = Xc @ V
    keep = s > 1e-12 * s.max().clamp_min(1e-300)  # null directions carry no fit and no leverage
    s, U = s[keep], U[:, keep]
    if N > D:
        U = U / s.sqrt()
    UtT = U.T @ Tc
    errors = []
    for l2 in grid:
        shrink = s / (s + N * float(l2) / 2)
        leverage = (U.pow(2) * shrink).sum(dim=1) + 1.0 / N
        residual = Tc - U @ (shrink[:, None] * UtT)
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
    if N <= D:  # push-through: Xc(XcᵀXc + μI)⁻¹Xcᵀ = K(K + μI)⁻¹, K = XcXcᵀ
        gram = Xc @ Xc.T
        return torch.linalg.solve(gram + (N * l2 / 2) * torch.eye(N, dtype=Xc.dtype), gram).T + 1.0 / N
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


@dataclass
class ValidatedHeadFit:
    """The head fitted with the ``l2`` of the lowest validation loss, and the loss of every ``l2`` tried."""

    fit: HeadFit
    curve: dict[float, float]


def fit_head_on_validation(
    fit: Callable[[float], HeadFit],
    validation_loss: Callable[[HeadFit], float],
    grid: tuple[float, ...] = PROBE_L2_GRID,
) -> ValidatedHeadFit:
    """Fit a head for every ``l2`` of ``grid`` (``fit(l2)``) and keep the one of lowest ``validation_loss``: the
    choice a demanding user makes for a probe, for any loss (the logistic head has no leave-one-out shortcut)."""
    if not grid:
        raise ValueError("the l2 grid of the head fit is empty")
    curve: dict[float, float] = {}
    best: HeadFit | None = None
    for l2 in grid:
        candidate = fit(float(l2))
        curve[float(l2)] = float(validation_loss(candidate))
        if best is None or curve[float(l2)] < curve[best.l2]:
            best = candidate
    assert best is not None
    return ValidatedHeadFit(best, curve)
