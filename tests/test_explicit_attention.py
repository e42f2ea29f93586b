"""torchvision's ViT with explicit q, k, v, out Linear layers: the same outputs, layers that hooks and forward-mode AD
reach, and the attention-only (TAFT) selection."""

from __future__ import annotations

import copy

import torch
from torch import nn
from torchvision.models.vision_transformer import VisionTransformer

from lqf_exp.delta_selection import select_deltas
from lqf_exp.linearize import LinearizedNetwork
from lqf_exp.models.explicit_attention import ExplicitSelfAttention, use_explicit_attention


def small_vit() -> VisionTransformer:
    """torchvision's ViT code path (vit_b_16's classes) at a test size."""
    torch.manual_seed(0)
    return VisionTransformer(image_size=16, patch_size=8, num_layers=2, num_heads=2, hidden_dim=8, mlp_dim=16,
                             num_classes=3).double().eval()


def test_converted_attention_gives_the_same_outputs_and_real_linear_layers() -> None:
    original = small_vit()
    converted = copy.deepcopy(original)
    assert use_explicit_attention(converted) == 2
    assert not any(isinstance(m, nn.MultiheadAttention) for m in converted.modules())
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    with torch.no_grad():  # the original may take nn.MultiheadAttention's fused inference path here
        torch.testing.assert_close(converted(x), original(x), rtol=1e-12, atol=1e-12)
    seen: list[str] = []
    for name, module in converted.named_modules():
        if isinstance(module, nn.Linear):
            module.register_forward_hook(lambda *_, name=name: seen.append(name))
    converted(x)
    block = "encoder.layers.encoder_layer_0.self_attention"
    assert {f"{block}.{p}" for p in ExplicitSelfAttention.projection_names} <= set(seen)


def test_forward_mode_ad_and_the_attention_only_selection() -> None:
    net = small_vit()
    use_explicit_attention(net)
    with torch.no_grad():  # torchvision zeroes the head, which would make every backbone direction of J zero
        net.heads.head.weight.normal_(0, 0.5)
    names = select_deltas(net, "attention", "freeze", "heads.head").names
    assert len(names) == 2 * 4 * 2 and all(".self_attention." in n for n in names)
    m = LinearizedNetwork(net, linearize="attention", head_name="heads.head")
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    v = [torch.randn_like(d) for d in m.delta_list()]
    _, tangent = m.jvp(x, v)
    params = dict(net.named_parameters())
    step = 1e-6
    with torch.no_grad():
        outputs = []
        for sign in (1.0, -1.0):
            for name, direction in zip(names, v, strict=True):
                params[name].add_(sign * step * direction)
            outputs.append(net(x))
            for name, direction in zip(names, v, strict=True):
                params[name].sub_(sign * step * direction)
    finite = (outputs[0] - outputs[1]) / (2 * step)
    assert float((tangent - finite).abs().max()) <= 1e-8 * float(finite.abs().max())


def test_vit_b_16_is_built_with_explicit_attention_and_its_nested_head() -> None:
    from lqf_exp.models import build_network
    from lqf_exp.models.heads import get_head, head_name

    torch.manual_seed(0)
    net = build_network("vit_b_16", num_classes=5, activation="gelu", weights=None)
    assert not any(isinstance(m, nn.MultiheadAttention) for m in net.modules())
    assert head_name(net) == "heads.head" and get_head(net).out_features == 5
    assert len(select_deltas(net, "attention", "freeze", head_name(net)).names) == 12 * 4 * 2
    names = select_deltas(net, "encoder.layers.encoder_layer_11", "freeze", head_name(net)).names
    assert names[0].startswith("encoder.layers.encoder_layer_11.") and names[-1] == "heads.head.bias"


def test_a_nested_block_of_torchvision_vit_linearizes_without_a_prefix() -> None:
    net = small_vit()
    use_explicit_attention(net)
    with torch.no_grad():
        net.heads.head.weight.normal_(0, 0.5)
    m = LinearizedNetwork(net, linearize="encoder.layers.encoder_layer_1", head_name="heads.head")
    assert len(m.prefix) == 0  # the root holds the class token: its children are not a chain
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    v = [torch.randn_like(d) for d in m.delta_list()]
    reference = torch.func.jvp(
        lambda *p: torch.func.functional_call(net, dict(zip(m.linearized_names, p, strict=True)), (x,)),
        tuple(d.detach() + dict(net.named_parameters())[n] for n, d in zip(m.linearized_names, m.delta_list(),
                                                                         strict=True)), tuple(v))[1]
    torch.testing.assert_close(m.jvp(x, v)[1], reference, rtol=1e-10, atol=1e-12)
