"""How :class:`~lqf_exp.precond.inverse.KroneckerInverse` applies ``(Q_G ⊗ Q_A) diag(s + γ)⁻¹ (Q_G ⊗ Q_A)ᵀ``: the
full form, or an exact low-rank form when most eigenvalues ``s`` are negligible against the damping γ.

Low-rank form. Keep the rows ``i`` of ``s`` (columns of ``Q_G``) with ``max_j s[i, j] > tol·γ`` and the columns
``j`` (of ``Q_A``) with ``max_i s[i, j] > tol·γ``; every entry outside the kept block has ``s ≤ tol·γ``. Treating
those entries (and the kept-block entries with ``s ≤ tol·γ``) as ``s = 0`` gives

    ``apply(V) = V/γ + Q_G,r [(Q_G,rᵀ V Q_A,r) ∘ c] Q_A,rᵀ``,  ``c = 1/(s_r + γ) − 1/γ = −s_r / (γ (s_r + γ))``,

with ``c`` computed in that cancellation-free form. Each eigen-coordinate of the result then has relative error
``s/γ ≤ tol``, so ``‖error‖ ≤ tol·‖exact result‖`` in exact arithmetic (the eigenbases are orthonormal). With
``tol = 1e-12`` this is far below float64 round-off of the full form, whose own relative error is about
``ε·(s_max + γ)/γ``; the two agree to ≤ 1e-10 relative whenever the full form itself is that accurate. It needs no
assumption on ``s`` beyond ``s ≥ 0``, so it covers K-FAC's ``λ_G λ_Aᵀ`` and EKFAC's corrected eigenvalues alike.
It is used only when its multiply-adds are fewer than the full form's: rank-deficient factors (late convolutions at
small resolution, few samples). For full-rank factors the full form is kept, so nothing is lost.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

LOW_RANK_TOL = 1e-12


def flush_limit(dtype: torch.dtype) -> float:
    """Magnitude below which entries are zeroed before a product: ``sqrt(tiny)``, so that products of two kept
    entries are never subnormal, where that is negligible at the dtype's precision (``< ε²``: float32 1e-19, bfloat16
    1e-19, float64 1e-154); float16's ``sqrt(tiny)`` is 8e-3, there only subnormals (< 6e-5) are zeroed."""
    info = torch.finfo(dtype)
    return info.tiny**0.5 if info.tiny**0.5 < info.eps**2 else info.tiny


def flush_tiny(Q: Tensor, inplace: bool = False) -> Tensor:
    """``Q`` with entries below :func:`flush_limit` set to zero (a copy only if there are any, unless ``inplace``).
    Eigenvectors of rank-deficient factors have entries like 1e-40 in float32: subnormal numbers, and products of two
    small normal ones are subnormal too, which x86 CPUs multiply ~7× slower (measured: 236 ms instead of 35 ms for
    one (512×2304)·(2304×2304) product). In float32, zeroing them moves a unit vector by < 1e-17."""
    limit = flush_limit(Q.dtype)
    tiny = (Q.abs() < limit) & (Q != 0)
    if not bool(tiny.any()):
        return Q
    return Q.masked_fill_(tiny, 0.0) if inplace else Q.masked_fill(tiny, 0.0)


def full_macs(d_out: int, d_in: int) -> int:
    """Multiply-adds of ``Q_G ((Q_Gᵀ V Q_A) ∘ scale) Q_Aᵀ`` for one ``(d_out, d_in)`` matrix ``V``."""
    return 2 * (d_out * d_out * d_in + d_out * d_in * d_in) + d_out * d_in


def _rotation_macs(d_out: int, d_in: int, r_out: int, r_in: int) -> tuple[int, int]:
    """Multiply-adds of ``Q_G,rᵀ V Q_A,r`` rotating the rows first, and the columns first."""
    return r_out * d_out * d_in + r_out * d_in * r_in, d_out * d_in * r_in + r_out * d_out * r_in


def low_rank_macs(d_out: int, d_in: int, r_out: int, r_in: int) -> int:
    """Multiply-adds of the low-rank form (rotation there and back in the cheaper order, scale, add ``V/γ``)."""
    return 2 * min(_rotation_macs(d_out, d_in, r_out, r_in)) + r_out * r_in + d_out * d_in


@dataclass(frozen=True)
class Plan:
    """Which form an apply uses for given eigenvalues and damping; ``rows``/``cols`` are the kept indices into
    ``Q_G``/``Q_A`` (float64 eigenvalues' device), ``None`` for the full form."""

    shape: tuple[int, int]  # (d_out, d_in)
    rows: Tensor | None
    cols: Tensor | None
    macs: int  # per (d_out, d_in) matrix
    tol: float = LOW_RANK_TOL

    @property
    def low_rank(self) -> bool:
        return self.rows is not None

    @property
    def rank(self) -> tuple[int, int]:
        """``(r_out, r_in)``: the eigen-directions that are rotated (all of them in the full form)."""
        return self.shape if self.rows is None or self.cols is None else (len(self.rows), len(self.cols))


