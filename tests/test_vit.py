"""The ViT of lqf_exp.models.vit: shapes, hooks on its projections, equality with PyTorch's multi-head attention,
forward-mode AD, head discovery, refusals, and the activation its config selects."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import Tensor, nn

from lqf_exp.head_init import init_head
from lqf_exp.methods.probe import head_of
from lqf_exp.models import build_network, head_name, make_activation, save_network_checkpoint
from lqf_exp.models.vit import Attention, VisionTransformer, vit_tiny
from lqf_exp.models.weights import packaged_checkpoint_path


def small_vit(**kw: int | float) -> VisionTransformer:
    """16-px images, 4-px patches (16 tokens), width 16, 2 blocks of 2 heads: fast enough for float64 checks."""
    config = {"image_size": 16, "patch_size": 4, "dim": 16, "depth": 2, "heads": 2, "mlp_ratio": 2.0, **kw}
    return VisionTransformer(num_classes=3, **config)  # type: ignore[arg-type]


def test_vit_tiny_shapes() -> None:
    net = vit_tiny(num_classes=7)
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 7)
    assert net.embed.pos_embed.shape == (1, 65, 64)  # 64 patches + the class token
    assert [name for name, _ in net.named_children()] == ["embed", "block1", "block2", "block3", "block4",
                                                          "norm", "head"]
    with pytest.raises(ValueError, match="image size"):
        net(torch.randn(1, 3, 28, 28))


def test_projections_are_linear_and_hooked() -> None:
    net = small_vit()
    attentions = [m for m in net.modules() if isinstance(m, Attention)]
    assert len(attentions) == 2
    seen: list[str] = []
    handles = []
    for name, module in net.named_modules():
        if name.endswith(("attn.q", "attn.k", "attn.v", "attn.out")):
            assert isinstance(module, nn.Linear)
            handles.append(module.register_forward_hook(lambda m, i, o, name=name: seen.append(name)))
    net(torch.randn(2, 3, 16, 16))
    for h in handles:
        h.remove()
    assert len(seen) == 8 and len(set(seen)) == 8  # every projection of every block ran through its module
    assert not any(isinstance(m, nn.MultiheadAttention) for m in net.modules())


def reference_forward(net: VisionTransformer, x: Tensor) -> Tensor:
    """The same network with attention computed by PyTorch's ``F.multi_head_attention_forward``."""
    tokens = net.embed(x).transpose(0, 1)  # [N, B, D], the layout multi_head_attention_forward takes
    dim = tokens.shape[-1]
    for i in range(1, net.depth + 1):
        block = getattr(net, f"block{i}")
        attn = block.attn
        h = block.norm1(tokens)
        out, _ = F.multi_head_attention_forward(
            h, h, h, dim, attn.heads,
            in_proj_weight=torch.cat([attn.q.weight, attn.k.weight, attn.v.weight]),
            in_proj_bias=torch.cat([attn.q.bias, attn.k.bias, attn.v.bias]),
            bias_k=None, bias_v=None, add_zero_attn=False, dropout_p=0.0,
            out_proj_weight=attn.out.weight, out_proj_bias=attn.out.bias, training=False, need_weights=False,
        )
        tokens = tokens + out
        tokens = tokens + block.mlp.linear2(F.gelu(block.mlp.linear1(block.norm2(tokens))))
    return net.head(net.norm(tokens[0]))


def test_equals_pytorch_multi_head_attention() -> None:
    torch.manual_seed(0)
    net = small_vit().double().eval()
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(net(x), reference_forward(net, x), rtol=0, atol=1e-6)


def test_forward_mode_ad_matches_finite_differences() -> None:
    torch.manual_seed(0)
    net = small_vit().double().eval()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    params = {k: v.detach() for k, v in net.named_parameters()}
    tangents = {k: torch.randn_like(v) for k, v in params.items()}

    def f(p: dict[str, Tensor]) -> Tensor:
        return torch.func.functional_call(net, p, (x,))

    _, jv = torch.func.jvp(f, (params,), (tangents,))
    eps = 1e-6
    plus = f({k: v + eps * tangents[k] for k, v in params.items()})
    minus = f({k: v - eps * tangents[k] for k, v in params.items()})
    torch.testing.assert_close(jv, (plus - minus) / (2 * eps), rtol=1e-6, atol=1e-7)


def test_head_discovery() -> None:
    net = small_vit()
    assert head_name(net) == "head" and head_of(net) is net.head
    resnet = build_network("small_resnet", 4, "relu", weights=None)
    assert head_name(resnet) == "fc" and head_of(resnet) is resnet.fc
    before = net.head.weight.clone()
    assert init_head(net, kind="random") is None  # finds `head` without being told its name
    assert not torch.equal(before, net.head.weight)


