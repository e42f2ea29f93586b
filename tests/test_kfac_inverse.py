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
