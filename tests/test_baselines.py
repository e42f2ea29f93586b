"""The baselines get the same care as LQF: the probe is solved (its l2 chosen on validation), LP-FT starts from that
probe's head, BatchNorm can be frozen, and fine-tuning trains for a step budget that does not shrink with the shots
and stops early on the validation loss."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.optim import SGD
from torch.utils.data import DataLoader, Subset

from lqf_exp.head_fit import fit_head_on_validation, fit_ridge_head
from lqf_exp.head_init import fit_validated_head
from lqf_exp.losses import CrossEntropyLoss
from lqf_exp.methods.schedules import constant, cosine, step_decay, warmup_cosine
from lqf_exp.models import build_network
from lqf_exp.pipeline import build, build_module, run
from lqf_exp.results import METRICS_FILE
from lqf_exp.solvers import DivergenceError

from .conftest import SMOKE

QUIET = ["logger=none", "callbacks.progress_bar.refresh_rate=0", "skip_finished=false", "resume=false"]


def test_validated_head_fit_keeps_the_l2_of_lowest_validation_loss() -> None:
    g = torch.Generator().manual_seed(0)
    features, labels = torch.randn(40, 6, generator=g, dtype=torch.float64), torch.arange(40) % 3
    val_features, val_labels = torch.randn(30, 6, generator=g, dtype=torch.float64), torch.arange(30) % 3

    def loss(fit):  # noqa: ANN001, ANN202
        return float(((val_features @ fit.weight.T + fit.bias).argmax(1) != val_labels).double().mean() + fit.l2)

    chosen = fit_head_on_validation(lambda l2: fit_ridge_head(features, labels, 3, 15.0, l2), loss, (1e-3, 1.0, 10.0))
    assert set(chosen.curve) == {1e-3, 1.0, 10.0}
    assert chosen.curve[chosen.fit.l2] == min(chosen.curve.values())
    expected = fit_ridge_head(features, labels, 3, 15.0, chosen.fit.l2)
    torch.testing.assert_close(chosen.fit.weight, expected.weight)
    with pytest.raises(ValueError, match="empty"):
        fit_head_on_validation(lambda l2: expected, loss, ())


def test_probe_is_solved_and_lp_ft_starts_from_its_head(make_cfg, tmp_path: Path) -> None:
    probe = run(make_cfg([*SMOKE, "method=probe", "loss=ce", "activation=relu"], tmp_path / "probe"))
    curve = probe["head"]["head_l2_curve"]
    assert len(curve) == 9 and curve[f"{probe['head']['head_l2']:g}"] == min(curve.values())
    assert probe["steps"] == 0  # solved, not trained

    # One fine-tuning step at a negligible lr leaves the head where LP-FT started it: the validated probe head of
    # the w0 network on the samples the run trains on (one batch of 16 in a smoke run).
    overrides = [*SMOKE, "experiment=lpft", "optim.lr=1e-12", "trainer.max_steps=1", "trainer.min_steps=1",
                 "trainer.val_check_interval=1"]
    lpft = run(make_cfg(overrides, tmp_path / "lpft"))
    assert lpft["steps"] == 1 and lpft["head"]["head_l2"] == probe["head"]["head_l2"]
    trained = torch.load(tmp_path / "lpft" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]

    cfg = make_cfg(overrides, tmp_path / "reference")
    datamodule = build(cfg.data)
    datamodule.setup("fit")
    net = build_module(cfg, datamodule).net
    loader = lambda data: DataLoader(data, batch_size=64)  # noqa: E731
    chosen = fit_validated_head(net, loader(Subset(datamodule.train_dataset, range(16))),
                                loader(datamodule.val_dataset), CrossEntropyLoss())
    assert chosen.fit.l2 == lpft["head"]["head_l2"]
    torch.testing.assert_close(trained["net.fc.weight"], chosen.fit.weight, atol=1e-6, rtol=0)
    torch.testing.assert_close(trained["net.fc.bias"], chosen.fit.bias, atol=1e-6, rtol=0)


# probe (LP-FT): the head's fit toggles the modules' modes. With cross-entropy, as LP-FT trains: the ridge head of
# the default MSE loss, fitted on the 48 images of the smoke run, leaves losses that blow up frozen-BN fine-tuning.
@pytest.mark.parametrize("head", [["method.head_init=random"], ["method.head_init=probe", "loss=ce"]])
def test_frozen_batchnorm_keeps_its_statistics_and_trains_its_affine(make_cfg, tmp_path: Path, head: list) -> None:
    run(make_cfg([*SMOKE, "method=finetune", "method.bn=eval", "optim.lr=1e-3", "model.weights=packaged",
                  "trainer.limit_train_batches=3", *head], tmp_path))
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    torch.manual_seed(0)
    w0 = build_network("small_resnet", 10, "leaky_relu", weights="packaged").state_dict()
    torch.testing.assert_close(state["net.bn1.running_mean"], w0["bn1.running_mean"], rtol=0, atol=0)
    torch.testing.assert_close(state["net.layer2.bn1.running_var"], w0["layer2.bn1.running_var"], rtol=0, atol=0)
    assert not torch.equal(state["net.bn1.weight"], w0["bn1.weight"])


def test_low_shot_fine_tuning_gets_its_step_budget_and_early_stopping_ends_a_blow_up(make_cfg, tmp_path: Path) -> None:
    budget = ["experiment=nlft", "data.shots=1", *QUIET, "trainer.val_check_interval=5", "trainer.limit_val_batches=1"]
    # 10 images are one batch: an epoch budget would mean one step per epoch; the step budget is the same at any shots.
    steps = run(make_cfg([*budget, "trainer.min_steps=12", "trainer.max_steps=12"], tmp_path / "budget"))
    assert steps["steps"] == 12 and steps["epochs"] == 12
    assert json.loads((tmp_path / "budget" / METRICS_FILE).read_text())["head"]["head_init"] == "random"
    stopped = run(make_cfg([*budget, "optim.lr=0.05", "trainer.min_steps=0", "trainer.max_steps=200",
                            "callbacks.early_stopping.patience=1"], tmp_path / "stopped"))
    assert stopped["steps"] < 200


def test_a_fine_tuning_blow_up_is_recorded_as_diverged(make_cfg, tmp_path: Path) -> None:
    with pytest.raises(DivergenceError, match=r"method=finetune diverged at step \d+: training loss (nan|inf)"):
        run(make_cfg([*SMOKE, "method=finetune", "optim.lr=1e12", "trainer.limit_train_batches=5"]))
    written = json.loads((tmp_path / "run" / METRICS_FILE).read_text())
    assert written["status"] == "diverged" and "optim.lr" in written["error"]
    # Where and by which code, as a finished run records it (the report header counts cells by both).
    assert written["device"] == "cpu" and set(written) >= {"code", "duration_s", "output_dir"}


def test_schedules_are_fractions_of_the_run() -> None:
    def lrs(make, total: int) -> list[float]:  # noqa: ANN001
        optimizer = SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        schedule = make(optimizer, total)
        out = []
        for _ in range(total):
            out.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            schedule.step()
        return out + [optimizer.param_groups[0]["lr"]]

    assert lrs(cosine, 10)[-1] == pytest.approx(0.0, abs=1e-12) and lrs(cosine, 10)[5] == pytest.approx(0.5)
    assert lrs(step_decay, 10) == pytest.approx([1.0] * 5 + [0.1] * 3 + [0.01] * 3)
    assert lrs(constant, 4) == [1.0] * 5
    # 2 warm-up steps of 10 (1/2, 2/2), then a cosine over the 8 others down to final_factor
    warm = lrs(lambda opt, total: warmup_cosine(opt, total, warmup_fraction=0.2, final_factor=0.1), 10)
    assert warm[:3] == pytest.approx([0.5, 1.0, 1.0])
    assert warm[6] == pytest.approx(0.1 + 0.9 * 0.5) and warm[-1] == pytest.approx(0.1)
    assert lrs(lambda opt, total: warmup_cosine(opt, total, warmup_fraction=0.0), 10) == pytest.approx(lrs(cosine, 10))
    with pytest.raises(ValueError, match=r"warmup_fraction is a fraction of the run in \[0, 1\), got 1.5"):
        warmup_cosine(SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), 10, warmup_fraction=1.5)
    with pytest.raises(ValueError, match=r"fractions of the run in \(0, 1\), got \[0.5, 2.0\]"):
        step_decay(SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), 10, milestones=(0.5, 2.0))
    with pytest.raises(ValueError, match="total_steps=0"):
        cosine(SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), 0)
