"""Tests of lqf_exp.models: activation swap, architectures, checkpoint I/O and configs (never downloads)."""

from __future__ import annotations

import logging
import pickle
from pathlib import Path
from urllib.error import URLError

import pytest
import torch
import torchvision.models._api as tv_api
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn
from torchvision import models as tvm

from lqf_exp.models import (
    SmallResNet,
    build_network,
    load_network_weights,
    make_activation,
    save_network_checkpoint,
    swap_activations,
)
from lqf_exp.models import weights as W
from lqf_exp.models.activations import count_activations

CONF = Path(__file__).resolve().parent.parent / "conf"
RELU = {"name": "relu"}
LEAKY = {"name": "leaky_relu", "negative_slope": 0.2}


@pytest.fixture(autouse=True)
def _no_download(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to fetch torchvision weights fails the test instead of touching the network."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a test tried to download weights")

    monkeypatch.setattr(tv_api, "load_state_dict_from_url", refuse)


def _assert_no_relu_no_inplace(net: nn.Module) -> None:
    assert not any(type(m) is nn.ReLU for m in net.modules())
    assert not [n for n, m in net.named_modules() if getattr(m, "inplace", False)]


def _small(num_classes: int = 10, act: dict = RELU) -> nn.Module:
    torch.manual_seed(0)
    return build_network("small_resnet", num_classes, act).eval()


# ---------------------------------------------------------------- activations
@pytest.mark.parametrize(
    ("arch", "expected", "size"), [("small_resnet", 7, 32), ("resnet18", 9, 32), ("resnet50", 17, 64)]
)
def test_build_swaps_every_activation(arch: str, expected: int, size: int) -> None:
    ref = SmallResNet(3) if arch == "small_resnet" else getattr(tvm, arch)(weights=None)
    assert count_activations(ref) == expected
    assert swap_activations(ref, make_activation("leaky_relu", 0.2)) == expected
    _assert_no_relu_no_inplace(ref)

    net = build_network(arch, 7, LEAKY)
    _assert_no_relu_no_inplace(net)
    leaky = [m for m in net.modules() if isinstance(m, nn.LeakyReLU)]
    assert len(leaky) == expected and len({id(m) for m in leaky}) == expected  # none shared
    assert all(m.negative_slope == 0.2 for m in leaky)
    assert isinstance(net.fc, nn.Linear) and net.fc.out_features == 7
    assert net.eval()(torch.randn(2, 3, size, size)).shape == (2, 7)


def test_relu_build_has_no_inplace() -> None:
    net = build_network("resnet18", 4, RELU)
    assert sum(type(m) is nn.ReLU for m in net.modules()) == 9
    assert not any(getattr(m, "inplace", False) for m in net.modules())


def test_small_resnet_uses_no_functional_relu(monkeypatch: pytest.MonkeyPatch) -> None:
    net = _small(act=LEAKY)

    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("functional relu called")

    for mod, name in [
        (torch.nn.functional, "relu"),
        (torch.nn.functional, "relu_"),
        (torch, "relu_"),
        (torch, "relu"),
    ]:
        monkeypatch.setattr(mod, name, boom)
    net(torch.randn(2, 3, 28, 28)).sum().backward()
    assert [n for n, _ in net.named_children()][:5] == ["conv1", "bn1", "act", "layer1", "layer2"]


def test_leaky_slope_is_used() -> None:
    x = torch.tensor([-2.0, -0.5, 0.0, 3.0])
    out = make_activation("leaky_relu", 0.1)()(x)
    torch.testing.assert_close(out, torch.tensor([-0.2, -0.05, 0.0, 3.0]))
    torch.testing.assert_close(make_activation("relu")()(x), torch.tensor([0.0, 0.0, 0.0, 3.0]))
    assert make_activation("leaky_relu", 0.0)().negative_slope == 0.0


@pytest.mark.parametrize("slope", [-0.1, 1.0, 2.5])
def test_negative_slope_range(slope: float) -> None:
    with pytest.raises(ValueError, match=r"negative_slope must be in \[0, 1\)"):
        make_activation("leaky_relu", slope)
    with pytest.raises(ValueError, match="negative_slope"):
        build_network("small_resnet", 3, {"name": "leaky_relu", "negative_slope": slope})


