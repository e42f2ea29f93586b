"""Exactness tests of LinearizedNetwork (float64 where precision matters)."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torchvision
from torch import Tensor, nn
from torch.func import functional_call, jacrev

from lqf_exp.head_fit import ridge_head
from lqf_exp.head_init import extract_features
from lqf_exp.linearize import LinearizedNetwork, zero_gradient_fraction

from .helpers.nets import randomize_bn, tiny_cnn_net

ALPHA = 15.0


def tiny_mlp(seed: int = 0) -> nn.Module:
    """4 → 8 → 8 → 3 with Leaky-ReLU: 139 parameters."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(4, 8), nn.LeakyReLU(0.1), nn.Linear(8, 8), nn.LeakyReLU(0.1), nn.Linear(8, 3)
    ).double()


def resnet18(seed: int = 0, classes: int = 5) -> nn.Module:
    torch.manual_seed(seed)
    return randomize_bn(torchvision.models.resnet18(num_classes=classes), seed).double()


def tiny_cnn(seed: int = 0, act: type[nn.Module] = nn.ReLU) -> nn.Module:
    torch.manual_seed(seed)
    return randomize_bn(tiny_cnn_net(act), seed).double()


def set_random_deltas(m: LinearizedNetwork, scale: float = 1e-2, seed: int = 1) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for d in m.deltas.values():
            d.copy_(scale * torch.randn(d.shape, generator=g, dtype=d.dtype))
    return [d.detach().clone() for d in m.deltas.values()]


def f_at(m: LinearizedNetwork, x: Tensor, step: float) -> Tensor:
    """The non-linear network at w0 + step·δ."""
    params = dict(m.net.named_parameters())
    moved = {n: params[n] + step * d for n, d in m.delta_named().items()}
    with torch.no_grad():
        return functional_call(m.net, moved, (x,))


@pytest.mark.parametrize("make", [resnet18, tiny_cnn])
def test_zero_delta_equals_base(make) -> None:
    net = make()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    expected = copy.deepcopy(net).eval()(x)
    m = LinearizedNetwork(net)
    m.train()
    with torch.no_grad():
        assert torch.allclose(m(x), expected, rtol=0, atol=1e-12)
        assert torch.equal(m.apply_to_base(x), expected)


def test_parameters_buffers_and_api() -> None:
    net = resnet18()
    m = LinearizedNetwork(net)
    trainable = [p for p in m.parameters() if p.requires_grad]
    assert [id(p) for p in trainable] == [id(d) for d in m.deltas.values()]
    assert all(not p.requires_grad for p in m.net.parameters())
    assert all(torch.count_nonzero(d) == 0 for d in trainable)
    # BN stays frozen by default: every δ belongs to a Conv2d/Linear layer, and curvature_layers covers them all.
    modules = dict(m.net.named_modules())
    names = m.linearized_names
    assert all(isinstance(modules[n.rpartition(".")[0]], (nn.Conv2d, nn.Linear)) for n in names)
    layers = m.curvature_layers()
    covered = {id(t) for wb in layers.values() for t in wb if t is not None}
    assert covered == {id(d) for d in trainable}
    assert layers["layer1.0.conv1"] == (m.delta_named()["layer1.0.conv1.weight"], None)
    assert m.base_network is net
    sd = m.state_dict()
    assert "net.layer1.0.bn1.running_mean" in sd and "deltas.layer1__0__conv1__weight" in sd
    # γ/β get δs with bn_affine="linearize".
    m2 = LinearizedNetwork(resnet18(), bn_affine="linearize")
    assert "layer1.0.bn1.weight" in m2.linearized_names
    assert len(m2.linearized_names) == len(list(m2.net.parameters()))
    # dtype/device follow the module.
    m.float()
    assert m(torch.randn(1, 3, 32, 32)).dtype == torch.float32


def test_validation_errors() -> None:
    with pytest.raises(ValueError, match="layer4"):
        LinearizedNetwork(resnet18(), linearize="layer9")
    with pytest.raises(ValueError, match="bn_affine"):
        LinearizedNetwork(resnet18(), bn_affine="fold")
    net = resnet18()
    nn.init.zeros_(net.fc.weight)
    with pytest.raises(ValueError, match="Jacobian"):
        LinearizedNetwork(copy.deepcopy(net))
    LinearizedNetwork(net, linearize="head")  # a zero head is fine for LQF FC


def test_forward_order_check() -> None:
    class Swapped(nn.Module):  # registration order b, a; call order a, b
        def __init__(self) -> None:
            super().__init__()
            self.b, self.a, self.fc = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x: Tensor) -> Tensor:
            return self.fc(self.b(self.a(x)))

    m = LinearizedNetwork(Swapped(), linearize="a")
    with pytest.raises(RuntimeError, match="run after"):
        m(torch.randn(2, 4))