def make_plan(eigenvalues: Tensor, damping: float, low_rank: bool = True, tol: float = LOW_RANK_TOL) -> Plan:
    """The cheaper exact form for float64 ``eigenvalues`` ``s`` (``(d_out, d_in)``) at damping γ."""
    d_out, d_in = eigenvalues.shape
    full = Plan((d_out, d_in), None, None, full_macs(d_out, d_in), tol)
    if not low_rank:
        return full
    big = eigenvalues > tol * damping
    rows, cols = big.any(dim=1).nonzero().flatten(), big.any(dim=0).nonzero().flatten()
    macs = low_rank_macs(d_out, d_in, len(rows), len(cols))
    return Plan((d_out, d_in), rows, cols, macs, tol) if macs < full.macs else full


@dataclass(frozen=True)
class Form:
    """A plan's tensors in one dtype and device: ``Q_G`` and ``Q_A`` (all or the kept columns) and the factor ``coef``
    (``1/(s+γ)`` in the full form, ``c`` in the low-rank form, where ``inv_gamma`` is ``1/γ``)."""

    Q_G: Tensor
    Q_A: Tensor
    coef: Tensor
    inv_gamma: float | None
    rows_first: bool  # rotate Q_G,rᵀ V before · Q_A,r (the cheaper order)

    def apply(self, V: Tensor) -> Tensor:
        """The damped inverse applied to ``V`` (``(..., d_out, d_in)``)."""
        if self.inv_gamma is not None and self.coef.numel() == 0:  # no eigenvalue above tol·γ: the inverse is I/γ
            return V * self.inv_gamma
        # subnormal products are slow on CPUs only, and not reached in float64
        z = _flush_products if self.Q_A.device.type == "cpu" and self.Q_A.dtype != torch.float64 else _same
        Q_G, Q_A = self.Q_G, self.Q_A
        if self.rows_first:  # the way back in the mirror order: the same multiply-adds as the rotation
            out = Q_G @ z(z(z(Q_G.T @ V) @ Q_A).mul_(self.coef) @ Q_A.T)
        else:
            out = z(Q_G @ z((Q_G.T @ z(V @ Q_A)).mul_(self.coef))) @ Q_A.T
        return out if self.inv_gamma is None else out.add_(V, alpha=self.inv_gamma)


def _same(t: Tensor) -> Tensor:
    return t


def _flush_products(t: Tensor) -> Tensor:
    """An intermediate product with entries below :func:`flush_limit` zeroed before it enters the next product: in
    float32 the rotated gradients of rank-deficient layers have entries like 1e-25 whose products are subnormal
    (resnet18's layer4.0.conv1 at 32 px: ~100 ms instead of ~33 ms per apply). One fused pass; in float32 an entry
    below 1e-19 is under the round-off of any gradient whose entries are not themselves that small."""
    return torch.nn.functional.hardshrink(t, flush_limit(t.dtype))


def _selector(index: Tensor) -> slice | Tensor:
    """A slice when the indices are contiguous (K-FAC: ``eigh``'s ascending eigenvalues make the kept ones a suffix),
    so that taking them is a view, not a copy; the indices otherwise (EKFAC)."""
    if len(index) and int(index[-1]) - int(index[0]) + 1 == len(index):
        return slice(int(index[0]), int(index[-1]) + 1)
    return index


def _take(M: Tensor, dim: int, sel: slice | Tensor) -> Tensor:
    if isinstance(sel, slice):
        return M[sel] if dim == 0 else M[:, sel]
    return M.index_select(dim, sel.to(M.device))


def make_form(plan: Plan, Q_A: Tensor, Q_G: Tensor, eigenvalues: Tensor, damping: float) -> Form:
    """``plan``'s tensors from bases already in the target dtype/device (float64 ``eigenvalues``, ``s ≥ 0``)."""
    dtype, device = Q_A.dtype, Q_A.device
    if plan.rows is None or plan.cols is None:
        return Form(Q_G, Q_A, (1.0 / (eigenvalues + damping)).to(device=device, dtype=dtype), None, True)
    rows, cols = _selector(plan.rows), _selector(plan.cols)
    s = _take(_take(eigenvalues, 0, rows), 1, cols)
    # c = -s/(γ(s+γ)) without the cancellation of 1/(s+γ) - 1/γ; entries with s <= tol·γ are dropped like those
    # outside the kept block (also keeps subnormal coefficients out of the products)
    coef = torch.where(s > plan.tol * damping, -s / (damping * (s + damping)), 0.0)
    d_out, d_in = plan.shape
    rows_first, cols_first = _rotation_macs(d_out, d_in, len(plan.rows), len(plan.cols))
    return Form(_take(Q_G, 1, rows), _take(Q_A, 1, cols), flush_tiny(coef.to(device=device, dtype=dtype)),
                1.0 / damping, rows_first <= cols_first)