def test_unknown_activation_and_arch() -> None:
    with pytest.raises(ValueError, match="valid names are: relu, leaky_relu, gelu"):
        make_activation("tanh")
    with pytest.raises(ValueError, match="valid names"):
        build_network("small_resnet", 3, {"name": "tanh"})
    with pytest.raises(ValueError, match="Unknown activation config keys"):
        build_network("small_resnet", 3, {"name": "relu", "slope": 0.1})
    with pytest.raises(ValueError, match="small_resnet, resnet18, resnet50"):
        build_network("vgg11", 3, RELU)


# ---------------------------------------------------------------- checkpoints
def test_roundtrip_identical_outputs(tmp_path: Path) -> None:
    net = _small(act=LEAKY)
    net.train()(torch.randn(16, 3, 32, 32))  # move BN running stats away from their init
    net.eval()
    path = tmp_path / "sub" / "ck.pt"
    assert save_network_checkpoint(net, path, "small_resnet", "leaky_relu", {"epoch": 3}) == path
    assert [p.name for p in path.parent.iterdir()] == ["ck.pt"]  # no temp file left behind
    torch.manual_seed(1)  # a different random init, so equality proves the load
    again = build_network("small_resnet", 10, LEAKY, weights=str(path)).eval()
    x = torch.randn(4, 3, 32, 32)
    torch.testing.assert_close(again(x), net(x), rtol=0, atol=0)
    saved = torch.load(path, weights_only=True)
    assert saved["arch"] == "small_resnet" and saved["activation"] == "leaky_relu"
    assert saved["meta"] == {"epoch": 3}


def test_new_class_count_keeps_backbone(tmp_path: Path) -> None:
    net = _small(10)
    path = save_network_checkpoint(net, tmp_path / "ck.pt", "small_resnet", "relu", {})
    new = build_network("small_resnet", 4, RELU, weights=path)
    assert new.fc.weight.shape == (4, 64) and new.fc.bias.shape == (4,)
    old_sd, new_sd = net.state_dict(), new.state_dict()
    backbone = [k for k in old_sd if not k.startswith("fc.")]
    assert len(backbone) == len(new_sd) - 2
    for k in backbone:
        assert torch.equal(old_sd[k], new_sd[k]), k


def test_lightning_prefixed_checkpoint(tmp_path: Path) -> None:
    net = _small(5)
    ckpt = {
        "state_dict": {f"net.{k}": v for k, v in net.state_dict().items()},
        "epoch": 2,
        "global_step": 10,
        "pytorch-lightning_version": "2.6.6",
    }
    torch.save(ckpt, tmp_path / "last.ckpt")
    torch.manual_seed(3)
    new = build_network("small_resnet", 5, RELU, weights=tmp_path / "last.ckpt").eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(new(x), net(x), rtol=0, atol=0)
    plain = _small(5)
    torch.save(net.state_dict(), tmp_path / "plain.pt")
    assert load_network_weights(plain, tmp_path / "plain.pt") == {}
    torch.testing.assert_close(plain(x), net(x), rtol=0, atol=0)


def test_activation_mismatch_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = save_network_checkpoint(_small(), tmp_path / "ck.pt", "small_resnet", "relu", {})
    with caplog.at_level(logging.WARNING, logger="lqf_exp.models.weights"):
        build_network("small_resnet", 10, LEAKY, weights=path)
    assert "trained with activation 'relu' but 'leaky_relu'" in caplog.text


def _bad_files(tmp_path: Path) -> dict[str, Path]:
    good = save_network_checkpoint(_small(), tmp_path / "good.pt", "small_resnet", "relu", {})
    files = {
        "random": tmp_path / "random.pt",
        "truncated": tmp_path / "trunc.pt",
        "object": tmp_path / "object.pt",
        "list": tmp_path / "list.pt",
    }
    files["random"].write_bytes(
        torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0))
        .to(torch.uint8)
        .numpy()
        .tobytes()
    )
    files["truncated"].write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    files["object"].write_bytes(pickle.dumps(Path("x"), protocol=2))  # a pickle weights_only refuses
    torch.save([torch.zeros(2)], files["list"])
    return files


