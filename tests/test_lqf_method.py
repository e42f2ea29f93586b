"""method=lqf through Lightning: what is trained, what stays frozen, checkpoints, head initialization."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from lqf_exp.methods import LQF
from lqf_exp.pipeline import build_module, run

from .conftest import SMOKE

LQF_SMOKE = [*SMOKE, "method=lqf"]


def build(make_cfg, overrides: list[str]) -> tuple[LQF, object]:
    cfg = make_cfg(overrides)
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    return build_module(cfg, datamodule), datamodule


@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_one_batch_lqf_run(loss: str, make_cfg, tmp_path: Path) -> None:
    payload = run(make_cfg([*LQF_SMOKE, f"loss={loss}"]))
    assert payload["factors"]["method"] == "lqf"
    assert 0 <= payload["metrics"]["test/acc"] <= 1
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["status"] == "finished"


def test_only_delta_is_trainable_and_lambda_comes_from_the_method_config(make_cfg) -> None:
    module, _ = build(make_cfg, [*LQF_SMOKE, "method.weight_decay=1e-3", "optim.weight_decay=0.5"])
    trainable = {name for name, p in module.named_parameters() if p.requires_grad}
    assert trainable and all(name.startswith("net.deltas.") for name in trainable)
    stepped = {id(p) for group in module.configure_optimizers().param_groups for p in group["params"]}
    assert stepped == {id(d) for d in module.linearized.delta_list()}
    assert module.weight_decay == pytest.approx(1e-3)  # the optim group is fine-tuning's, not LQF's
    assert module.curvature_targets().damping_offset == pytest.approx(1e-3)


def test_objective_adds_half_lambda_delta_squared(make_cfg) -> None:
    module, _ = build(make_cfg, [*LQF_SMOKE, "loss=mse", "method.weight_decay=0.5"])
    for delta in module.linearized.deltas.values():
        torch.nn.init.constant_(delta, 0.1)
    logits, labels = torch.randn(4, 10), torch.tensor([0, 1, 2, 3])
    numel = sum(d.numel() for d in module.linearized.deltas.values())
    expected = module.loss_fn(logits, labels) + 0.5 * 0.5 * 0.01 * numel
    torch.testing.assert_close(module.objective_value(logits, labels), expected)


def test_w0_and_bn_statistics_unchanged_by_training(make_cfg, tmp_path: Path) -> None:
    cfg = make_cfg([*LQF_SMOKE, "loss=mse", "trainer.limit_train_batches=3"])
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    module = build_module(cfg, datamodule)
    trainer = instantiate(cfg.trainer, logger=False, enable_checkpointing=False)
    module.trainer = trainer  # head initialization reads the datamodule from the trainer
    trainer.datamodule = datamodule
    before = {k: v.clone() for k, v in module.linearized.base_network.state_dict().items()}
    deltas_before = {k: v.clone() for k, v in module.linearized.deltas.items()}
    trainer.fit(module, datamodule=datamodule)
    after = module.linearized.base_network.state_dict()
    head = {"fc.weight", "fc.bias"}  # fitted by head_init before training, then frozen like the rest of w0
    assert all(torch.equal(before[k], after[k]) for k in before if k not in head)
    assert any(not torch.equal(deltas_before[k], v) for k, v in module.linearized.deltas.items())
    assert not any(m.training for m in module.linearized.base_network.modules())


def test_checkpoint_holds_delta_not_w0_and_reload_reproduces_predictions(make_cfg, tmp_path: Path) -> None:
    cfg_overrides = [*LQF_SMOKE, "loss=mse", "trainer.limit_train_batches=2"]
    run(make_cfg(cfg_overrides))
    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    keys = set(checkpoint["state_dict"])
    assert keys == {k for k in keys if k.startswith(("net.deltas.", "net.net.fc.", "val_acc_best."))} | {"head_ready"}
    assert checkpoint["lqf_solve"]["controller"]["solver"] is not None and checkpoint["lqf_solve"]["weight_decay"] > 0
    assert checkpoint["lqf_w0_source"] == {"model": "small_resnet", "weights": None, "pooling": "avg",
                                           "activation": "leaky_relu"}

    trained, datamodule = build(make_cfg, cfg_overrides)
    trained.on_load_checkpoint(checkpoint)
    trained.load_state_dict(checkpoint["state_dict"])
    fresh, _ = build(make_cfg, cfg_overrides)
    again = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    fresh.on_load_checkpoint(again)
    fresh.load_state_dict(again["state_dict"])
    images, _ = next(iter(datamodule.test_dataloader()))
    with torch.no_grad():
        assert torch.equal(trained(images), fresh(images))
        assert not torch.equal(trained(images), trained.linearized.apply_to_base(images))  # δ ≠ 0 was restored


def test_checkpoint_of_another_w0_is_refused(make_cfg, tmp_path: Path) -> None:
    run(make_cfg([*LQF_SMOKE, "loss=mse"]))
    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    other, _ = build(make_cfg, [*LQF_SMOKE, "loss=mse", "activation=relu"])
    with pytest.raises(ValueError, match="linearized around"):
        other.on_load_checkpoint(checkpoint)


def test_zero_head_is_refused_with_the_reason(make_cfg) -> None:
    from lqf_exp.validation import ConfigError, validate_config

    with pytest.raises(ConfigError, match="Jacobian zero"):
        validate_config(make_cfg([*LQF_SMOKE, "method.head_init=zero"]))
    with pytest.raises(ValueError, match="only the head would learn"):
        build(make_cfg, [*LQF_SMOKE, "method.head_init=zero"])


def test_linearize_from_a_block(make_cfg) -> None:
    module, _ = build(make_cfg, [*LQF_SMOKE, "method.linearize=layer3"])
    names = module.linearized.linearized_names
    assert names and all(n.startswith(("layer3.", "fc.")) for n in names)


def test_a_diverging_solve_stops_and_is_recorded_as_such(make_cfg, tmp_path: Path) -> None:
    from lqf_exp.solvers import DivergenceError

    cfg = make_cfg([*LQF_SMOKE, "solver=sgd", "solver.lr=1e6", "solver.schedule=constant", "method.weight_decay=1e-4",
                    "trainer.max_epochs=5", "trainer.limit_train_batches=2", "method.stop.max_epochs=5"])
    with pytest.raises(DivergenceError, match=r"'lr': 1000000\.0"):
        run(cfg)
    record = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert record["status"] == "diverged" and "'solver': 'sgd'" in record["error"]
    assert record["metrics"] == {} and not (tmp_path / "run" / "error.json").exists()


def test_one_shot_chooses_penalties_on_validation_not_leave_one_out(make_cfg, tmp_path) -> None:  # noqa: ANN001
    """With one sample per class, leaving it out leaves its class unseen and leave-one-out prefers the largest
    penalty; the head's l2 and λ are then chosen on the validation loss."""
    metrics = run(make_cfg(["data.shots=1", "logger=none", "trainer.accelerator=cpu",
                            "callbacks.progress_bar.refresh_rate=0"], tmp_path))
    selection = metrics["solver"]["weight_decay_selection"]
    assert selection["method"] == "validation path" and "too few to leave one out" in selection["why"]
    assert metrics["solver"]["head_l2"] is not None


