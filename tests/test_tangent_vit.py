"""The fused tangent path on vision transformers (lqf_exp.tangent_vit): our ViT and torchvision's ViT with explicit
attention, at test sizes, in float64 against forward-mode AD and finite differences (≤ 1e-10), the gradient with
respect to δ, the choice tangent=auto makes, dropout in train mode, and bf16 autocast."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import pytest
import torch
from torch import Tensor, nn
from torchvision.models.vision_transformer import VisionTransformer as TorchvisionViT

from lqf_exp.linearize import LinearizedNetwork
from lqf_exp.models.explicit_attention import use_explicit_attention
from lqf_exp.models.vit import VisionTransformer
from lqf_exp.tangent import fused_supports
from lqf_exp.tangent_ops import UnsupportedModuleError
from lqf_exp.tangent_vit import DualAttention, DualExplicitSelfAttention, DualTorchvisionViT

from .helpers.finite_differences import central_difference

TOLERANCE = 1e-10


def our_vit() -> nn.Module:
    """lqf_exp.models.vit at 16 px: 16 patches of 4 px, width 16, 2 blocks of 2 heads."""
    torch.manual_seed(0)
    net = VisionTransformer(num_classes=3, image_size=16, patch_size=4, dim=16, depth=2, heads=2, mlp_ratio=2.0)
    return _randomize_norms(net).double()


def torchvision_vit(dropout: float = 0.0) -> nn.Module:
    """torchvision's ViT code path (vit_b_16's classes), converted to explicit attention, at a test size."""
    torch.manual_seed(0)
    net = TorchvisionViT(image_size=16, patch_size=8, num_layers=2, num_heads=2, hidden_dim=8, mlp_dim=16,
                         num_classes=3, dropout=dropout)
    use_explicit_attention(net)
    with torch.no_grad():  # torchvision zeroes the head and starts the position embedding near zero
        net.heads.head.weight.normal_(0, 0.5)
        net.encoder.pos_embedding.normal_(0, 0.1)
    return _randomize_norms(net).double()


def _randomize_norms(net: nn.Module) -> nn.Module:
    """LayerNorm affine away from (1, 0), so a wrong γ or β rule would show."""
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
    return net


HEADS = {our_vit: "head", torchvision_vit: "heads.head"}
# (network, linearize): all, TAFT's attention-only, a later block and on, the head alone
CASES: list[tuple[Callable[[], nn.Module], str]] = [
    (our_vit, "all"), (our_vit, "attention"), (our_vit, "block2"), (our_vit, "block2.mlp"), (our_vit, "head"),
    (torchvision_vit, "all"), (torchvision_vit, "attention"), (torchvision_vit, "encoder.layers.encoder_layer_1"),
]


def pair(make: Callable[[], nn.Module], linearize: str, bn_affine: str) -> tuple[LinearizedNetwork, ...]:
    net = make()
    kw = {"linearize": linearize, "bn_affine": bn_affine, "head_name": HEADS[make]}
    fused = LinearizedNetwork(net, tangent="fused", **kw)
    autodiff = LinearizedNetwork(copy.deepcopy(net), tangent="autodiff", **kw)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for a, b in zip(fused.delta_list(), autodiff.delta_list(), strict=True):
            a.copy_(0.1 * torch.randn(a.shape, generator=generator, dtype=a.dtype))
            b.copy_(a)
    return fused, autodiff


def relative(a: Tensor | Sequence[Tensor], b: Tensor | Sequence[Tensor]) -> float:
    """max |a − b| / max |b|, over all the tensors together (a gradient that is zero in exact arithmetic, the key
    bias's through the softmax, is round-off: it is measured against the whole gradient, not itself)."""
    a = torch.cat([t.flatten() for t in a]) if isinstance(a, Sequence) else a
    b = torch.cat([t.flatten() for t in b]) if isinstance(b, Sequence) else b
    return float((a - b).abs().max()) / max(float(b.abs().max()), 1e-300)


def images(make: Callable[[], nn.Module], batch: int = 3) -> Tensor:
    return torch.randn(batch, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("bn_affine", ["freeze", "linearize"])
@pytest.mark.parametrize(("make", "linearize"), CASES)
def test_fused_equals_forward_mode_ad_with_its_gradient(make, linearize: str, bn_affine: str) -> None:
    fused, autodiff = pair(make, linearize, bn_affine)
    assert fused.dual is not None
    if bn_affine == "linearize" and linearize in ("all", "block2"):
        assert any(n.endswith(("norm1.weight", "ln_1.weight")) for n in fused.linearized_names)
    x = images(make)
    target = torch.randn(3, 3, dtype=torch.float64)
    results = []
    for m in (fused, autodiff):
        primal, tangent = m(x, split=True)
        loss = ((primal + tangent - target) ** 2).sum()
        results.append((primal, tangent, torch.autograd.grad(loss, m.delta_list())))
    (p1, t1, g1), (p2, t2, g2) = results
    assert fused.dual is not None  # the first-batch check agreed
    assert relative(p1, p2) <= TOLERANCE
    assert relative(t1, t2) <= TOLERANCE
    assert relative(g1, g2) <= TOLERANCE


@pytest.mark.parametrize(("make", "linearize"), [c for c in CASES if c[1] != "head"])
def test_fused_tangent_equals_finite_differences(make, linearize: str) -> None:
    """J·v along a random v against a fourth-order central difference of the network itself: its error falls as h⁴
    (4e-6 at h = 1e-3, 5e-10 at 1e-4) down to round-off, 3e-12 to 6e-12 below h = 3e-5."""
    fused, _ = pair(make, linearize, "linearize")
    net, x = fused.net, images(make)
    v = [torch.randn_like(d) for d in fused.delta_list()]
    _, tangent = fused.jvp(x, v)
    finite = central_difference(net, x, fused.linearized_names, v, step=2e-5, order=4)
    assert relative(tangent, finite) <= TOLERANCE


def test_jvp_along_any_direction_and_its_transpose() -> None:
    """J·v for a v that is not δ, differentiable in v (the solvers' curvature products)."""
    fused, autodiff = pair(torchvision_vit, "all", "linearize")
    x = images(torchvision_vit, 4)
    v = [torch.randn_like(d).requires_grad_() for d in fused.delta_list()]
    u = torch.randn(4, 3, dtype=torch.float64)
    (_, jv1), (_, jv2) = fused.jvp(x, v), autodiff.jvp(x, v)
    assert relative(jv1, jv2) <= TOLERANCE
    assert relative(torch.autograd.grad((jv1 * u).sum(), v), torch.autograd.grad((jv2 * u).sum(), v)) <= TOLERANCE


@pytest.mark.parametrize("make", [our_vit, torchvision_vit])
def test_every_leaf_is_supported_and_auto_takes_the_fused_path(make) -> None:
    net = make()
    assert all(fused_supports(m) for m in net.modules() if next(m.children(), None) is None)
    m = LinearizedNetwork(net, head_name=HEADS[make])  # tangent=auto
    m(images(make))  # the first-batch check
    assert m.dual is not None
    duals = {type(d) for d in m.dual.modules()}
    assert (DualAttention in duals) != (DualExplicitSelfAttention in duals)
    assert (DualTorchvisionViT in duals) == (make is torchvision_vit)


@pytest.mark.parametrize("activation", [nn.GELU(), nn.GELU(approximate="tanh"), nn.SiLU(), nn.Tanh(), nn.Sigmoid()])
def test_smooth_activations(activation: nn.Module) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), activation, nn.LayerNorm(6), nn.Linear(6, 3)).double()
    fused = LinearizedNetwork(net, linearize="all", bn_affine="linearize", head_name="3", tangent="fused")
    autodiff = LinearizedNetwork(copy.deepcopy(net), linearize="all", bn_affine="linearize", head_name="3",
                                 tangent="autodiff")
    v = [torch.randn_like(d) for d in fused.delta_list()]
    x = torch.randn(5, 4, dtype=torch.float64)
    assert relative(fused.jvp(x, v)[1], autodiff.jvp(x, v)[1]) <= TOLERANCE


