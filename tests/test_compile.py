"""The linearized network under ``torch.compile``: one graph with no break, the same numbers as eager.

The ``aot_eager`` backend traces forward and backward exactly as the default one does (Dynamo, then AOTAutograd) but
skips code generation, which takes minutes on the CPU box; benchmarks/gpu_check.py compiles with inductor on a GPU.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lqf_exp.linearize import LinearizedNetwork

from .helpers.nets import randomize_bn


def tiny_net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential()
    net.add_module("conv", nn.Conv2d(3, 6, 3, padding=1))
    net.add_module("bn", nn.BatchNorm2d(6))
    net.add_module("act", nn.LeakyReLU(0.1))
    net.add_module("pool", nn.MaxPool2d(2))
    net.add_module("avg", nn.AdaptiveAvgPool2d(1))
    net.add_module("flat", nn.Flatten())
    net.add_module("fc", nn.Linear(6, 3))
    return randomize_bn(net, 0)


@pytest.mark.parametrize("linearize", ["all", "bn"])
def test_the_lqf_step_compiles_to_one_graph_and_matches_eager(linearize: str) -> None:
    m = LinearizedNetwork(tiny_net(), linearize=linearize, tangent="fused")
    x, y = torch.randn(4, 3, 8, 8), torch.randn(4, 3)
    m(x)  # the first call's check runs eagerly
    with torch.no_grad():
        for d in m.delta_list():
            d.normal_(0, 1e-2)
    explanation = torch._dynamo.explain(m)(x)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1, explanation.break_reasons
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")

    def step(net: nn.Module) -> tuple[torch.Tensor, ...]:
        loss = ((net(x) - y) ** 2).sum()
        return (loss.detach(), *torch.autograd.grad(loss, m.delta_list()))

    for got, want in zip(step(compiled), step(m), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    v = [torch.randn_like(d) for d in m.delta_list()]
    values = {f"deltas.{k}": t for k, t in zip(m.deltas.keys(), v, strict=True)}
    jv = torch.func.functional_call(compiled, values, (x,), {"split": True})
    for got, want in zip(jv, m.jvp(x, v), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