@pytest.mark.parametrize("make", [resnet18, tiny_cnn])
def test_tangent_matches_finite_difference(make) -> None:
    m = LinearizedNetwork(make())
    set_random_deltas(m)  # h·δ must be small enough not to cross ReLU / max-pool kinks
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        _, tangent = m(x, split=True)
    h = 1e-6
    fd = (f_at(m, x, h) - f_at(m, x, -h)) / (2 * h)
    assert ((fd - tangent).norm() / tangent.norm()).item() < 1e-6


def test_tangent_matches_jacrev() -> None:
    m = LinearizedNetwork(tiny_mlp())
    deltas = set_random_deltas(m, scale=1.0)
    x = torch.randn(5, 4, dtype=torch.float64)
    params = {n: p.detach() for n, p in m.net.named_parameters()}
    jac = jacrev(lambda p: functional_call(m.net, p, (x,)))(params)
    expected = sum((jac[n].flatten(2) @ d.flatten()) for n, d in zip(m.linearized_names, deltas, strict=True))
    with torch.no_grad():
        _, tangent = m(x, split=True)
    assert (tangent - expected).abs().max().item() <= 1e-10


def test_linearity_in_delta() -> None:
    m = LinearizedNetwork(tiny_cnn())
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    d1, d2 = set_random_deltas(m, seed=1), set_random_deltas(m, seed=2)
    a, b = 0.7, -1.9

    def out(ds: list[Tensor]) -> Tensor:
        with torch.no_grad():
            for p, d in zip(m.deltas.values(), ds, strict=True):
                p.copy_(d)
            return m(x)

    f0 = out([torch.zeros_like(d) for d in d1])
    lhs = out([a * u + b * v for u, v in zip(d1, d2, strict=True)]) - f0
    rhs = a * (out(d1) - f0) + b * (out(d2) - f0)
    assert torch.allclose(lhs, rhs, rtol=0, atol=1e-12)


def mse_objective(m: LinearizedNetwork, x: Tensor, y: Tensor, lam: float) -> Tensor:
    target = ALPHA * nn.functional.one_hot(y, 3).to(x)
    reg = sum(d.pow(2).sum() for d in m.deltas.values())
    return (m(x) - target).pow(2).sum(1).mean() + lam / 2 * reg


def minimize(m: LinearizedNetwork, objective: Callable[[], Tensor], rounds: int = 1) -> None:
    """Full-batch L-BFGS on the trainable parameters (the δs) to float64 precision."""
    trainable = [p for p in m.parameters() if p.requires_grad]
    opt = torch.optim.LBFGS(
        trainable, max_iter=500, tolerance_grad=1e-14, tolerance_change=0, line_search_fn="strong_wolfe"
    )

    def closure() -> Tensor:
        opt.zero_grad()
        loss = objective()
        loss.backward()
        return loss

    for _ in range(rounds):
        opt.step(closure)


def test_objective_is_exactly_quadratic() -> None:
    m = LinearizedNetwork(tiny_cnn())
    x, y = torch.randn(4, 3, 16, 16, dtype=torch.float64), torch.tensor([0, 1, 2, 1])
    direction = set_random_deltas(m, scale=0.3, seed=3)
    base = set_random_deltas(m, scale=0.3, seed=4)

    def objective_at(t: float) -> float:
        with torch.no_grad():
            for p, b0, v in zip(m.deltas.values(), base, direction, strict=True):
                p.copy_(b0 + t * v)
            return mse_objective(m, x, y, lam=0.1).item()

    vals = [objective_at(t) for t in (-2.0, -1.0, 0.0, 1.0, 2.0, 3.0)]
    second = [vals[i + 1] - 2 * vals[i] + vals[i - 1] for i in range(1, 5)]
    third = vals[3] - 3 * vals[2] + 3 * vals[1] - vals[0]
    assert max(second) - min(second) <= 1e-9 * abs(second[0])
    assert abs(third) <= 1e-9 * abs(second[0])


def test_training_reaches_closed_form_ridge() -> None:
    torch.manual_seed(0)
    m = LinearizedNetwork(tiny_mlp())
    N, lam = 20, 1e-2
    x, y = torch.randn(N, 4, dtype=torch.float64), torch.arange(N) % 3
    params = {n: p.detach() for n, p in m.net.named_parameters()}
    jac = jacrev(lambda p: functional_call(m.net, p, (x,)))(params)
    J = torch.cat([jac[n].reshape(N * 3, -1) for n in m.linearized_names], 1)  # [N·C, P]
    with torch.no_grad():
        f0 = m.apply_to_base(x).reshape(-1)
    r = (ALPHA * nn.functional.one_hot(y, 3).to(x)).reshape(-1) - f0
    # ∇ [mean_n Σ_c (f0 + Jδ − αy)² + λ/2‖δ‖²] = 2/N·Jᵀ(f0 + Jδ − αy) + λδ = 0
    P = J.shape[1]
    delta_star = torch.linalg.solve(2 / N * J.T @ J + lam * torch.eye(P, dtype=J.dtype), 2 / N * J.T @ r)

    minimize(m, lambda: mse_objective(m, x, y, lam), rounds=3)
    learned = torch.cat([m.delta_named()[n].detach().flatten() for n in m.linearized_names])
    assert ((learned - delta_star).norm() / delta_star.norm()).item() < 1e-4


