"""The exactly damped Kronecker inverse, damping validation, and gradient (de)assembly."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lqf_exp.precond import KroneckerInverse, memory_bytes, precondition_layer
from lqf_exp.precond.callback import KFACPreconditioner

DT = torch.float64


def psd(n: int, rank: int) -> torch.Tensor:
    X = torch.randn(n, rank, dtype=DT)
    return X @ X.T


@pytest.mark.parametrize("gamma", [1e-3, 1.0])
def test_exact_damped_inverse(gamma: float) -> None:
    torch.manual_seed(0)
    A, G = psd(5, 3), psd(4, 2)  # rank deficient: only the damping makes the block invertible
    V = torch.randn(4, 5, dtype=DT)
    P = KroneckerInverse(A, G, gamma).apply(V)
    # (G ⊗ A + γI) rvec(P) == rvec(V), in matrix form G P A + γ P == V
    torch.testing.assert_close(G @ P @ A + gamma * P, V, rtol=1e-10, atol=1e-10)
    dense = torch.linalg.solve(torch.kron(G, A) + gamma * torch.eye(20, dtype=DT), V.reshape(-1))
    torch.testing.assert_close(P.reshape(-1), dense, rtol=1e-9, atol=1e-9)


def test_inverse_casts_back_and_float32_apply() -> None:
    torch.manual_seed(0)
    A, G = psd(6, 6).float(), psd(3, 3).float()
    inv = KroneckerInverse(A, G, 1e-3)
    assert inv.Q_A.dtype == torch.float32 and inv.scale.dtype == torch.float32
    V = torch.randn(3, 6)
    ref = KroneckerInverse(A.double(), G.double(), 1e-3).apply(V.double())
    torch.testing.assert_close(inv.apply(V).double(), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bad", [0.0, -1e-3, math.nan, math.inf, "x", None])
def test_damping_must_be_positive(bad: object) -> None:
    with pytest.raises(ValueError, match="damping"):
        KroneckerInverse(torch.eye(2), torch.eye(2), bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="damping"):
        KFACPreconditioner(damping=bad)  # type: ignore[arg-type]


def test_precondition_layer_weight_bias_split() -> None:
    """W̃ = (W b): the bias is the last column; conv weights flatten as (out, in·kh·kw)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 2).double()
    A, G = psd(2 * 4 + 1, 9), psd(3, 3)
    conv.weight.grad, conv.bias.grad = torch.randn_like(conv.weight), torch.randn_like(conv.bias)
    V = torch.cat([conv.weight.grad.reshape(3, -1), conv.bias.grad[:, None]], dim=1)
    inv = KroneckerInverse(A, G, 0.1)
    assert precondition_layer(inv, conv.weight, conv.bias)
    P = inv.apply(V)
    torch.testing.assert_close(conv.weight.grad, P[:, :-1].reshape(conv.weight.shape))
    torch.testing.assert_close(conv.bias.grad, P[:, -1])
    lin = nn.Linear(3, 2, bias=False)
    assert not precondition_layer(KroneckerInverse(torch.eye(3), torch.eye(2), 1.0), lin.weight, None)


def test_memory_bytes() -> None:
    net = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.Linear(10, 4))
    dims = [(27, 8), (11, 4)]
    factors = sum(a * a + g * g for a, g in dims)
    assert memory_bytes(net) == {"factors": 4 * factors, "inverse": 4 * (factors + sum(a * g for a, g in dims))}


# -- the cached, exact low-rank application (lqf_exp.precond.eigenbasis) ----------------------------------------------
def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


def old_apply(inv: KroneckerInverse, V: torch.Tensor) -> torch.Tensor:
    """The formula before the low-rank form: four full products in the eigenbases."""
    return inv.Q_G @ ((inv.Q_G.T @ V @ inv.Q_A) * (1.0 / (inv.eigenvalues + inv.damping))) @ inv.Q_A.T


def dense_apply(inv: KroneckerInverse, V: torch.Tensor) -> torch.Tensor:
    """``(Q_G ⊗ Q_A) diag(s + γ)⁻¹ (Q_G ⊗ Q_A)ᵀ rvec(V)`` as one dense matrix (any s, EKFAC included)."""
    Q = torch.kron(inv.Q_G, inv.Q_A)
    return (Q @ ((Q.T @ V.reshape(-1)) / (inv.eigenvalues.reshape(-1) + inv.damping))).reshape(V.shape)


def ekfac_like(gamma: float) -> KroneckerInverse:
    """EKFAC-like: non-outer-product eigenvalues on non-contiguous kept rows {1, 5} and columns {2, 7, 19}; inside
    the kept block one exact zero and one 1e-20 (≤ tol·γ: dropped like the entries outside)."""
    Q_A, Q_G = torch.linalg.qr(torch.randn(30, 30, dtype=DT))[0], torch.linalg.qr(torch.randn(8, 8, dtype=DT))[0]
    s = torch.zeros(8, 30, dtype=DT)
    rows, cols = torch.tensor([1, 5]), torch.tensor([2, 7, 19])
    s[rows[:, None], cols] = torch.rand(2, 3, dtype=DT) * 50
    s[1, 7], s[5, 2] = 0.0, 1e-20
    return KroneckerInverse.from_eigenbasis(Q_A, Q_G, s, gamma)


