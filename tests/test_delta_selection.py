"""Which parameters get a δ: nested block names, the attention-only (TAFT) selection, frozen normalization affines;
and that such a selection is exact against forward-mode AD and finite differences in float64."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from lqf_exp.delta_selection import select_deltas
from lqf_exp.linearize import LinearizedNetwork

from .helpers.finite_differences import central_difference
from .helpers.transformer import ToyTransformer


def toy() -> ToyTransformer:
    torch.manual_seed(0)
    net = ToyTransformer().double()
    with torch.no_grad():  # non-trivial LayerNorm affines, so freezing them is visible
        for m in net.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
    return net


def test_a_nested_block_and_every_later_module() -> None:
    selection = select_deltas(toy(), "blocks.1", "freeze", "head")
    # the root holds the class token and position embedding: its children are no chain, so no prefix is split off
    assert selection.prefix == () and selection.blocks == ("embed", "blocks", "norm", "head")
    assert all(n.startswith(("blocks.1.", "head.")) for n in selection.names)
    assert "blocks.1.attention.q.weight" in selection.names and "blocks.1.mlp.0.weight" in selection.names
    assert not any("norm" in n for n in selection.names)  # LayerNorm affines frozen
    linearized = select_deltas(toy(), "blocks.1", "linearize", "head").names
    assert "blocks.1.norm1.weight" in linearized and "norm.bias" in linearized
    with pytest.raises(ValueError, match="nested"):
        select_deltas(toy(), "blocks.7", "freeze", "head")


def test_attention_only_selects_the_projections_of_every_block() -> None:
    names = select_deltas(toy(), "attention", "freeze", "head").names
    expected = {f"blocks.{b}.attention.{p}.{w}" for b in (0, 1) for p in ("q", "k", "v", "out")
                for w in ("weight", "bias")}
    assert set(names) == expected
    with pytest.raises(ValueError, match="projection_names"):
        select_deltas(nn.Sequential(nn.Linear(2, 2)), "attention", "freeze", "0")


def test_all_includes_parameters_held_by_the_root() -> None:
    names = select_deltas(toy(), "all", "freeze", "head").names
    assert {"class_token", "position"} <= set(names)


@pytest.mark.parametrize("linearize", ["all", "attention", "blocks.1"])
def test_the_tangent_is_exact_against_finite_differences(linearize: str) -> None:
    net = toy()
    m = LinearizedNetwork(net, linearize=linearize, head_name="head")
    assert m.dual is None  # the root holds parameters its forward uses outside any layer: forward-mode AD
    x = torch.randn(3, 5, 4, dtype=torch.float64)
    v = [torch.randn_like(d) for d in m.delta_list()]
    _, tangent = m.jvp(x, v)
    finite = central_difference(net, x, m.linearized_names, v, step=1e-6)
    assert float((tangent - finite).abs().max()) <= 1e-8 * float(finite.abs().max())
    def network(*point: Tensor) -> Tensor:
        return torch.func.functional_call(net, dict(zip(m.linearized_names, point, strict=True)), (x,))

    params = dict(net.named_parameters())
    reference = torch.func.jvp(network, tuple(params[n].detach() for n in m.linearized_names), tuple(v))[1]
    assert float((tangent - reference).abs().max()) <= 1e-10 * float(reference.abs().max())