def test_dropout_is_off_in_train_mode() -> None:
    """LinearizedNetwork keeps the network at w0 in eval mode: train() changes nothing, dropout included."""
    fused = LinearizedNetwork(torchvision_vit(dropout=0.5), head_name="heads.head", tangent="fused")
    x = images(torchvision_vit)
    with torch.no_grad():
        for d in fused.delta_list():
            d.normal_(0, 0.1)
        fused.eval()
        want = fused(x)
        fused.train()
        assert torch.equal(fused(x), want)
    assert not any(isinstance(m, nn.Dropout) for m in fused.dual.modules())


def test_cross_attention_is_refused() -> None:
    fused = LinearizedNetwork(torchvision_vit(), head_name="heads.head", tangent="fused")
    attention = next(m for m in fused.dual.modules() if isinstance(m, DualExplicitSelfAttention))
    z = torch.randn(4, 5, 8, dtype=torch.float64)
    with pytest.raises(UnsupportedModuleError, match="self-attention"):
        attention(z, z.clone(), z)


@pytest.mark.parametrize("make", [our_vit, torchvision_vit])
def test_bf16_autocast_runs_on_the_fused_path(make) -> None:
    """trainer.precision=bf16-mixed: f_lin under CPU bf16 autocast is close to float32 (bf16 keeps ~3 digits),
    and δ's gradient comes back in float32."""
    net = make().float()
    m = LinearizedNetwork(net, head_name=HEADS[make], tangent="fused")
    with torch.no_grad():
        for d in m.delta_list():
            d.normal_(0, 0.05)
    x = images(make).float()
    want = m(x).detach()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = m(x)
    assert relative(got.float(), want) <= 5e-2
    grads = torch.autograd.grad(got.float().square().sum(), m.delta_list())
    assert all(g.dtype == torch.float32 and bool(torch.isfinite(g).all()) for g in grads)
