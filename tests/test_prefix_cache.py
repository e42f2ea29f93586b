"""The frozen prefix of ``linearize=<block>``: an explicit module whose features, computed once per dataset, give the
same linearized network, the same δ and the same run as the images do."""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from lqf_exp.linearize import LinearizedNetwork
from lqf_exp.models import SmallResNet
from lqf_exp.pipeline import run
from lqf_exp.prefix_cache import PrefixFeatures

from .helpers.nets import randomize_bn


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return randomize_bn(SmallResNet(num_classes=3), 0).double()


def train(m: LinearizedNetwork, x: Tensor, y: Tensor, epochs: int) -> list[Tensor]:
    """SGD on the MSE, reshuffled every epoch with one fixed seed (both runs see the same batches)."""
    opt = torch.optim.SGD(m.delta_list(), lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=generator).split(4):
            opt.zero_grad()
            ((m(x[idx]) - y[idx]) ** 2).sum(1).mean().backward()
            opt.step()
    return [d.detach().clone() for d in m.delta_list()]


@pytest.mark.parametrize("tangent", ["fused", "autodiff"])
@pytest.mark.parametrize("linearize", ["layer2", "head"])
def test_prefix_features_give_the_same_network_and_delta(tangent: str, linearize: str) -> None:
    net = small_net()
    x = torch.randn(12, 3, 16, 16, dtype=torch.float64)
    y = torch.randn(12, 3, dtype=torch.float64)
    on_images = LinearizedNetwork(copy.deepcopy(net), linearize=linearize, tangent=tangent)
    m = LinearizedNetwork(net, linearize=linearize, tangent=tangent)
    on_features = m.on_prefix_features()
    assert len(m.prefix) > 0 and len(on_features.prefix) == 0
    assert on_features.delta_list() == m.delta_list()  # the same δ objects: a view, not a copy
    features = PrefixFeatures.compute(m.prefix, [(x[:5], y[:5]), (x[5:], y[5:])], 12, 1.0, "train")
    assert features is not None and torch.equal(features.features, m.prefix(x)) and torch.equal(features.labels, y)
    calls: list[int] = []
    m.net.conv1.register_forward_hook(lambda *_: calls.append(1))
    expected = train(on_images, x, y, epochs=3)
    got = train(on_features, features.features, y, epochs=3)
    assert calls == []  # no pass on the features ran the prefix
    for a, b in zip(got, expected, strict=True):
        assert torch.equal(a, b)
    with torch.no_grad():
        assert torch.equal(on_features(features.features), on_images(x))
        v = [torch.randn_like(d) for d in m.delta_list()]
        for a, b in zip(on_features.jvp(features.features, v), on_images.jvp(x, v), strict=True):
            assert torch.equal(a, b)
    assert torch.allclose(on_features.jacobian(features.features[:3]), on_images.jacobian(x[:3]), rtol=0, atol=1e-12)


def test_the_size_guard_keeps_nothing_and_says_so(caplog) -> None:
    prefix = small_net().conv1
    x = torch.randn(8, 3, 16, 16, dtype=torch.float64)
    with caplog.at_level(logging.WARNING, logger="lqf_exp.prefix_cache"):
        assert PrefixFeatures.compute(prefix, [(x, torch.zeros(8))], 8, 1e-6, "train") is None
    assert "prefix_cache_gb" in caplog.text and "8 samples" in caplog.text
    with pytest.raises(ValueError, match="prefix_cache_gb"):
        PrefixFeatures.compute(prefix, [(x, torch.zeros(8))], 8, 0.0, "train")
    with pytest.raises(ValueError, match="expected 9"):
        PrefixFeatures.compute(prefix, [(x, torch.zeros(8))], 9, 1.0, "train")


def test_batches_come_back_in_dataset_order() -> None:
    stored = PrefixFeatures(torch.arange(10.0)[:, None], torch.arange(10))
    assert [y.tolist() for _, y in stored.batches(4)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_a_run_on_prefix_features_equals_the_run_on_images(make_cfg, tmp_path: Path) -> None:
    common = ["logger=none", "data.shots=3", "data.batch_size=16", "model.weights=null", "method.linearize=layer3",
              "method.weight_decay=1e-2", "method.jacobian_cache_gb=null"]
    cached = run(make_cfg([*common, "method.prefix_cache_gb=1.0"], tmp_path / "cached"))
    plain = run(make_cfg([*common, "method.prefix_cache_gb=null"], tmp_path / "plain"))
    assert cached["solver"]["epochs"] == plain["solver"]["epochs"]
    assert cached["solver"]["objective"] == pytest.approx(plain["solver"]["objective"], rel=1e-5)
    assert cached["metrics"]["test/acc"] == plain["metrics"]["test/acc"]
