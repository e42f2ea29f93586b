"""Exactly damped inverse of a Kronecker factored block, ``(G ⊗ A + γI)⁻¹``, and its application to gradients.

With ``A = Q_A Λ_A Q_Aᵀ`` and ``G = Q_G Λ_G Q_Gᵀ`` (eigendecompositions in float64), a gradient ``V`` viewed as
``(out, in+1)`` maps to ``Q_G [(Q_Gᵀ V Q_A) / (λ_G λ_Aᵀ + γ)] Q_Aᵀ``: the exact inverse of the damped Kronecker
product, not the factored ``(G + √γI)⁻¹ V (A + √γI)⁻¹`` heuristic. EKFAC keeps the eigenbases and replaces
``λ_G λ_Aᵀ`` by corrected eigenvalues ``s`` (:mod:`lqf_exp.precond.ekfac`): :meth:`KroneckerInverse.with_eigenvalues`.
When few ``s`` exceed ``1e-12·γ`` (rank-deficient factors) the product is applied in an exact low-rank form that
rotates only those eigen-directions (:mod:`lqf_exp.precond.eigenbasis`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from lqf_exp.precond.eigenbasis import Form, Plan, flush_tiny, make_form, make_plan


def check_damping(damping: float) -> float:
    """Return ``damping`` as a float, or raise if it is not finite and > 0."""
    try:
        value = float(damping)
    except (TypeError, ValueError) as err:
        raise ValueError(f"K-FAC damping must be a number > 0, got {damping!r}") from err
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"K-FAC damping must be finite and > 0 (the factors can be singular), got {damping!r}")
    return value


def _eigh_psd(M: Tensor) -> tuple[Tensor, Tensor]:
    """Eigendecomposition of a PSD factor in float64. Low-rank factors (fewer samples than dimensions, e.g. a
    late conv layer on small images) have a cluster of zero eigenvalues on which LAPACK can fail to converge;
    then a jitter of 1e-12·max(diag), far below any damping, is added to the diagonal."""
    M = M.to(torch.float64)
    try:
        return torch.linalg.eigh(M)
    except torch.linalg.LinAlgError:
        jitter = 1e-12 * float(M.diagonal().abs().max().clamp_min(1e-300))
        return torch.linalg.eigh(M + jitter * torch.eye(M.shape[0], dtype=M.dtype, device=M.device))


class KroneckerInverse:
    """``(Q_G ⊗ Q_A) diag(s + γ)⁻¹ (Q_G ⊗ Q_A)ᵀ`` acting on ``V`` of shape ``(out, in+1)`` (row-major flattening of
    W̃ = (W b)); ``s = λ_G λ_Aᵀ`` gives K-FAC's ``(G ⊗ A + γI)⁻¹``, corrected eigenvalues give EKFAC.

    The eigendecompositions are computed once; :meth:`with_damping` re-scales for another γ and
    :meth:`with_eigenvalues` for other eigenvalues without redoing them. ``eigenvalues`` (float64, ``(out, in+1)``)
    holds ``s``; with ``Q_A``/``Q_G`` (in ``dtype``) it is the whole state. :meth:`apply` uses the exact low-rank form
    of :mod:`.eigenbasis` when it takes fewer multiply-adds (``low_rank=False`` forces the full form, e.g. as the
    reference in benchmarks); its tensors are cast to each gradient dtype/device once and cached, so that steady-state
    applies copy nothing. The cache is rebuilt after :meth:`with_damping`/:meth:`with_eigenvalues` (the kept
    eigen-directions depend on γ and ``s``), the bases cast to another dtype are kept.
    """

    def __init__(self, A: Tensor, G: Tensor, damping: float, dtype: torch.dtype | None = None,
                 low_rank: bool = True) -> None:
        dtype = dtype or A.dtype
        lam_A, Q_A = _eigh_psd(A)
        lam_G, Q_G = _eigh_psd(G)
        # The factors are PSD; round-off can make tiny eigenvalues negative. The cast bases are ours to flush in place.
        Q_A, Q_G = (flush_tiny(Q.to(dtype), inplace=True) for Q in (Q_A, Q_G))
        self._set(Q_A, Q_G, torch.outer(lam_G.clamp(min=0.0), lam_A.clamp(min=0.0)), damping, low_rank)

    @classmethod
    def from_eigenbasis(
        cls, Q_A: Tensor, Q_G: Tensor, eigenvalues: Tensor, damping: float, dtype: torch.dtype | None = None,
        low_rank: bool = True,
    ) -> KroneckerInverse:
        """The inverse with given eigenvectors and eigenvalues ``s`` (``(out, in+1)``), e.g. restored EKFAC
        corrections with the very bases they were computed in (a fresh ``eigh`` may pick another basis inside a
        degenerate eigenspace, where the corrections would not apply)."""
        dtype = dtype or Q_A.dtype
        inverse = cls.__new__(cls)
        inverse._set(Q_A.to(dtype), Q_G.to(dtype), _check_eigenvalues(eigenvalues, Q_A, Q_G), damping, low_rank)
        return inverse

    def _set(self, Q_A: Tensor, Q_G: Tensor, eigenvalues: Tensor, damping: float, low_rank: bool) -> None:
        self.Q_A, self.Q_G = Q_A, Q_G
        self.eigenvalues = eigenvalues.to(torch.float64)
        self._low_rank = bool(low_rank)
        self._bases: dict[tuple[torch.dtype, torch.device], tuple[Tensor, Tensor]] = {}  # (Q_A, Q_G) cast
        self.with_damping(damping)

    def with_damping(self, damping: float) -> KroneckerInverse:
        """This inverse with another damping γ (same eigenbases)."""
        self.damping = check_damping(damping)
        self._plan: Plan | None = None
        self._forms: dict[tuple[torch.dtype, torch.device], Form] = {}
        return self

    def with_eigenvalues(self, eigenvalues: Tensor) -> KroneckerInverse:
        """This inverse with eigenvalues ``s`` (``(out, in+1)``, ≥ 0) in the same eigenbases: EKFAC's correction."""
        self.eigenvalues = _check_eigenvalues(eigenvalues, self.Q_A, self.Q_G)
        return self.with_damping(self.damping)

    @property
    def scale(self) -> Tensor:
        """``1/(s + γ)`` in the bases' dtype (computed on request; :meth:`apply` uses its cached forms)."""
        return (1.0 / (self.eigenvalues + self.damping)).to(self.Q_A.dtype)

    @property
    def plan(self) -> Plan:
        """The form :meth:`apply` uses at this damping: kept eigen-directions (``rank``) and multiply-adds."""
        if self._plan is None:
            self._plan = make_plan(self.eigenvalues, self.damping, self._low_rank)
        return self._plan

    def form(self, dtype: torch.dtype, device: torch.device) -> Form:
        """:attr:`plan`'s tensors in ``dtype`` on ``device``, built at the first call and cached."""
        key = (dtype, torch.device(device))
        if key not in self._forms:
            if key not in self._bases:
                # a fresh cast is flushed in place; the stored bases (same dtype/device) are copied only if they
                # hold tiny entries (bases restored from an old checkpoint)
                Q_A, Q_G = (Q.to(device=device, dtype=dtype) for Q in (self.Q_A, self.Q_G))
                self._bases[key] = (flush_tiny(Q_A, inplace=Q_A is not self.Q_A),
                                    flush_tiny(Q_G, inplace=Q_G is not self.Q_G))
            self._forms[key] = make_form(self.plan, *self._bases[key], self.eigenvalues, self.damping)
        return self._forms[key]

    def apply(self, V: Tensor) -> Tensor:
        """Return ``(Q_G ⊗ Q_A) diag(s + γ)⁻¹ (Q_G ⊗ Q_A)ᵀ rvec(V)`` reshaped like ``V`` (``(..., out, in+1)``)."""
        return self.form(V.dtype, V.device).apply(V)


