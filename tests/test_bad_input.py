"""Each bad input of a run fails before any training, with a message that names the value and the remedy."""

from __future__ import annotations

from pathlib import Path
from urllib.error import URLError

import pytest

from lqf_exp.pipeline import run
from lqf_exp.validation import ConfigError

from .conftest import SMOKE


def assert_nothing_trained(run_dir: Path) -> None:
    assert not (run_dir / "checkpoints").exists()
    assert not (run_dir / "metrics.json").exists()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.lr=-0.1", "optim.lr=-0.1"),
        ("activation.negative_slope=1.5", "activation.negative_slope=1.5"),
        ("data.shots=0", "data.shots=0"),
        ("method.head_init=zero", "Jacobian zero"),
    ],
)
def test_out_of_range_config(override: str, message: str, make_cfg, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        run(make_cfg([*SMOKE, "method=lqf", override]))
    assert_nothing_trained(tmp_path / "run")


def test_shots_larger_than_a_class(make_cfg, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"shots=500 is larger than the smallest class.*use shots <= \d+"):
        run(make_cfg([*SMOKE, "data.shots=500"]))
    assert_nothing_trained(tmp_path / "run")


def test_missing_dataset_root_names_path_and_layout(make_cfg, tmp_path: Path) -> None:
    missing = tmp_path / "no_such_dir"
    with pytest.raises(FileNotFoundError) as info:
        run(make_cfg([*SMOKE, "data=imagefolder", f"data.root={missing}"]))
    assert str(missing) in str(info.value) and "train" in str(info.value)
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        run(make_cfg([*SMOKE, "data=fashion_mnist_target", f"data.root={missing}"]))
    assert_nothing_trained(tmp_path / "run")


def test_checkpoint_that_is_not_a_state_dict(make_cfg, tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"definitely not a checkpoint")
    with pytest.raises(ValueError, match=f"{garbage}.*not a valid state dict"):
        run(make_cfg([*SMOKE, f"model.weights={garbage}"]))
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        run(make_cfg([*SMOKE, f"model.weights={tmp_path / 'nope.pt'}"]))
    assert_nothing_trained(tmp_path / "run")


def test_imagenet_weights_offline_say_how_to_pass_a_file(make_cfg, tmp_path: Path, monkeypatch) -> None:
    def offline(*args, **kwargs):
        raise URLError("no network")

    monkeypatch.setattr("torchvision.models._api.load_state_dict_from_url", offline)
    with pytest.raises(RuntimeError, match=r"could not be downloaded.*model\.weights="):
        run(make_cfg([*SMOKE, "model=resnet18", "model.weights=imagenet"]))
    assert_nothing_trained(tmp_path / "run")