@pytest.mark.parametrize("kind", ["random", "truncated", "object", "list"])
def test_invalid_file_is_value_error(tmp_path: Path, kind: str) -> None:
    path = _bad_files(tmp_path)[kind]
    with pytest.raises(ValueError, match="is not a valid state dict") as err:
        build_network("small_resnet", 10, RELU, weights=str(path))
    assert str(path) in str(err.value)
    if kind != "list":
        assert err.value.__cause__ is not None


def test_wrong_arch_and_missing_file(tmp_path: Path) -> None:
    path = save_network_checkpoint(_small(), tmp_path / "small.pt", "small_resnet", "relu", {})
    with pytest.raises(ValueError, match="does not match the network") as err:
        build_network("resnet18", 10, RELU, weights=str(path))
    msg = str(err.value)
    assert str(path) in msg and "'small_resnet'" in msg
    assert "missing: layer1.0.conv1.weight" in msg and "shape mismatch: conv1.weight" in msg
    missing = tmp_path / "nope.pt"
    with pytest.raises(FileNotFoundError, match="not found") as err2:
        build_network("small_resnet", 10, RELU, weights=str(missing))
    assert str(missing) in str(err2.value)


def test_imagenet_download_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(url: str, *args: object, **kwargs: object) -> None:
        raise URLError("network unreachable")

    monkeypatch.setattr(tv_api, "load_state_dict_from_url", offline)
    with pytest.raises(RuntimeError, match="could not be downloaded") as err:
        build_network("resnet18", 10, RELU, weights="imagenet")
    msg = str(err.value)
    assert tvm.ResNet18_Weights.IMAGENET1K_V1.url in msg
    assert "model.weights=/path/to/file.pth" in msg and "model.weights=null" in msg
    assert str(Path(torch.hub.get_dir()) / "checkpoints") in msg
    assert isinstance(err.value.__cause__, URLError)
    with pytest.raises(ValueError, match="small_resnet has no ImageNet weights"):
        build_network("small_resnet", 10, RELU, weights="imagenet")


def test_packaged_checkpoint(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(W, "PACKAGED_CHECKPOINT_DIR", tmp_path)
    expected = tmp_path / "small_resnet_fmnist_source_leaky_relu.pt"
    with pytest.raises(FileNotFoundError, match="Rebuilding the source checkpoints") as err:
        build_network("small_resnet", 10, LEAKY, weights="packaged")
    assert str(expected) in str(err.value)
    net = _small(act=LEAKY)
    save_network_checkpoint(net, expected, "small_resnet", "leaky_relu", {})
    loaded = build_network("small_resnet", 10, LEAKY, weights="packaged").eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded(x), net(x), rtol=0, atol=0)


def test_save_refuses_non_plain_meta(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="plain Python types"):
        save_network_checkpoint(_small(), tmp_path / "ck.pt", "small_resnet", "relu", {"p": Path("x")})
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------- configs
@pytest.mark.parametrize("model", ["small_resnet", "resnet18", "resnet50"])
@pytest.mark.parametrize("act", ["relu", "leaky_relu"])
def test_configs_instantiate(model: str, act: str) -> None:
    model_cfg = OmegaConf.load(CONF / "model" / f"{model}.yaml")
    act_cfg = OmegaConf.load(CONF / "activation" / f"{act}.yaml")
    assert "activation" not in model_cfg and "num_classes" not in model_cfg
    assert model_cfg.weights == ("packaged" if model == "small_resnet" else "imagenet")
    net = instantiate(model_cfg, weights=None, activation=act_cfg, num_classes=3)
    assert not any(getattr(m, "inplace", False) for m in net.modules())
    assert net.fc.out_features == 3
    kinds = {type(m) for m in net.modules() if isinstance(m, (nn.ReLU, nn.LeakyReLU))}
    assert kinds == ({nn.LeakyReLU} if act == "leaky_relu" else {nn.ReLU})
    assert all(m.negative_slope == 0.01 for m in net.modules() if isinstance(m, nn.LeakyReLU))
