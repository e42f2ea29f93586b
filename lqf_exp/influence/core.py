"""Leave-one-out influence of every training sample on the predictions of a solved LQF problem (paper §3.4).

The objective is ``L(δ) = (1/N) Σ_n ‖r_n − J_n δ‖² + (λ/2)‖δ‖²`` (``r_n = α·y_n − f(x_n; w0)``, ``J_n`` the C×P
Jacobian at w0). In sum form its normal matrix is ``A = JᵀJ + μI`` with ``μ = Nλ/2``, i.e. ``A = (N/2)·H`` with
``H`` the Hessian of L. Leaving sample i out (the penalty μ kept, as :mod:`lqf_exp.solvers.dual` does) moves the
optimum by ``δ* − δ*₋ᵢ = A⁻¹J_iᵀ(I − S_ii)⁻¹e_i`` (Sherman–Morrison–Woodbury), where ``e_i = r_i − J_iδ*`` is the
prediction error of sample i and ``S_ii = J_iA⁻¹J_iᵀ`` its C×C leverage block. Hence, for any input x,

    f_δ*(x) − f_δ*₋ᵢ(x) = J_x A⁻¹ J_iᵀ ẽ_i,    ẽ_i = (I − S_ii)⁻¹ e_i  (the leave-one-out residual of sample i).

This is the paper's eq. 8 with the prediction-error factor that its eq. 7 omits, in block form over the C outputs.
``A⁻¹`` comes from

- :func:`exact_influence`: the dual (kernel) system ``A⁻¹Jᵀ = Jᵀ(K + μI)⁻¹``, ``K = JJᵀ``: exact, NC × NC;
- :func:`preconditioned_influence`: any operator approximating ``H⁻¹`` on rows of P-vectors, e.g. the K-FAC
  inverse that trained the run (``(F + λI)⁻¹`` with ``F`` the Gauss–Newton part of H); then ``A⁻¹ = (2/N)H⁻¹``.

At x = x_i the change is ``S_ii ẽ_i`` (self-influence); a sample whose prediction error e_i is zero has no
influence anywhere. The linearization point (w0 with its probe head) is held fixed: the head is not refitted.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

from lqf_exp.solvers.dual import DualSystem

__all__ = ["Influence", "LeaveOneOut", "exact_influence", "exact_leave_one_out", "preconditioned_influence",
           "preconditioned_leave_one_out"]

RowOperator = Callable[[Tensor], Tensor]  # [K, P] rows -> [K, P] rows


@dataclass
class Influence:
    """The leave-one-out effect of each of N training samples on M evaluation inputs (C outputs each).

    Attributes:
        change: ``[N, M, C]``, ``f_w(x_m) − f_w₋ᵢ(x_m)`` for training sample i (float64).
        leverage: ``[N, C, C]``, the blocks ``S_ii``.
        residual: ``[N, C]``, the prediction errors ``e_i = α·y_i − f_w(x_i)``.
        loo_residual: ``[N, C]``, ``ẽ_i = (I − S_ii)⁻¹ e_i``, the error on sample i of the model trained without it.
    """

    change: Tensor
    leverage: Tensor
    residual: Tensor
    loo_residual: Tensor

    @property
    def informativeness(self) -> Tensor:
        """F-SI (eq. 9): the mean over the evaluation inputs of ``‖f_w(x) − f_w₋ᵢ(x)‖²``, ``[N]``."""
        return self.change.pow(2).sum(dim=2).mean(dim=1)

    @property
    def self_influence(self) -> Tensor:
        """``‖f_w(x_i) − f_w₋ᵢ(x_i)‖² = ‖S_ii ẽ_i‖²``, ``[N]``."""
        return (self.leverage @ self.loo_residual[..., None])[..., 0].pow(2).sum(dim=1)

    @property
    def leverage_trace(self) -> Tensor:
        """``tr S_ii``: how much of sample i's own fit it pays for itself (0 … C), ``[N]``."""
        return self.leverage.diagonal(dim1=1, dim2=2).sum(dim=1)