def test_build_vit_tiny_random_init() -> None:
    net = build_network("vit_tiny", num_classes=5, activation={"name": "gelu", "negative_slope": 0.01})
    assert isinstance(net, VisionTransformer) and net.head.out_features == 5
    assert all(isinstance(b.mlp.act, nn.GELU) for b in (net.block1, net.block4))
    ablation = build_network("vit_tiny", num_classes=5, activation="relu", weights="null")
    assert isinstance(ablation.block1.mlp.act, nn.ReLU)


def test_sqrt_cov_refused() -> None:
    with pytest.raises(ValueError, match="model.pooling=sqrt_cov.*no global pooling layer"):
        build_network("vit_tiny", 10, "gelu", pooling="sqrt_cov")


def test_no_imagenet_weights() -> None:
    with pytest.raises(ValueError, match="vit_tiny has no ImageNet weights"):
        build_network("vit_tiny", 10, "gelu", weights="imagenet")


def test_packaged_checkpoint_only_with_its_activation() -> None:
    with pytest.raises(ValueError, match="pretrained with activation 'gelu', but activation=leaky_relu"):
        build_network("vit_tiny", 10, "leaky_relu", weights="packaged", native_activation="gelu")
    with pytest.raises(ValueError, match="Unknown model.native_activation 'swish'"):
        build_network("vit_tiny", 10, "gelu", native_activation="swish")


def test_checkpoint_activation_must_match(tmp_path: Path) -> None:
    source = build_network("vit_tiny", 10, "gelu")
    path = save_network_checkpoint(source, tmp_path / "vit.pt", arch="vit_tiny", activation_name="gelu", meta={})
    loaded = build_network("vit_tiny", 4, "gelu", weights=path)  # new class count: the head is re-drawn
    torch.testing.assert_close(loaded.block2.attn.q.weight, source.block2.attn.q.weight)
    with pytest.raises(ValueError, match="pretrained with activation 'gelu'.*model.weights=null"):
        build_network("vit_tiny", 10, "relu", weights=path)


def test_gelu_activation() -> None:
    assert isinstance(make_activation("gelu", 0.3)(), nn.GELU)  # the slope does not apply to GELU
    with pytest.raises(ValueError, match="negative_slope"):
        make_activation("gelu", 2.0)


def test_model_config_selects_gelu(make_cfg: Callable[..., DictConfig]) -> None:
    assert make_cfg(["model=vit_tiny"]).activation.name == "gelu"
    assert make_cfg(["model=vit_b_16"]).activation.name == "gelu"
    assert make_cfg(["model=vit_tiny", "activation=relu"]).activation.name == "relu"
    assert make_cfg([]).activation.name == "leaky_relu"  # the ResNet default is untouched
    cfg = make_cfg(["model=vit_tiny"])
    assert cfg.model.arch == "vit_tiny" and cfg.model.weights == "packaged"


def test_packaged_checkpoint_is_the_source_network() -> None:
    """The shipped vit_tiny loads into the network the config builds, records GELU and its source accuracy, and
    classifies its source task's classes (5 outputs) with the weights it was saved with."""
    path = packaged_checkpoint_path("vit_tiny", "gelu")
    saved = torch.load(path, weights_only=True)
    assert saved["arch"] == "vit_tiny" and saved["activation"] == "gelu"
    assert saved["meta"]["data"] == "fmnist_source" and saved["meta"]["test_acc"] >= 0.90
    net = build_network("vit_tiny", 5, "gelu", weights="packaged", native_activation="gelu")
    for name, tensor in net.state_dict().items():
        torch.testing.assert_close(tensor, saved["state_dict"][name], rtol=0, atol=0)


@pytest.mark.parametrize(("model", "baseline", "lqf"), [("small_resnet", "relu", "leaky_relu"),
                                                      ("resnet50", "relu", "leaky_relu"),
                                                      ("vit_tiny", "gelu", "gelu")])
def test_recipes_take_the_networks_own_activation(make_cfg: Callable[..., DictConfig], model: str, baseline: str,
                                                  lqf: str) -> None:
    """The baselines run the activation the weights were pretrained with; LQF swaps ReLU only (a ResNet's)."""
    for experiment in ("nlft", "lpft", "probe", "gaf"):
        assert make_cfg([f"model={model}", f"experiment={experiment}"]).activation.name == baseline
    for experiment in ("lqf", "lqf_fc"):
        assert make_cfg([f"model={model}", f"experiment={experiment}"]).activation.name == lqf


def test_pretrain_recipe_is_a_transformers(make_cfg: Callable[..., DictConfig]) -> None:
    cfg = make_cfg(["experiment=pretrain_vit"])
    assert (cfg.task.name, cfg.model.arch, cfg.model.weights, cfg.data.name) == ("pretrain", "vit_tiny", None,
                                                                                  "fmnist_source")
    assert cfg.optim._target_ == "torch.optim.AdamW" and cfg.schedule.warmup_fraction > 0
    assert cfg.activation.name == "gelu"
