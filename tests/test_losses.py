"""The two losses: values against hand-computed ones, and the MSE's quadratic form."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lqf_exp.losses import CrossEntropyLoss, ScaledMSELoss

from .helpers.losses import make_loss


def test_mse_is_mean_over_batch_of_sum_over_classes() -> None:
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.0, -1.0, 4.0]], dtype=torch.float64)
    labels = torch.tensor([2, 0])
    expected = ((1 - 0) ** 2 + (2 - 0) ** 2 + (3 - 15) ** 2 + (0 - 15) ** 2 + 1 + 16) / 2
    assert ScaledMSELoss(15.0)(logits, labels).item() == pytest.approx(expected, rel=1e-15)


def test_mse_hessian_in_outputs_is_two_over_n() -> None:
    logits = torch.randn(4, 3, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 1])
    hessian = torch.autograd.functional.hessian(lambda z: ScaledMSELoss(15.0)(z, labels), logits)
    expected = torch.eye(12, dtype=torch.float64).reshape(4, 3, 4, 3) * 2 / 4
    torch.testing.assert_close(hessian, expected, rtol=0, atol=1e-14)


def test_ce_matches_torch() -> None:
    logits, labels = torch.randn(5, 4), torch.tensor([0, 3, 2, 1, 1])
    assert CrossEntropyLoss()(logits, labels).item() == pytest.approx(F.cross_entropy(logits, labels).item())
    assert CrossEntropyLoss.kind == "ce" and ScaledMSELoss.kind == "mse"


def test_target_scale_must_be_positive() -> None:
    with pytest.raises(ValueError, match="target_scale"):
        ScaledMSELoss(0.0)


@pytest.mark.parametrize("name", ["mse", "ce"])
def test_loss_owns_its_exact_curvature(name: str) -> None:
    """Per-sample gradient, Hessian-vector product and Hessian square root agree with autograd (float64)."""
    loss = make_loss(name)
    g = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(4, 5, generator=g, dtype=torch.float64), torch.tensor([0, 3, 1, 4])
    for n in range(4):
        per = lambda f, n=n: loss.per_sample(f[None], labels[n : n + 1])[0]  # noqa: E731
        H = torch.autograd.functional.hessian(per, logits[n])
        grad = torch.autograd.functional.jacobian(per, logits[n])
        torch.testing.assert_close(loss.output_gradient(logits, labels)[n], grad)
        v = torch.randn(5, generator=g, dtype=torch.float64)
        torch.testing.assert_close(loss.hessian_vector(logits, v.expand(4, 5))[n], H @ v)
        S = loss.hessian_sqrt(logits)[:, n]  # [K, C]
        torch.testing.assert_close(S.T @ S, H)
    assert loss.constant_curvature == (name == "mse")


@pytest.mark.parametrize("name", ["mse", "ce"])
def test_sampled_gradients_have_the_hessian_as_covariance(name: str) -> None:
    loss = make_loss(name)
    logits = torch.randn(2, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    draws = loss.sampled_gradients(logits, 200_000, torch.Generator().manual_seed(2))  # [M, N, C]
    covariance = torch.einsum("mni,mnj->nij", draws, draws) / draws.shape[0]
    for n in range(2):
        H = loss.hessian_sqrt(logits)[:, n].T @ loss.hessian_sqrt(logits)[:, n]
        torch.testing.assert_close(covariance[n], H, atol=2e-2 * float(H.abs().max()), rtol=0)