@dataclass
class LeaveOneOut:
    """For each of N training samples, the move of the optimum when it is left out (paper eq. 7 with its ``e_i``).

    Attributes:
        directions: ``[N, P]``, ``δ* − δ*₋ᵢ = A⁻¹J_iᵀẽ_i`` (float64).
        leverage, residual, loo_residual: as in :class:`Influence`.
    """

    directions: Tensor
    leverage: Tensor
    residual: Tensor
    loo_residual: Tensor

    def change(self, eval_jacobian: Tensor) -> Tensor:
        """``[N, M, C]``: ``J_x(δ* − δ*₋ᵢ)`` for the M inputs of ``eval_jacobian`` (``[M, C, P]``)."""
        M, C, _ = eval_jacobian.shape
        flat = _flat(eval_jacobian).to(self.directions.dtype) @ self.directions.T  # [MC, N]
        return flat.view(M, C, -1).permute(2, 0, 1).contiguous()

    def influence(self, eval_jacobian: Tensor) -> Influence:
        return Influence(self.change(eval_jacobian), self.leverage, self.residual, self.loo_residual)


def _flat(jacobian: Tensor) -> Tensor:
    return jacobian.reshape(-1, jacobian.shape[-1])


def exact_leave_one_out(train_jacobian: Tensor, residual: Tensor, weight_decay: float,
                        gram_dtype: torch.dtype = torch.float64) -> LeaveOneOut:
    """Exact leave-one-out through the dual system (:meth:`lqf_exp.solvers.dual.DualSystem.leave_one_out`, the one
    implementation, which λ selection's leave-one-out shares).

    Args:
        train_jacobian: ``[N, C, P]`` Jacobians of the training samples at w0.
        residual: ``[N, C]`` prediction errors ``e`` of the training samples at the run's δ.
        weight_decay: λ of the objective (> 0).
        gram_dtype: dtype of the Gram product ``JJᵀ``; the solve and the directions are float64 (see
            :class:`~lqf_exp.solvers.dual.DualSystem`).
    """
    if not weight_decay > 0:
        raise ValueError(f"influence needs weight_decay > 0, got {weight_decay!r}")
    # The errors stand in for the system's right-hand side: only its kernel and leave-one-out blocks are used.
    loo = DualSystem(train_jacobian, residual, gram_dtype).leave_one_out(weight_decay, errors=residual)
    return LeaveOneOut(loo.directions, loo.leverage, residual.double(), loo.loo_residual)


def preconditioned_leave_one_out(train_chunks: Iterable[tuple[Tensor, Tensor]], num_train: int,
                                 hessian_inverse: RowOperator) -> LeaveOneOut:
    """Leave-one-out with ``A⁻¹ ≈ (2/N)·hessian_inverse``, one chunk of training samples at a time.

    Args:
        train_chunks: ``(J [B, C, P], e [B, C])`` for consecutive chunks of the N training samples.
        num_train: N (the objective's mean is over all of them).
        hessian_inverse: maps rows ``[K, P]`` to ``H⁻¹`` applied to each row (K-FAC: the run's preconditioner).
    """
    scale = 2.0 / num_train
    directions, leverages, residuals, loos = [], [], [], []
    for jacobian, residual in train_chunks:
        B, C, P = jacobian.shape
        solved = hessian_inverse(jacobian.reshape(B * C, P)).reshape(B, C, P)  # H⁻¹J_iᵀ, column by column
        leverage = scale * torch.einsum("bcp,bdp->bcd", jacobian.to(solved), solved).double()
        e = residual.double()
        loo = torch.linalg.solve(torch.eye(C, dtype=torch.float64) - leverage, e[..., None])[..., 0]
        directions.append(scale * torch.einsum("bcp,bc->bp", solved.double(), loo))  # A⁻¹J_iᵀẽ_i
        leverages.append(leverage)
        residuals.append(e)
        loos.append(loo)
    if not directions:
        raise ValueError("preconditioned_leave_one_out got no training samples")
    return LeaveOneOut(torch.cat(directions), torch.cat(leverages), torch.cat(residuals), torch.cat(loos))


def exact_influence(train_jacobian: Tensor, residual: Tensor, eval_jacobian: Tensor, weight_decay: float,
                    gram_dtype: torch.dtype = torch.float64) -> Influence:
    """:func:`exact_leave_one_out`, applied to the inputs of ``eval_jacobian`` (``[M, C, P]``)."""
    return exact_leave_one_out(train_jacobian, residual, weight_decay, gram_dtype).influence(eval_jacobian)


def preconditioned_influence(train_chunks: Iterable[tuple[Tensor, Tensor]], num_train: int, eval_jacobian: Tensor,
                             hessian_inverse: RowOperator) -> Influence:
    """:func:`preconditioned_leave_one_out`, applied to the inputs of ``eval_jacobian`` (``[M, C, P]``)."""
    return preconditioned_leave_one_out(train_chunks, num_train, hessian_inverse).influence(eval_jacobian)
