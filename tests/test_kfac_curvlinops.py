"""Our K-FAC factors and preconditioned gradient vs curvlinops-for-pytorch 3.0.1 (test-only oracle), on a CNN.

Scaling map: CE mean is the same loss in both. curvlinops' MSELoss(mean) is ``(1/(N·C)) Σ (f − y)²`` while our
MSE is ``(1/N) Σ_n Σ_c (f − α·onehot)²`` = C × theirs, so ``G_ours = C · G_cl`` (A is identical) and
``(K_ours + γI)⁻¹ = (K_cl + (γ/C)I)⁻¹ / C``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

curvlinops = pytest.importorskip("curvlinops")

from lqf_exp.precond import FactorAccumulator, KroneckerInverse, precondition_layer  # noqa: E402

from .helpers.losses import make_loss  # noqa: E402

DT = torch.float64
ALPHA, C = 2.0, 5
LAYERS = {"0": True, "2": True, "5": True}


def cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(),
        nn.Conv2d(3, 4, 3, stride=2, padding=2, dilation=2), nn.Tanh(),
        nn.Flatten(), nn.Linear(36, C),
    ).to(DT)


def data() -> list[tuple[Tensor, Tensor]]:
    torch.manual_seed(1)
    return [(torch.randn(n, 2, 6, 6, dtype=DT), torch.randint(0, C, (n,))) for n in (4, 3)]


def ours(net: nn.Module, loss: str, approx: str) -> dict[str, tuple[Tensor, Tensor]]:
    acc = FactorAccumulator(net, LAYERS, make_loss(loss, ALPHA), kfac_approx=approx)
    for x, y in data():
        acc.accumulate(x, y)
    return acc.finalize("mean")


def oracle(net: nn.Module, loss: str, approx: str):
    if loss == "ce":
        loss_func, batches = nn.CrossEntropyLoss(), data()
    else:
        loss_func = nn.MSELoss()
        batches = [(x, ALPHA * F.one_hot(y, C).to(DT)) for x, y in data()]
    return curvlinops.KFACLinearOperator(
        net, loss_func, list(net.parameters()), batches, fisher_type="type-2", kfac_approx=approx,
        separate_weight_and_bias=False, check_deterministic=False)


@pytest.mark.parametrize(("loss", "approx"), [("ce", "expand"), ("mse", "expand"), ("ce", "reduce")])
def test_factors_and_preconditioned_gradient_match_curvlinops(loss: str, approx: str) -> None:
    net = cnn()
    mine, K = ours(net, loss, approx), oracle(net, loss, approx)
    K.compute_kronecker_factors()
    g_scale = C if loss == "mse" else 1.0
    for name, (A, G) in mine.items():
        torch.testing.assert_close(A, K._input_covariances[name], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(G, g_scale * K._gradient_covariances[name], rtol=1e-10, atol=1e-12)

    gamma = 1e-2
    torch.manual_seed(2)
    grads = [torch.randn_like(p) for p in net.parameters()]
    K_inv = curvlinops.KFACInverseLinearOperator(K, damping=gamma / g_scale, use_exact_damping=True)
    expected = [g / g_scale for g in K_inv @ [g.clone() for g in grads]]
    for p, g in zip(net.parameters(), grads, strict=True):
        p.grad = g.clone()
    for name, (A, G) in mine.items():
        layer = net.get_submodule(name)
        precondition_layer(KroneckerInverse(A, G, gamma), layer.weight, layer.bias)
    for p, e in zip(net.parameters(), expected, strict=True):
        torch.testing.assert_close(p.grad, e, rtol=1e-8, atol=1e-10)