def test_rule_validation_takes_the_path_where_leave_one_out_fits(make_cfg, tmp_path) -> None:  # noqa: ANN001
    """``weight_decay_selection.rule=validation``: the validation-loss path at 5 shots, where leave-one-out would
    decide; the λ kept is the path's lowest validation loss."""
    metrics = run(make_cfg(["data.shots=5", "logger=none", "trainer.accelerator=cpu",
                            "callbacks.progress_bar.refresh_rate=0", "method.weight_decay_selection.rule=validation",
                            "method.weight_decay_selection.path=[100.0,1.0,0.01]"], tmp_path))
    solver = metrics["solver"]
    assert solver["weight_decay_selection"] == {"method": "validation path", "path": [100.0, 1.0, 0.01],
                                                "why": "weight_decay_selection.rule=validation"}
    path = solver["weight_decay_path"]
    assert [step["weight_decay"] for step in path][:2] == [100.0, 1.0]
    best = min(path, key=lambda step: step["val_loss"])
    assert solver["weight_decay"] == best["weight_decay"]


def test_leave_one_out_run_takes_the_dual_solution_and_cache_runs_give_val_metrics(make_cfg, tmp_path: Path) -> None:
    """λ by exact leave-one-out solves the dual system at that λ: the run takes δ* = Jᵀu (no iteration) and its
    objective is L* itself; a run solved on the Jacobian cache still validates, tests and checkpoints."""
    common = ["logger=none", "data.shots=3", "data.batch_size=16", "model.weights=null"]
    exact = run(make_cfg([*common], tmp_path / "exact"))
    solve = exact["solver"]
    assert solve["exact"] and solve["status"] == "converged" and solve["epochs"] == 0
    assert solve["weight_decay_selection"]["method"] == "leave-one-out" and solve["jacobian_cache"]["used"]
    assert abs(solve["gap"]) < 1e-6
    assert {"val/acc", "test/acc"} <= set(exact["metrics"])
    fixed = run(make_cfg([*common, "method.weight_decay=1e-2"], tmp_path / "fixed"))
    assert fixed["solver"]["in_memory"] and fixed["solver"]["status"] == "converged"
    assert {"val/acc", "test/acc"} <= set(fixed["metrics"])
    assert (tmp_path / "fixed" / "checkpoints" / "last.ckpt").is_file()


def test_lqf_sgd_iterates_where_leave_one_out_solved_the_problem(make_cfg, tmp_path: Path) -> None:
    """experiment=lqf_sgd studies the optimizer (its learning rate): with λ by leave-one-out it still runs SGD from
    δ = 0 instead of taking the dual system's δ*, and its gap is measured against that δ*'s objective."""
    common = ["logger=none", "data.shots=3", "data.batch_size=16", "model.weights=null", "method.stop.max_epochs=2"]
    sgd = run(make_cfg([*common, "experiment=lqf_sgd"], tmp_path / "sgd"))
    solve = sgd["solver"]
    assert solve["weight_decay_selection"]["method"] == "leave-one-out"
    assert not solve["exact"] and solve["epochs"] == 2 and solve["status"] == "capped"
    assert solve["gap"] > 1e-6  # two passes of SGD do not reach L*, and the record says by how much
