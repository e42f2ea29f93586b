"""The frozen-prefix feature cache of ``linearize=<block>``: the same δ with and without it, and its guards."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch import nn

from lqf_exp.linearize import LinearizedNetwork
from lqf_exp.models import SmallResNet
from lqf_exp.prefix_cache import PrefixFeatureCache

from .helpers.nets import randomize_bn


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return randomize_bn(SmallResNet(num_classes=3), 0).double()


def train(m: LinearizedNetwork, x: torch.Tensor, y: torch.Tensor, epochs: int) -> list[torch.Tensor]:
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
def test_cached_and_uncached_runs_give_the_same_delta(tangent: str, linearize: str) -> None:
    net = small_net()
    x = torch.randn(12, 3, 16, 16, dtype=torch.float64)
    y = torch.randn(12, 3, dtype=torch.float64)
    plain = LinearizedNetwork(copy.deepcopy(net), linearize=linearize, tangent=tangent)
    cached = LinearizedNetwork(net, linearize=linearize, tangent=tangent, prefix_cache_gb=1.0)
    calls = []
    cached.net.conv1.register_forward_hook(lambda *_: calls.append(1))
    expected, got = train(plain, x, y, epochs=3), train(cached, x, y, epochs=3)
    for a, b in zip(got, expected, strict=True):
        assert torch.equal(a, b)
    cache = cached.prefix_cache
    assert cache is not None and len(cache.features) == 12
    # 9 batches; a batch is served from the cache once all its samples were seen (all of epoch 2 and 3's)
    assert cache.hits + cache.misses == 9 and cache.hits == 6
    assert not cached.net.conv1.__dict__.get("forward")  # nothing left patched
    calls.clear()
    cached(x[:4])
    assert calls == [1]  # the prefix child is still called (hooks see it), but its forward was skipped: ...
    with torch.no_grad():
        assert torch.equal(cached(x[:4]), plain(x[:4]))  # ... and the answer is the same


def test_nothing_is_cached_without_a_prefix_or_a_size() -> None:
    assert LinearizedNetwork(small_net(), linearize="all", prefix_cache_gb=1.0).prefix_cache is None
    assert LinearizedNetwork(small_net(), linearize="layer2").prefix_cache is None
    with pytest.raises(ValueError, match="prefix cache size"):
        PrefixFeatureCache(0.0)


def test_the_size_guard_stops_storing_with_a_warning(caplog) -> None:
    m = LinearizedNetwork(small_net(), linearize="layer3", prefix_cache_gb=1e-6)  # ~1 KB
    x = torch.randn(8, 3, 16, 16, dtype=torch.float64)
    reference = LinearizedNetwork(small_net(), linearize="layer3")
    with caplog.at_level(logging.WARNING, logger="lqf_exp.prefix_cache"), torch.no_grad():
        for _ in range(3):
            out = m(x)
    assert m.prefix_cache is not None and m.prefix_cache.full and not m.prefix_cache.features
    assert "prefix feature cache full" in caplog.text and "prefix_cache_gb" in caplog.text
    with torch.no_grad():
        assert torch.equal(out, reference(x))


def test_distinct_images_get_distinct_keys_and_equal_images_equal_keys() -> None:
    cache = PrefixFeatureCache(1.0)
    x = torch.randn(6, 3, 8, 8)
    x[3] = x[1]
    keys = cache.keys(x)
    assert keys[3] == keys[1] and len(set(keys)) == 5
    nudged = x.clone()
    nudged[0, 0, 0, 0] = torch.nextafter(nudged[0, 0, 0, 0], torch.tensor(1e9))  # one ulp of one pixel
    assert cache.keys(nudged)[0] != keys[0]
