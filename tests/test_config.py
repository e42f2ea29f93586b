"""Every option of every config group composes and resolves; bad values fail early with a clear message."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from lqf_exp.config import CONFIG_DIR
from lqf_exp.validation import ConfigError, validate_config

from .conftest import compose_config

GROUPS = sorted(p.name for p in CONFIG_DIR.iterdir() if p.is_dir() and p.name != "hydra")
OPTIONS = [
    (group, path.stem)
    for group in GROUPS
    for path in sorted((CONFIG_DIR / group).glob("*.yaml"))
    if not (group == "trainer" and path.stem == "default")
]


def test_every_group_has_options() -> None:
    required = {"model", "activation", "loss", "precond", "solver", "method", "data", "optim", "trainer", "logger",
                "callbacks", "paths", "experiment", "debug", "task"}
    assert required <= set(GROUPS)
    assert all(any(g == group for g, _ in OPTIONS) for group in required)


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_option_composes_and_resolves(group: str, option: str, tmp_path: Path) -> None:
    prefix = "+" if group == "sweep" else ""  # sweeps are not in the defaults list
    cfg = compose_config([f"{prefix}{group}={option}"], tmp_path)
    resolved = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    assert isinstance(resolved, dict)
    assert cfg.hydra.runtime.choices[group] == option


@pytest.mark.parametrize("experiment", ["nlft", "lqf_sgd"])
def test_every_robustness_cell_resolves(experiment: str, tmp_path: Path) -> None:
    """The robustness sweep composes the SGD solver beside fine-tuning too: its interpolations must resolve."""
    cfg = compose_config(["+sweep=robustness", f"experiment={experiment}", "+lr=0.01"], tmp_path)
    resolved = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    assert isinstance(resolved, dict) and resolved["solver"]["lr"] == 0.01


def test_defaults_are_the_papers_lqf(tmp_path: Path) -> None:
    cfg = compose_config([], tmp_path)
    assert cfg.method._target_.endswith(".LQF") and cfg.loss._target_.endswith("ScaledMSELoss")
    assert cfg.activation.name == "leaky_relu" and cfg.precond.name == "kfac"
    assert cfg.method.solver._target_.endswith("AdaptiveSolver") and cfg.method.weight_decay == "auto"
    assert cfg.model.arch == "small_resnet" and cfg.model.weights == "packaged" and cfg.data.name == "digits"


def test_ablation_groups_compose_independently(tmp_path: Path) -> None:
    cfg = compose_config(["activation=relu", "loss=mse", "method=probe", "optim=adam"], tmp_path)
    assert cfg.activation.name == "relu"
    assert cfg.loss._target_.endswith("ScaledMSELoss") and cfg.loss.target_scale == 15.0
    assert cfg.method._target_.endswith("Probe")
    assert cfg.optim._target_ == "torch.optim.Adam"


def test_task_pretrain_sets_source_data_and_random_init(tmp_path: Path) -> None:
    cfg = compose_config(["task=pretrain"], tmp_path)
    assert cfg.task.name == "pretrain"
    assert cfg.data.name == "fmnist_source"
    assert list(cfg.data.classes) == [0, 1, 2, 3, 4]
    assert cfg.model.weights is None
    assert cfg.loss._target_.endswith("CrossEntropyLoss")


def test_run_name_spells_out_the_factors(tmp_path: Path) -> None:
    cfg = compose_config(["activation=relu", "loss=mse", "seed=3"], tmp_path)
    assert cfg.run_name.split("-") == ["digits", "small_resnet", "relu", "mse", "kfac", "lqf", "s3"]


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("optim.lr=-0.1", "optim.lr=-0.1"),
        ("optim.lr=0", "optim.lr=0"),
        ("optim.weight_decay=-1e-4", "optim.weight_decay"),
        ("optim.momentum=1.0", "optim.momentum"),
        ("activation.negative_slope=1.0", "activation.negative_slope=1.0"),
        ("activation.negative_slope=-0.1", "activation.negative_slope"),
        ("data.shots=0", "data.shots=0"),
        ("data.batch_size=0", "data.batch_size"),
        ("trainer.max_epochs=0", "trainer.max_epochs"),
        ("loss.target_scale=0", "loss.target_scale"),
        ("seed=abc", "seed='abc'"),
        ("method.weight_decay=-1", "method.weight_decay=-1"),
        ("method.weight_decay=often", "method.weight_decay='often'"),
        ("method.head_init_l2=-0.5", "method.head_init_l2"),
    ],
)
def test_out_of_range_values_are_named(override: str, key: str, tmp_path: Path) -> None:
    overrides = [override] + (["loss=mse"] if override.startswith("loss.") else [])
    cfg = compose_config(overrides, tmp_path)
    with pytest.raises(ConfigError, match="invalid config value") as info:
        validate_config(cfg)
    assert key in str(info.value)
    assert "expected" in str(info.value)


def test_defaults_are_valid(tmp_path: Path) -> None:
    validate_config(compose_config([], tmp_path))
