"""The LQF quadratic in its dual (empirical NTK) form: exact solution, leave-one-out and λ selection.

With the stacked Jacobian ``J`` (rows ``(n, c)``, ``NC × P``) and residual ``r = α·Y − f0(X)`` (``NC``), the MSE
objective ``(1/N)‖r − Jδ‖² + (λ/2)‖δ‖²`` is minimized by ``δ* = Jᵀu`` with ``(K + μI) u = r``, ``K = JJᵀ`` and
``μ = Nλ/2``: kernel ridge regression. One eigendecomposition ``K = U diag(s) Uᵀ`` gives the solution, the hat
matrix ``S = K(K + μI)⁻¹`` and hence the exact leave-one-out residuals for every μ. Leaving sample ``n`` out removes
its C rows; its left-out residual is ``(I − S_nn)⁻¹ e_n`` with ``S_nn`` the C×C diagonal block of S and ``e = r − Sr``.
Convention: the penalty of the full problem is kept (the sum form ``Σ_n ℓ_n + μ‖δ‖²``), as the paper's sum-form
objective does; with the mean form the left-out problem would have μ·(N−1)/N.

When the head was itself fitted on the same data by ridge regression (the probe head of LQF, a linear smoother
with hat matrix ``H`` acting on each class), leaving a sample out must refit the head as well, or the sample vouches
for itself through it. That two-stage estimate has an exact closed form too (``prior_hat=H``): the head's left-out
residual is ``e^h_n = r_n/(1 − H_nn)`` (``r = (I − H)Y``), the head fitted without n moves the other residuals by
``H_{:,n} e^h_n``, and the kernel stage's left-out prediction of those is ``(I − S_nn)⁻¹([Sr]_n − S_nn r_n +
(B_n − S_nn H_nn) e^h_n)`` with ``B_n`` the n-th diagonal block of ``S(H ⊗ I)``. (The Jacobian is taken at the
head fitted on all samples, as the solve itself does.)

Two routes to the same blocks: :meth:`DualSystem.loo_residuals` through the eigendecomposition (one factorization
for a whole λ grid), :meth:`DualSystem.leave_one_out` through one Cholesky factorization at one λ, for errors ``e``
given from outside (influence: the errors at a run's δ) and with the moves of the optimum ``δ* − δ*₋ₙ``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["DualLeaveOneOut", "DualSystem", "LambdaChoice"]


@dataclass
class LambdaChoice:
    """The λ picked by leave-one-out, with the whole path (for logs and plots)."""

    weight_decay: float
    grid: list[float]
    loo_errors: list[float]
    loo_accuracy: list[float]


@dataclass
class DualLeaveOneOut:
    """Leave-one-out at one λ (see :meth:`DualSystem.leave_one_out`); float64.

    Attributes:
        directions: ``[N, P]``, the move of the optimum ``δ* − δ*₋ₙ = Jᵀ(K + μI)⁻¹[:, rows of n] ẽ_n``.
        leverage: ``[N, C, C]``, the diagonal blocks ``S_nn`` of the hat matrix.
        loo_residual: ``[N, C]``, ``ẽ_n = (I − S_nn)⁻¹ e_n``.
    """

    directions: Tensor
    leverage: Tensor
    loo_residual: Tensor


class DualSystem:
    """``K = JJᵀ`` and ``r`` of one LQF problem (float64), with its eigendecomposition computed on first use.

    Args:
        jacobian: ``[N, C, P]`` per-sample Jacobians with respect to δ at w0.
        residual: ``[N, C]`` targets minus the outputs at the linearization point, ``α·onehot − f(x; δ=0)``.
        gram_dtype: dtype of the product ``JJᵀ`` (then float64). Keep float64 unless μ is large against float32
            rounding of K: on digits (λ = 1e-3) a float32 Gram is not positive definite after adding μI.
    """

    def __init__(self, jacobian: Tensor, residual: Tensor, gram_dtype: torch.dtype = torch.float64) -> None:
        N, C, P = jacobian.shape
        if residual.shape != (N, C):
            raise ValueError(f"residual must be {(N, C)}, got {tuple(residual.shape)}")
        self.N, self.C = N, C
        rows = jacobian.reshape(N * C, P).to(torch.float64)
        self.rows = rows
        self.kernel = (rows.to(gram_dtype) @ rows.to(gram_dtype).T).double()
        self.residual = residual.reshape(-1).to(torch.float64)
        self._eig: tuple[Tensor, Tensor] | None = None
        self._prior_cache: tuple[Tensor, Tensor] | None = None

    def ridge(self, weight_decay: float) -> float:
        """``μ = Nλ/2``."""
        return self.N * float(weight_decay) / 2

    @property
    def eig(self) -> tuple[Tensor, Tensor]:
        if self._eig is None:
            s, U = torch.linalg.eigh(self.kernel)
            self._eig = (s.clamp_min(0.0), U)
        return self._eig

    def solve(self, weight_decay: float) -> tuple[Tensor, Tensor]:
        """``(δ*, u)``: the optimum (flat, ``[P]``) and the dual coefficients (``[NC]``) by a Cholesky solve."""
        mu = self.ridge(weight_decay)
        if mu <= 0:
            raise ValueError("the dual solve needs λ > 0 (the kernel can be singular)")
        system = self.kernel + mu * torch.eye(self.kernel.shape[0], dtype=self.kernel.dtype, device=self.kernel.device)
        factor, info = torch.linalg.cholesky_ex(system)
        if int(info) != 0:
            s, U = self.eig
            u = U @ ((U.T @ self.residual) / (s + mu))
        else:
            u = torch.cholesky_solve(self.residual[:, None], factor)[:, 0]
        return self.rows.T @ u, u

    def gradient(self, weight_decay: float, delta: Tensor) -> Tensor:
        """``∇L(δ) = (2/N) Jᵀ(Jδ − r) + λδ`` (float64, ``[P]``) of the mean-form objective from the stored rows: the
        certificate of a solution, with no network pass."""
        delta = delta.to(self.rows)
        return (2.0 / self.N) * (self.rows.T @ (self.rows @ delta - self.residual)) + float(weight_decay) * delta

    def objective(self, weight_decay: float, u: Tensor) -> float:
        """``L(δ*)`` from the dual coefficients: the residual at the optimum is ``μu``, ``‖δ*‖² = uᵀKu``."""
        mu = self.ridge(weight_decay)
        data = float((mu * u).pow(2).sum()) / self.N
        return data + 0.5 * float(weight_decay) * float(u @ (self.kernel @ u))

    def hat_matrix(self, weight_decay: float) -> Tensor:
        s, U = self.eig
        return (U * (s / (s + self.ridge(weight_decay)))) @ U.T

    def _hat_blocks(self, shrink: Tensor, right: Tensor) -> Tensor:
        """The N diagonal C×C blocks of ``U diag(shrink) right`` (``right``: ``[NC, NC]``) without forming it."""
        N, C = self.N, self.C
        U = self.eig[1]
        return torch.einsum("ncm,m,mnd->ncd", U.view(N, C, -1), shrink, right.view(-1, N, C))

    def _prior_rotated(self, prior_hat: Tensor) -> Tensor:
        """``Uᵀ(H ⊗ I_C)`` (``[NC, NC]``), the same for every λ: cached per prior."""
        if self._prior_cache is not None and self._prior_cache[0] is prior_hat:
            return self._prior_cache[1]
        U = self.eig[1]
        N, C = self.N, self.C
        rotated = torch.einsum("mkc,kn->mnc", U.T.reshape(-1, N, C), prior_hat.to(U)).reshape(N * C, N * C)
        self._prior_cache = (prior_hat, rotated)
        return rotated

    def loo_residuals(self, weight_decay: float, prior_hat: Tensor | None = None) -> Tensor:
        """Exact leave-one-out residuals ``[N, C]`` (block form over the C outputs of each sample).

        ``prior_hat`` (``[N, N]``, optional): the hat matrix of a ridge head fitted on the same samples, acting on
        every output alike (see the module docstring). Only the diagonal blocks of the hat matrices are formed, so a
        λ costs O((NC)²·C) after the one eigendecomposition, not O((NC)³).
        """
        N, C = self.N, self.C
        s, U = self.eig
        shrink = s / (s + self.ridge(weight_decay))
        eye = torch.eye(C, dtype=U.dtype, device=U.device)
        blocks = self._hat_blocks(shrink, U.T)
        fitted = (U @ (shrink * (U.T @ self.residual))).view(N, C)
        r = self.residual.view(N, C)
        if prior_hat is None:
            return torch.linalg.solve(eye - blocks, (r - fitted)[..., None])[..., 0]
        prior = prior_hat.to(U)
        head_loo = r / (1.0 - prior.diagonal())[:, None]
        cross = self._hat_blocks(shrink, self._prior_rotated(prior_hat)) - blocks * prior.diagonal()[:, None, None]
        moved = fitted - (blocks @ r[..., None])[..., 0] + (cross @ head_loo[..., None])[..., 0]
        return head_loo - torch.linalg.solve(eye - blocks, moved[..., None])[..., 0]

    def leave_one_out(self, weight_decay: float, errors: Tensor | None = None) -> DualLeaveOneOut:
        """Exact leave-one-out at one λ by a Cholesky factorization of ``K + μI`` (cheaper than :attr:`eig`).

        ``errors`` (``[N, C]``): the prediction errors ``e`` to leave out from; by default those of the exact optimum,
        ``e = r − Ku = μu``. The blocks come from ``S = I − μ(K + μI)⁻¹``, so ``I − S_nn = μ[(K + μI)⁻¹]_nn`` is
        formed without the cancellation of ``I − S_nn`` when ``S_nn ≈ I``.
        """
        N, C = self.N, self.C
        mu = self.ridge(weight_decay)
        if mu <= 0:
            raise ValueError(f"leave-one-out needs weight_decay > 0, got {weight_decay!r}")
        if errors is None:
            errors = mu * self.solve(weight_decay)[1].view(N, C)
        shifted = self.kernel.clone()
        shifted.diagonal().add_(mu)
        inverse = torch.cholesky_inverse(torch.linalg.cholesky(shifted))  # (K + μI)⁻¹
        del shifted
        blocks = inverse.view(N, C, N, C).diagonal(dim1=0, dim2=2).permute(2, 0, 1)  # [(K + μI)⁻¹]_nn
        leverage = torch.eye(C, dtype=torch.float64, device=blocks.device) - mu * blocks
        e = errors.to(torch.float64)
        loo = torch.linalg.solve(mu * blocks, e[..., None])[..., 0]
        weights = torch.einsum("rnc,nc->nr", inverse.view(N * C, N, C), loo)  # [N, NC]
        return DualLeaveOneOut(weights @ self.rows, leverage, loo)

    def select_weight_decay(self, grid: list[float], targets: Tensor, prior_hat: Tensor | None = None
                            ) -> LambdaChoice:
        """The λ of ``grid`` with the smallest leave-one-out error ``mean_n ‖e_n^{loo}‖²``.

        ``targets`` (``[N, C]``, the α·onehot rows) give the left-out predictions ``targets − e^{loo}`` whose
        accuracy is recorded alongside (ties in the error go to the larger λ).
        """
        errors, accuracy = [], []
        labels = targets.argmax(dim=1)
        for weight_decay in grid:
            loo = self.loo_residuals(weight_decay, prior_hat)
            errors.append(float(loo.pow(2).sum(dim=1).mean()))
            accuracy.append(float(((targets.to(loo) - loo).argmax(dim=1) == labels).double().mean()))
        best = min(range(len(grid)), key=lambda i: (errors[i], -grid[i]))
        return LambdaChoice(float(grid[best]), [float(g) for g in grid], errors, accuracy)