def _check_eigenvalues(eigenvalues: Tensor, Q_A: Tensor, Q_G: Tensor) -> Tensor:
    """``eigenvalues`` as float64 on the bases' device, or a ValueError if the shape or a value is wrong."""
    expected = (Q_G.shape[0], Q_A.shape[0])
    if tuple(eigenvalues.shape) != expected:
        raise ValueError(f"eigenvalues must have shape (out, in[+1]) = {expected}, got {tuple(eigenvalues.shape)}")
    values = eigenvalues.detach().to(device=Q_A.device, dtype=torch.float64)
    if not bool(torch.isfinite(values).all()) or bool((values < 0).any()):
        raise ValueError(f"eigenvalues must be finite and >= 0, got min {values.min().item()!r}, "
                         f"max {values.max().item()!r}")
    return values


def join_layer(weight: Tensor, bias: Tensor | None) -> Tensor:
    """A layer's (weight, bias) tensors as one ``(out, in+1)`` matrix W̃ = (W b) (``(out, in)`` without bias)."""
    V = weight.reshape(weight.shape[0], -1)
    return V if bias is None else torch.cat([V, bias.reshape(-1, 1)], dim=1)


def split_layer(P: Tensor, weight_shape: torch.Size, bias: bool) -> tuple[Tensor, Tensor | None]:
    """Inverse of :func:`join_layer`."""
    n_w = P.shape[1] - int(bias)
    return P[:, :n_w].reshape(weight_shape).contiguous(), (P[:, n_w].contiguous() if bias else None)


def joint_grad(weight: Tensor, bias: Tensor | None) -> Tensor | None:
    """The gradient of W̃ = (W b) as ``(out, in+1)``; ``None`` when neither tensor has a gradient."""
    if weight.grad is None and (bias is None or bias.grad is None):
        return None
    gw = weight.grad if weight.grad is not None else torch.zeros_like(weight)
    gb = None if bias is None else (bias.grad if bias.grad is not None else torch.zeros_like(bias))
    return join_layer(gw, gb)


@torch.no_grad()
def precondition_layer(inverse: KroneckerInverse, weight: Tensor, bias: Tensor | None) -> bool:
    """Replace the ``.grad`` of ``weight``/``bias`` by the preconditioned gradient; False if there was none."""
    V = joint_grad(weight, bias)
    if V is None:
        return False
    weight.grad, bias_grad = split_layer(inverse.apply(V), weight.shape, bias is not None)
    if bias is not None:
        bias.grad = bias_grad
    return True


def factor_dims(module: nn.Module, with_bias: bool) -> tuple[int, int]:
    """``(dim A, dim G)`` of a ``Linear``/``Conv2d`` layer."""
    if isinstance(module, nn.Linear):
        return module.in_features + int(with_bias), module.out_features
    if isinstance(module, nn.Conv2d):
        return module.in_channels * math.prod(module.kernel_size) + int(with_bias), module.out_channels
    raise TypeError(f"K-FAC handles nn.Linear and nn.Conv2d only, got {type(module).__name__}")


def memory_bytes(network: nn.Module, bytes_per_element: int = 4) -> dict[str, int]:
    """Bytes held by the factors and by the inverse (eigenvectors + scale) of every Linear/Conv2d layer."""
    factors = inverse = 0
    for module in network.modules():
        if isinstance(module, nn.Linear | nn.Conv2d):
            dA, dG = factor_dims(module, module.bias is not None)
            factors += dA * dA + dG * dG
            inverse += dA * dA + dG * dG + dA * dG
    return {"factors": factors * bytes_per_element, "inverse": inverse * bytes_per_element}