def test_bn_and_w0_frozen_during_training() -> None:
    m = LinearizedNetwork(resnet18())
    before = {k: v.clone() for k, v in m.net.state_dict().items()}
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    x, y = torch.randn(4, 3, 32, 32, dtype=torch.float64), torch.tensor([0, 1, 2, 3])
    m.train()
    assert m.training
    for _ in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(m(x), y).backward()
        opt.step()
    m.train(True)
    assert all(not mod.training for mod in m.net.modules())
    assert all(torch.equal(before[k], v) for k, v in m.net.state_dict().items())
    assert any(torch.count_nonzero(d) > 0 for d in m.deltas.values())


def test_head_linearization_equals_probe() -> None:
    torch.manual_seed(0)
    net = tiny_cnn(act=nn.LeakyReLU)
    x, y = torch.randn(40, 3, 8, 8, dtype=torch.float64), torch.arange(40) % 3
    feats, labels = extract_features(net, [(x, y)])
    weight, bias = ridge_head(feats, labels, 3, target_scale=ALPHA, l2=0.0)
    probe_pred = feats @ weight.T + bias
    m = LinearizedNetwork(net, linearize="head")
    assert m.linearized_names == ["fc.weight", "fc.bias"]
    minimize(m, lambda: mse_objective(m, x, y, lam=0.0))
    with torch.no_grad():
        assert (m(x) - probe_pred).abs().max().item() <= 1e-6


def test_partial_linearization_is_restriction_of_full() -> None:
    net = resnet18()
    m3 = LinearizedNetwork(copy.deepcopy(net), linearize="layer3")
    mall = LinearizedNetwork(net)
    assert m3.linearized_blocks == ["layer3", "layer4", "avgpool", "fc"]
    assert all(n.split(".")[0] in ("layer3", "layer4", "fc") for n in m3.linearized_names)
    assert {n for n in mall.linearized_names if n.split(".")[0] in ("layer3", "layer4", "fc")} == set(
        m3.linearized_names
    )
    set_random_deltas(m3, scale=0.05)
    with torch.no_grad():
        for n, d in m3.delta_named().items():
            mall.delta_named()[n].copy_(d)
    seen: list[tuple[bool, bool]] = []

    def hook(_m: nn.Module, _i: tuple, out: Tensor) -> None:
        # a tangent: a forward-mode dual, or the fused path's [primal; tangent] stack (twice the batch)
        tangent = fwAD.unpack_dual(out).tangent is not None or out.shape[0] != x.shape[0]
        seen.append((out.requires_grad or out.grad_fn is not None, tangent))

    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    m3(x)  # the first call also checks the fused path against forward-mode AD
    handle = m3.net.layer2.register_forward_hook(hook)
    out3 = m3(x)
    handle.remove()
    assert seen == [(False, False)]  # the frozen prefix carries neither a graph nor a tangent
    assert out3.requires_grad
    with torch.no_grad():
        assert torch.allclose(out3, mall(x), rtol=0, atol=1e-12)


def swap_activation(net: nn.Module, act: nn.Module) -> nn.Module:
    for name, child in net.named_children():
        if isinstance(child, nn.ReLU):
            setattr(net, name, copy.deepcopy(act))
        else:
            swap_activation(child, act)
    return net


def test_zero_gradient_fraction_relu_vs_leaky() -> None:
    torch.manual_seed(0)
    # A negative BN shift kills many ReLU channels, as in a pretrained net; the same weights with Leaky-ReLU.
    relu_net = randomize_bn(torchvision.models.resnet18(num_classes=5), shift=-0.1)
    leaky_net = swap_activation(copy.deepcopy(relu_net), nn.LeakyReLU(0.01))
    x, y = torch.randn(8, 3, 64, 64), torch.arange(8) % 5  # 64 px: layer4 maps are 2×2, no pure-padding taps
    fractions = {}
    for name, net in (("relu", relu_net), ("leaky", leaky_net)):
        feats, labels = extract_features(net, [(x, y)])
        net.fc.weight.data, net.fc.bias.data = ridge_head(feats, labels, 5, target_scale=ALPHA, l2=1e-2)
        m = LinearizedNetwork(net)
        loss_fn = lambda out, t: (out - ALPHA * nn.functional.one_hot(t, 5)).pow(2).sum(1).mean()  # noqa: E731
        fractions[name] = zero_gradient_fraction(m, x, y, loss_fn)
        if name == "leaky":
            grads = torch.autograd.grad(loss_fn(m(x), y), list(m.deltas.values()))
            assert all(bool(g.any()) for g in grads)  # every backbone δ tensor gets a signal
    print(f"zero-gradient fraction of backbone δ: {fractions}")
    assert fractions["relu"] > fractions["leaky"]
    assert fractions["leaky"] < 0.01