CASES = {
    "full_rank": lambda: KroneckerInverse(psd(12, 30) / 30, psd(5, 10) / 10, 0.1),
    "rank_deficient_A": lambda: KroneckerInverse(psd(40, 3) / 3, psd(6, 12) / 12, 0.1),  # 3 samples, 40 dims
    "rank_deficient_G": lambda: KroneckerInverse(psd(6, 12) / 12, psd(20, 2) / 2, 0.1),
    "ekfac": lambda: ekfac_like(0.1),
}
RANKS = {"full_rank": None, "rank_deficient_A": (6, 3), "rank_deficient_G": (2, 6), "ekfac": (2, 3)}


@pytest.mark.parametrize("case", list(CASES))
def test_low_rank_apply_is_exact(case: str) -> None:
    torch.manual_seed(0)
    inv = CASES[case]()
    assert inv.plan.low_rank == (RANKS[case] is not None)  # the truncated path is taken exactly when expected
    if RANKS[case] is not None:
        assert inv.plan.rank == RANKS[case] and inv.plan.macs < KroneckerInverse.from_eigenbasis(
            inv.Q_A, inv.Q_G, inv.eigenvalues, inv.damping, low_rank=False).plan.macs
    V = torch.randn(*inv.eigenvalues.shape, dtype=DT)
    P = inv.apply(V)
    assert rel(P, dense_apply(inv, V)) <= 1e-10 and rel(P, old_apply(inv, V)) <= 1e-10
    Vs = torch.randn(3, *V.shape, dtype=DT)  # stacked rows, as influence's kfac_rows applies them
    assert rel(inv.apply(Vs), torch.stack([dense_apply(inv, v) for v in Vs])) <= 1e-10


@pytest.mark.parametrize(("d_in", "rank_A", "d_out", "rank_G"), [(12, 30, 5, 10), (40, 3, 6, 12), (6, 12, 20, 2)])
def test_low_rank_apply_is_the_dense_damped_kronecker_solve(d_in: int, rank_A: int, d_out: int, rank_G: int) -> None:
    torch.manual_seed(1)
    A, G, gamma = psd(d_in, rank_A) / rank_A, psd(d_out, rank_G) / rank_G, 0.1
    V = torch.randn(d_out, d_in, dtype=DT)
    dense = torch.linalg.solve(torch.kron(G, A) + gamma * torch.eye(d_in * d_out, dtype=DT), V.reshape(-1))
    assert rel(KroneckerInverse(A, G, gamma).apply(V).reshape(-1), dense) <= 1e-10


def test_with_damping_recomputes_the_kept_directions() -> None:
    torch.manual_seed(2)
    inv = ekfac_like(0.1)
    s = inv.eigenvalues.clone()
    s[3, 11] = 1e-14
    inv.with_eigenvalues(s)
    V = torch.randn(8, 30, dtype=DT)
    assert inv.plan.rank == (2, 3)  # 1e-14 <= 1e-12·0.1: dropped
    assert rel(inv.apply(V), dense_apply(inv, V)) <= 1e-10
    inv.with_damping(1e-3)  # 1e-14 > 1e-12·1e-3: row 3 and column 11 are kept now
    assert inv.damping == 1e-3 and inv.plan.rank == (3, 4)
    assert rel(inv.apply(V), dense_apply(inv, V)) <= 1e-10 and rel(inv.apply(V), old_apply(inv, V)) <= 1e-10
    inv.with_damping(1e3)
    assert rel(inv.apply(V), dense_apply(inv, V)) <= 1e-10


@pytest.mark.parametrize("case", list(CASES))
def test_float32_gradients_through_a_float64_inverse_are_cast_once(case: str, monkeypatch: pytest.MonkeyPatch
                                                                   ) -> None:
    torch.manual_seed(3)
    inv = CASES[case]()
    V = torch.randn(*inv.eigenvalues.shape, dtype=DT)
    out = inv.apply(V.float())
    assert out.dtype == torch.float32 and rel(out.double(), inv.apply(V)) <= 1e-5
    form = inv.form(torch.float32, V.device)
    assert all(t.dtype == torch.float32 for t in (form.Q_A, form.Q_G, form.coef))

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("a tensor was cast in a steady-state apply")

    with monkeypatch.context() as patch:
        patch.setattr(torch.Tensor, "to", forbidden)
        torch.testing.assert_close(inv.apply(V.float()), out, rtol=0, atol=0)
    assert inv.form(torch.float32, V.device) is form and inv.form(DT, V.device).Q_A.dtype == DT
    bases = inv.form(torch.float32, V.device)
    inv.with_damping(0.5)  # a new form, from the float32 bases cast before
    assert inv.form(torch.float32, V.device) is not bases
    if not inv.plan.low_rank:
        assert inv.form(torch.float32, V.device).Q_A is form.Q_A
    assert rel(inv.apply(V.float()).double(), dense_apply(inv, V)) <= 1e-5


def test_tiny_basis_entries_are_flushed_in_the_cache_only() -> None:
    """Subnormal float32 products are ~10x slower on x86; entries below sqrt(tiny) are zeroed in the cached bases."""
    Q_A = torch.eye(3)
    Q_A[0, 1] = 1e-41  # subnormal in float32
    inv = KroneckerInverse.from_eigenbasis(Q_A, torch.eye(2), torch.ones(2, 3), 1.0)
    assert inv.Q_A is Q_A and inv.Q_A[0, 1] != 0  # the stored basis (what checkpoints hold) is the caller's
    assert inv.form(torch.float32, Q_A.device).Q_A[0, 1] == 0
