"""Tests of the head initialization (probe / random) used before linearizing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from lqf_exp.head_fit import (
    L2_GRID,
    fit_logistic_head,
    ridge_hat_matrix,
    ridge_head,
    ridge_loo_errors,
    select_ridge_l2,
)
from lqf_exp.head_init import extract_features, init_head
from lqf_exp.losses import CrossEntropyLoss, ScaledMSELoss

ALPHA = 15.0


class FeatureNet(nn.Module):
    """Fixed random feature map followed by a linear head ``fc``."""

    def __init__(self, d_in: int = 2, d_feat: int = 16, classes: int = 3) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(d_in, d_feat), nn.BatchNorm1d(d_feat), nn.LeakyReLU(0.1))
        self.fc = nn.Linear(d_feat, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.body(x))


def blobs(n_per_class: int = 30, classes: int = 3, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Well separated Gaussian clusters."""
    g = torch.Generator().manual_seed(seed)
    centres = 6 * torch.randn(classes, 2, generator=g)
    y = torch.arange(classes).repeat_interleave(n_per_class)
    return centres[y] + 0.3 * torch.randn(len(y), 2, generator=g), y


def batches(x: Tensor, y: Tensor, size: int = 16) -> list[tuple[Tensor, Tensor]]:
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(x), size)]


def mse(net: nn.Module, x: Tensor, y: Tensor) -> float:
    with torch.no_grad():
        return (net.eval()(x) - ALPHA * nn.functional.one_hot(y, 3)).pow(2).sum(1).mean().item()


@pytest.mark.parametrize("l2", [0.0, 1e-2, 1.0])
def test_ridge_head_matches_lstsq(l2: float) -> None:
    g = torch.Generator().manual_seed(0)
    N, D, C = 40, 6, 4
    X = torch.randn(N, D, generator=g, dtype=torch.float64)
    y = torch.randint(0, C, (N,), generator=g)
    W, b = ridge_head(X, y, C, target_scale=ALPHA, l2=l2)
    # mean_n‖W x_n + b − t_n‖² + (l2/2)‖W‖²  ⇔  least squares on [X 1; √(N·l2/2)·[I 0]] against [T; 0].
    T = ALPHA * np.eye(C)[y.numpy()]
    A = np.hstack([X.numpy(), np.ones((N, 1))])
    reg = np.hstack([np.sqrt(N * l2 / 2) * np.eye(D), np.zeros((D, 1))])
    sol = np.linalg.lstsq(np.vstack([A, reg]), np.vstack([T, np.zeros((D, C))]), rcond=None)[0]
    np.testing.assert_allclose(W.numpy(), sol[:D].T, rtol=0, atol=1e-10)
    np.testing.assert_allclose(b.numpy(), sol[D], rtol=0, atol=1e-10)


def test_extract_features_and_restores_mode() -> None:
    torch.manual_seed(0)
    net = FeatureNet().train()
    x, y = blobs()
    feats, labels = extract_features(net, batches(x, y), "cpu")
    assert net.training and feats.shape == (len(x), 16) and torch.equal(labels, y)
    with torch.no_grad():
        assert torch.allclose(feats, net.eval().body(x))


def test_zero_and_unknown_kinds_raise() -> None:
    net = FeatureNet()
    with pytest.raises(ValueError, match="Jacobian"):
        init_head(net, None, kind="zero")
    with pytest.raises(ValueError, match="probe"):
        init_head(net, None, kind="xavier")
    with pytest.raises(ValueError, match="needs a loader and the loss"):
        init_head(net, None, kind="probe", loss=ScaledMSELoss())


def test_probe_improves_over_random_head() -> None:
    torch.manual_seed(0)
    x, y = blobs()
    net = FeatureNet()
    init_head(net, kind="random")
    random_mse = mse(net, x, y)
    fit = init_head(net, batches(x, y), kind="probe", loss=ScaledMSELoss(ALPHA), l2=1e-4)
    assert fit is not None and fit.l2 == 1e-4
    probe_mse = mse(net, x, y)
    assert probe_mse < 0.1 * random_mse
    with torch.no_grad():
        assert (net(x).argmax(1) == y).float().mean().item() == 1.0
    # The head written in place is the ridge solution on the extracted features.
    feats, labels = extract_features(net, batches(x, y))
    W, b = ridge_head(feats, labels, 3, target_scale=ALPHA, l2=1e-4)
    assert torch.allclose(net.fc.weight, W) and torch.allclose(net.fc.bias, b)


def test_ce_probe_is_deterministic_and_separates() -> None:
    torch.manual_seed(0)
    x, y = blobs()
    net = FeatureNet()
    feats, labels = extract_features(net, batches(x, y))
    first, second = (fit_logistic_head(feats, labels, 3, l2=1e-4) for _ in range(2))
    assert torch.equal(first.weight, second.weight) and torch.equal(first.bias, second.bias)
    assert ((feats @ first.weight.T + first.bias).argmax(1) == labels).all()
    init_head(net, batches(x, y), kind="probe", loss=CrossEntropyLoss(), l2=1e-4)
    assert torch.allclose(net.fc.weight, first.weight, atol=1e-6)


@pytest.mark.parametrize("l2", [1e-3, 0.3])
def test_ridge_leave_one_out_is_exact(l2: float) -> None:
    """The closed-form leave-one-out residual equals refitting without each sample (penalty N·l2/2 kept)."""
    g = torch.Generator().manual_seed(3)
    X, y = torch.randn(30, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (30,), generator=g)
    N = len(y)
    T = ALPHA * torch.nn.functional.one_hot(y, 3).double()
    brute = []
    for i in range(N):
        keep = torch.arange(N) != i
        W, b = ridge_head(X[keep], y[keep], 3, ALPHA, l2=l2 * N / (N - 1))  # same Σ-form penalty N·l2/2
        brute.append((T[i] - (X[i] @ W.T + b)).pow(2).sum())
    closed = ridge_loo_errors(X, y, 3, ALPHA, grid=(l2,))[0]
    torch.testing.assert_close(closed, torch.stack(brute).mean(), rtol=1e-9, atol=0)
    W, b = ridge_head(X, y, 3, ALPHA, l2=l2)
    torch.testing.assert_close(ridge_hat_matrix(X, l2) @ T, X @ W.T + b, rtol=1e-9, atol=1e-9)


def test_leave_one_out_penalty_regularizes_a_head_that_would_interpolate() -> None:
    """With more features than samples the unregularized head fits noise; leave-one-out picks a penalty."""
    g = torch.Generator().manual_seed(4)
    y = torch.arange(12) % 3
    X = torch.randn(12, 40, generator=g, dtype=torch.float64) + 2.0 * torch.nn.functional.one_hot(y, 40).double()
    errors = ridge_loo_errors(X, y, 3, ALPHA)
    chosen = select_ridge_l2(X, y, 3, ALPHA)
    assert chosen == L2_GRID[int(errors.argmin())] and chosen > L2_GRID[0]
    assert errors.min() < errors[0]
