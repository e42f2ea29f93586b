"""The fused tangent path (lqf_exp.tangent) against forward-mode AD, in float64 to 1e-10.

Forward-mode AD itself is checked against jacrev and finite differences in test_linearize.py, so agreement here
carries those checks over to the fused path.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

import lqf_exp.tangent_ops as tangent_ops
from lqf_exp.linearize import LinearizedNetwork
from lqf_exp.models import SmallResNet
from lqf_exp.tangent import UnsupportedModuleError

from .helpers.nets import randomize_bn, tiny_cnn_net

TOLERANCE = 1e-10


def resnet18() -> nn.Module:
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=5)
    for module in list(net.modules()):  # Leaky-ReLU, as LQF runs it
        for attr, sub in list(module.named_children()):
            if isinstance(sub, nn.ReLU):
                setattr(module, attr, nn.LeakyReLU(0.1))
    return randomize_bn(net, 0)


def small_resnet() -> nn.Module:
    torch.manual_seed(0)
    return randomize_bn(SmallResNet(num_classes=4), 1)


def tiny_cnn() -> nn.Module:
    torch.manual_seed(0)
    return randomize_bn(tiny_cnn_net(nn.ReLU), 2)


# (network factory, linearize, bn_affine): each case is compared path against path below.
CASES: list[tuple[Callable[[], nn.Module], str, str]] = [
    (resnet18, "all", "freeze"),
    (resnet18, "layer3", "freeze"),
    (resnet18, "all", "linearize"),
    (small_resnet, "all", "freeze"),
    (tiny_cnn, "all", "linearize"),
    (tiny_cnn, "head", "freeze"),
]


def pair(make: Callable[[], nn.Module], linearize: str, bn_affine: str) -> tuple[LinearizedNetwork, ...]:
    net = make().double()
    fused = LinearizedNetwork(net, linearize=linearize, bn_affine=bn_affine, tangent="fused")
    autodiff = LinearizedNetwork(copy.deepcopy(net), linearize=linearize, bn_affine=bn_affine, tangent="autodiff")
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for a, b in zip(fused.delta_list(), autodiff.delta_list(), strict=True):
            a.copy_(1e-2 * torch.randn(a.shape, generator=generator, dtype=a.dtype))
            b.copy_(a)
    return fused, autodiff


def relative(a: Tensor, b: Tensor) -> float:
    return float((a - b).abs().max()) / max(float(b.abs().max()), 1e-300)


@pytest.mark.parametrize(("make", "linearize", "bn_affine"), CASES)
def test_fused_forward_and_gradient_match_autodiff(make, linearize: str, bn_affine: str) -> None:
    fused, autodiff = pair(make, linearize, bn_affine)
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    target = torch.randn(3, fused.net.fc.out_features, dtype=torch.float64)
    outputs = []
    for m in (fused, autodiff):
        primal, tangent = m(x, split=True)
        loss = ((primal + tangent - target) ** 2).sum()
        outputs.append((primal, tangent, torch.autograd.grad(loss, m.delta_list())))
    (p1, t1, g1), (p2, t2, g2) = outputs
    assert relative(p1, p2) <= TOLERANCE
    assert relative(t1, t2) <= TOLERANCE
    for a, b in zip(g1, g2, strict=True):
        assert relative(a, b) <= TOLERANCE


def test_fused_jvp_along_any_direction_and_its_transpose() -> None:
    """``J v`` for a v that is not δ, differentiable in v (the curvature products of the solvers)."""
    fused, autodiff = pair(small_resnet, "all", "freeze")
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    v = [torch.randn_like(d).requires_grad_() for d in fused.delta_list()]
    u = torch.randn(4, 4, dtype=torch.float64)
    (_, jv1), (_, jv2) = fused.jvp(x, v), autodiff.jvp(x, v)
    assert relative(jv1, jv2) <= TOLERANCE
    for a, b in zip(torch.autograd.grad((jv1 * u).sum(), v), torch.autograd.grad((jv2 * u).sum(), v), strict=True):
        assert relative(a, b) <= TOLERANCE


def test_unfolded_weight_gradient_equals_the_convolution_backward(monkeypatch) -> None:
    """resnet18 at 32 px reaches 2×2 and 1×1 maps, where the δW gradient takes the unfold path on CPU."""
    fused, _ = pair(resnet18, "all", "freeze")
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)

    def gradients() -> list[Tensor]:
        primal, tangent = fused(x, split=True)
        return list(torch.autograd.grad(((primal + tangent) ** 2).sum(), fused.delta_list()))

    taken = []
    original = tangent_ops._unfolded_weight_gradient
    monkeypatch.setattr(tangent_ops, "_unfolded_weight_gradient", lambda *a: taken.append(1) or original(*a))
    unfolded = gradients()
    assert len(taken) >= 4  # layer3 and layer4 convolutions
    monkeypatch.setattr(tangent_ops, "UNFOLD_MAX_POSITIONS", 0)
    taken.clear()
    reference = gradients()
    assert not taken
    for a, b in zip(unfolded, reference, strict=True):
        assert relative(a, b) <= TOLERANCE


def test_max_pool_tangent_follows_the_primal_argmax() -> None:
    net = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8, 2)).double()
    fused = LinearizedNetwork(net, tangent="fused")
    autodiff = LinearizedNetwork(copy.deepcopy(net), tangent="autodiff")
    for a, b in zip(fused.delta_list(), autodiff.delta_list(), strict=True):
        with torch.no_grad():
            a.normal_()
            b.copy_(a)
    x = torch.randn(5, 1, 4, 4, dtype=torch.float64)
    assert relative(fused(x), autodiff(x)) <= TOLERANCE


class _FunctionalGelu(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(F.gelu(self.conv(x)).mean((2, 3)))


def test_a_non_linearity_the_rules_cannot_see_is_refused() -> None:
    m = LinearizedNetwork(_FunctionalGelu().double(), tangent="fused")
    with pytest.raises(RuntimeError, match="method.tangent=autodiff"):
        m(torch.randn(2, 3, 8, 8, dtype=torch.float64))
    ok = LinearizedNetwork(_FunctionalGelu().double(), tangent="autodiff")
    assert ok(torch.randn(2, 3, 8, 8, dtype=torch.float64)).shape == (2, 2)


def test_a_module_without_a_rule_on_the_tangent_is_refused() -> None:
    net = nn.Sequential(nn.Linear(3, 4), nn.ELU(), nn.Linear(4, 2)).double()
    with pytest.raises(UnsupportedModuleError, match="ELU"):
        LinearizedNetwork(net, tangent="fused")(torch.randn(2, 3, dtype=torch.float64))
    # in the frozen prefix it only ever sees the plain batch, which is fine
    prefix = nn.Sequential()
    prefix.add_module("stem", nn.Sequential(nn.Linear(3, 4), nn.ELU()))
    prefix.add_module("fc", nn.Linear(4, 2))
    m = LinearizedNetwork(prefix.double(), linearize="head", tangent="fused")
    assert m(torch.randn(2, 3, dtype=torch.float64)).shape == (2, 2)


def test_auto_takes_forward_mode_ad_where_the_rules_do_not_reach(caplog) -> None:
    with_module = LinearizedNetwork(nn.Sequential(nn.Linear(3, 4), nn.ELU(), nn.Linear(4, 2)).double())
    assert with_module.dual is None  # decided at construction: ELU has no rule
    reflect = nn.Sequential(nn.Conv2d(3, 2, 3, padding=1, padding_mode="reflect"), nn.Flatten(), nn.Linear(32, 2))
    assert LinearizedNetwork(reflect.double()).dual is None  # a variant the conv rule refuses
    assert LinearizedNetwork(tiny_cnn()).tangent == "auto" and LinearizedNetwork(tiny_cnn()).dual is not None
    functional = LinearizedNetwork(_FunctionalGelu().double(), tangent="auto")
    reference = LinearizedNetwork(copy.deepcopy(functional.net), tangent="autodiff")
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    with caplog.at_level("WARNING", logger="lqf_exp.linearize"):
        out = functional(x)  # the first-batch check finds the hidden non-linearity
    assert functional.dual is None and "forward-mode AD from now on" in caplog.text
    assert torch.equal(out, reference(x))
    # In float32 the mismatch is looked at again in float64, which confirms the missing rule.
    caplog.clear()
    functional32 = LinearizedNetwork(_FunctionalGelu(), tangent="auto")
    with caplog.at_level("WARNING", logger="lqf_exp.linearize"):
        functional32(torch.randn(2, 3, 8, 8))
    assert functional32.dual is None and "forward-mode AD from now on" in caplog.text


def test_a_float32_mismatch_that_float64_does_not_show_keeps_the_fused_path(monkeypatch, caplog) -> None:
    """Rounding at a Leaky-ReLU kink can flip one slope in float32 (one Fashion-MNIST validation image did); the float64
    second look tells it from a missing rule, and the fused path stays."""
    import lqf_exp.linearize as linearize

    real = linearize.tangent_mismatch
    calls = []

    def float32_flips(fused, autodiff, like, device):  # noqa: ANN001, ANN202
        calls.append(like[0].dtype)
        return "a float32 slope flip" if like[0].dtype == torch.float32 else real(fused, autodiff, like, device)

    monkeypatch.setattr(linearize, "tangent_mismatch", float32_flips)
    net = LinearizedNetwork(tiny_cnn().float(), tangent="auto")
    with caplog.at_level("INFO", logger="lqf_exp.linearize"):
        net(torch.randn(2, 3, 8, 8))
    assert net.dual is not None and calls == [torch.float32, torch.float64]
    assert "not in float64: rounding at an activation kink" in caplog.text


def test_unknown_tangent_path_is_refused() -> None:
    with pytest.raises(ValueError, match="tangent must be one of"):
        LinearizedNetwork(tiny_cnn(), tangent="symbolic")
