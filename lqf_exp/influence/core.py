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

__all__ = ["Influence", "exact_influence", "preconditioned_influence"]

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


def _flat(jacobian: Tensor) -> Tensor:
    return jacobian.reshape(-1, jacobian.shape[-1])


def exact_influence(train_jacobian: Tensor, residual: Tensor, eval_jacobian: Tensor, weight_decay: float,
                    gram_dtype: torch.dtype = torch.float64) -> Influence:
    """Exact influence through the dual system.

    Args:
        train_jacobian: ``[N, C, P]`` Jacobians of the training samples at w0.
        residual: ``[N, C]`` prediction errors ``e`` of the training samples at the run's δ.
        eval_jacobian: ``[M, C, P]`` Jacobians of the evaluation inputs.
        weight_decay: λ of the objective (> 0).
        gram_dtype: dtype of the two Gram products ``JJᵀ`` and ``J_xJᵀ`` (float32 halves their cost on large
            problems); the solves are always float64.
    """
    N, C, _ = train_jacobian.shape
    mu = N * float(weight_decay) / 2
    if mu <= 0:
        raise ValueError(f"influence needs weight_decay > 0, got {weight_decay!r}")
    rows, eval_rows = _flat(train_jacobian).to(gram_dtype), _flat(eval_jacobian).to(gram_dtype)
    kernel = (rows @ rows.T).double()
    cross = (eval_rows @ rows.T).double()
    kernel.diagonal().add_(mu)
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(kernel))  # (K + μI)⁻¹
    del kernel
    blocks = inverse.view(N, C, N, C).diagonal(dim1=0, dim2=2).permute(2, 0, 1)  # [(K + μI)⁻¹]_ii
    eye = torch.eye(C, dtype=torch.float64)
    leverage = eye - mu * blocks  # S = K(K + μI)⁻¹ = I − μ(K + μI)⁻¹
    e = residual.double()
    loo = torch.linalg.solve(mu * blocks, e[..., None])[..., 0]
    # J_x A⁻¹ J_iᵀ ẽ_i = J_x Jᵀ (K + μI)⁻¹ [:, rows of i] ẽ_i
    weights = torch.einsum("rnc,nc->rn", inverse.view(N * C, N, C), loo)
    change = (cross @ weights).view(-1, C, N).permute(2, 0, 1)
    return Influence(change.contiguous(), leverage, e, loo)


def preconditioned_influence(train_chunks: Iterable[tuple[Tensor, Tensor]], num_train: int, eval_jacobian: Tensor,
                             hessian_inverse: RowOperator) -> Influence:
    """Influence with ``A⁻¹ ≈ (2/N)·hessian_inverse``, one chunk of training samples at a time.

    Args:
        train_chunks: ``(J [B, C, P], e [B, C])`` for consecutive chunks of the N training samples.
        num_train: N (the objective's mean is over all of them).
        eval_jacobian: ``[M, C, P]`` Jacobians of the evaluation inputs.
        hessian_inverse: maps rows ``[K, P]`` to ``H⁻¹`` applied to each row (K-FAC: the run's preconditioner).
    """
    scale = 2.0 / num_train
    eval_rows = _flat(eval_jacobian)
    changes, leverages, residuals, loos = [], [], [], []
    for jacobian, residual in train_chunks:
        B, C, P = jacobian.shape
        solved = hessian_inverse(jacobian.reshape(B * C, P)).reshape(B, C, P)  # H⁻¹J_iᵀ, column by column
        leverage = scale * torch.einsum("bcp,bdp->bcd", jacobian.to(solved), solved).double()
        e = residual.double()
        loo = torch.linalg.solve(torch.eye(C, dtype=torch.float64) - leverage, e[..., None])[..., 0]
        direction = scale * torch.einsum("bcp,bc->bp", solved, loo.to(solved))  # A⁻¹J_iᵀẽ_i
        change = (eval_rows.to(direction) @ direction.T).double()  # [MC, B]
        changes.append(change.view(-1, C, B).permute(2, 0, 1))
        leverages.append(leverage)
        residuals.append(e)
        loos.append(loo)
    if not changes:
        raise ValueError("preconditioned_influence got no training samples")
    return Influence(torch.cat(changes).contiguous(), torch.cat(leverages), torch.cat(residuals), torch.cat(loos))
