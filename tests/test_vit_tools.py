"""The solvers and tools on a vision transformer (issue 19, item 4): ``model=vit_tiny model.weights=null`` at a test
size (8-px digits, 4-px patches, width 16, 2 blocks of 2 heads), through ``lqf_exp.pipeline.run`` as the CLI runs it.

- solver=cg and solver=adaptive end where solver=kernel's closed form is (δ, objective, test accuracy);
- weight_decay=auto chooses the λ of least exact leave-one-out error and solves at it;
- influence on a ViT run dir predicts what retraining without a sample changes on the test set;
- task=online: the warm-started increments end where the paragon does;
- trainer=ddp on 2 CPU ranks reports what one process reports (one small case, ``slow`` as tests/test_ddp.py);
- trainer.precision=bf16-mixed: a working run, or a clear error before any solve that names the option and what is
  valid;
- every recipe and the ablation sweep compose with the ViT (the runs themselves: tests/test_smoke_recipes.py on the
  default network).

Always ``model.weights=null``: the tests must hold when the default becomes a packaged checkpoint.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig

from lqf_exp.config import compose_config
from lqf_exp.influence import load_finished_run
from lqf_exp.influence.__main__ import main as influence_main
from lqf_exp.methods import LQF
from lqf_exp.pipeline import run

from .conftest import REPO_ROOT

# One torch thread: the tensors are tiny, and a second thread on 2 busy cores only costs time.
pytestmark = pytest.mark.usefixtures("one_thread")  # tests/helpers/runtime.py

VIT = ["model=vit_tiny", "model.weights=null", "+model.image_size=8", "+model.patch_size=4", "+model.dim=16",
       "+model.depth=2", "+model.heads=2", "data.image_size=8"]
# 3 digits per class (30 samples, batches of 16), scored on digits' 143 val and 359 test images; no sanity pass,
# no logger, no progress bar; a fresh run in every directory.
TINY = [*VIT, "data.shots=3", "data.batch_size=16", "logger=none", "trainer.accelerator=cpu",
        "trainer.num_sanity_val_steps=0", "callbacks.progress_bar.refresh_rate=0", "skip_finished=false",
        "resume=false"]
TEST_SIZE = 359
MakeCfg = Callable[..., DictConfig]


def solve(overrides: list[str], out: Path) -> dict[str, Any]:
    """``run`` of ``TINY + overrides`` into ``out`` (composed as the CLI composes it)."""
    cfg = compose_config([*TINY, *overrides], out)
    GlobalHydra.instance().clear()
    return run(cfg)


def deltas(metrics: dict[str, Any]) -> dict[str, torch.Tensor]:
    """δ of a finished LQF run, from its final checkpoint, by name."""
    state = torch.load(metrics["final_checkpoint"], weights_only=False, map_location="cpu")["state_dict"]
    found = {k: v.double() for k, v in state.items() if k.startswith("net.deltas.")}
    assert found, sorted(state)[:10]
    return found


def flat(named: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([named[k].reshape(-1) for k in sorted(named)])


def relative(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return float((flat(a) - flat(b)).norm() / flat(b).norm())


# -- the solvers: one strongly convex problem, solved in float64 ------------------------------------------------
# λ = 10: CG reaches 1e-9 of its start in a dozen passes; at λ = 1 it needs ~100 through network passes.
FLOAT64 = ["trainer.precision=64-true", "method.weight_decay=10.0"]
TIGHT = ["method.stop.rel_gap=1e-12", "method.stop.max_epochs=100"]


@pytest.fixture(scope="module")
def closed_form(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """solver=kernel: δ* of the dual system in one pass, the reference the iterative solvers must reach."""
    metrics = solve([*FLOAT64, "solver=kernel", "precond=none"], tmp_path_factory.mktemp("kernel") / "run")
    assert metrics["status"] == "finished" and metrics["solver"]["status"] == "converged"
    return metrics


@pytest.mark.parametrize("solver", [
    ["solver=cg", "solver.tol=1e-10", "precond=none"],  # on the Jacobian cache
    ["solver=adaptive", "precond=none"],  # on the cache: full batch, then hands over to CG
    # Through network passes every layer needs ~90 CG passes (15 s): the passes are checked on the head (K-FAC),
    # the last block (online) and under DDP below.
], ids=["cg", "adaptive"])
def test_iterative_solvers_reach_the_closed_form(solver: list[str], closed_form: dict[str, Any],
                                                 tmp_path: Path) -> None:
    metrics = solve([*FLOAT64, *TIGHT, *solver], tmp_path / "run")
    record, reference = metrics["solver"], closed_form["solver"]
    assert record["status"] == "converged", record["status"]
    assert record["in_memory"]  # solved on the Jacobian cache
    assert record["objective"] == pytest.approx(reference["objective"], rel=1e-8)
    assert relative(deltas(metrics), deltas(closed_form)) < 1e-4
    assert metrics["metrics"]["test/samples"] == TEST_SIZE
    assert metrics["metrics"]["test/acc"] == pytest.approx(closed_form["metrics"]["test/acc"], abs=1.5 / TEST_SIZE)
    assert metrics["metrics"]["test/loss"] == pytest.approx(closed_form["metrics"]["test/loss"], rel=1e-5)


def test_kfac_is_exact_on_the_vit_head(tmp_path: Path) -> None:
    """K-FAC of the MSE objective is the exact Hessian of the head alone, so K-FAC-preconditioned CG through network
    passes needs a handful of passes and meets the closed form."""
    head = [*FLOAT64, "method.linearize=head"]
    exact = solve([*head, "solver=kernel", "precond=none"], tmp_path / "kernel")
    metrics = solve([*head, *TIGHT, "solver=cg", "solver.tol=1e-10", "precond=kfac", "method.jacobian_cache_gb=null"],
                    tmp_path / "cg")
    assert metrics["solver"]["status"] == "converged" and metrics["solver"]["epochs"] <= 6
    assert relative(deltas(metrics), deltas(exact)) < 1e-6
    assert metrics["metrics"]["test/acc"] == exact["metrics"]["test/acc"]


# -- weight_decay=auto --------------------------------------------------------------------------------------------
def test_weight_decay_auto_picks_the_least_leave_one_out_error(tmp_path: Path) -> None:
    """The default recipe's λ rule on a ViT: exact leave-one-out over the grid on the dual system; the run ends at
    the closed form for the λ it chose (a kernel solve at that λ, given as a number)."""
    chosen = solve(["trainer.precision=64-true"], tmp_path / "auto")
    selection = chosen["solver"]["weight_decay_selection"]
    assert selection["method"] == "leave-one-out"
    errors, grid = selection["loo_error"], selection["grid"]
    best = min(range(len(grid)), key=errors.__getitem__)
    assert chosen["solver"]["weight_decay"] == selection["weight_decay"] == grid[best]
    assert 0 < best < len(grid) - 1  # an interior minimum, not an edge of the grid
    assert chosen["solver"]["status"] == "converged"
    fixed = solve(["trainer.precision=64-true", "solver=kernel", f"method.weight_decay={grid[best]}"],
                  tmp_path / "fixed")
    assert relative(deltas(chosen), deltas(fixed)) < 1e-6
    assert chosen["metrics"]["test/acc"] == fixed["metrics"]["test/acc"]


# -- influence ------------------------------------------------------------------------------------------------------
def test_influence_predicts_retraining_without_a_sample(tmp_path: Path) -> None:
    """``python -m lqf_exp.influence`` on a ViT run: its exact change of every test prediction when sample 3 is left
    out equals retraining without it (``data.drop``). w0 must not depend on the training set (``head_init=random``);
    influence keeps the full problem's penalty Nλ/2 in sum form, so the retrained run's mean-form λ is N/(N−1)·λ."""
    exact = ["method.head_init=random", "solver=kernel", "precond=none", "data.shots=2"]
    full = tmp_path / "full"
    assert solve([*exact, "method.weight_decay=1.0"], full)["status"] == "finished"
    assert influence_main([str(full), "--method", "exact", "--out", str(tmp_path / "influence")]) == 0
    change = torch.load(tmp_path / "influence" / "test_change_exact.pt", weights_only=True)["change"]
    with (tmp_path / "influence" / "influence.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    n = len(rows)
    assert n == 20 and change.shape == (n, TEST_SIZE, 10)
    assert all(float(r["fsi_exact"]) >= 0 for r in rows)
    (tmp_path / "drop.txt").write_text("3\n")
    without = tmp_path / "without"
    retrained = solve([*exact, f"method.weight_decay={n / (n - 1)!r}", f"data.drop={tmp_path / 'drop.txt'}"], without)
    assert retrained["data"]["train_size"] == n - 1

    def test_predictions(run_dir: Path) -> torch.Tensor:
        finished = load_finished_run(run_dir)
        images = torch.stack([x for x, _ in finished.datamodule.test_dataset])
        with torch.no_grad():
            return finished.module.linearized(images).double()

    actual = test_predictions(full) - test_predictions(without)
    predicted = change[3].double()
    assert float(actual.abs().max()) > 0.1  # leaving the sample out does change predictions
    assert float((predicted - actual).abs().max()) < 1e-4 * float(actual.abs().max())  # measured 1.4e-6


# -- task=online --------------------------------------------------------------------------------------------------
def test_online_increments_end_at_the_paragon(tmp_path: Path) -> None:
    """Two increments of 10 samples; CG through network passes (no cache, so the warm start from δ₁ is what the
    second solve starts from), solved tightly: incremental and paragon score the same test error and hold the same
    δ. The head only: on the last block (2.2k δ entries) the same check takes 13 s instead of 5."""
    overrides = ["task=online", "task.steps=2", "data.shots=2", "precond=none", "solver=cg", "solver.tol=1e-10",
                 "method.jacobian_cache_gb=null", "method.linearize=head", *FLOAT64, *TIGHT]
    payload = solve(overrides, tmp_path)
    assert payload["status"] == "finished"
    with (tmp_path / "online.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [(int(r["step"]), int(r["samples"]), r["mode"]) for r in rows] == [
        (t, 10 * t, mode) for t in (1, 2) for mode in ("incremental", "paragon")]
    for step in (rows[:2], rows[2:]):
        assert float(step[0]["test_err"]) == pytest.approx(float(step[1]["test_err"]), abs=1e-9)
    assert int(rows[2]["steps"]) <= int(rows[3]["steps"])  # the warm start needs no more passes than scratch
    state = torch.load(tmp_path / "online_state.pt", weights_only=True)
    named = [{k: v.double() for k, v in state[mode].items() if k.startswith("net.deltas.")}
             for mode in ("incremental", "paragon")]
    assert relative(*named) < 1e-5


# -- DDP ----------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_ddp_passes_equal_single_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """2 gloo ranks (``python run.py trainer=ddp``) against one process, float64, three CG passes through the network
    with K-FAC (its callback under DDP takes every local batch): the same objective after each pass and the same
    val/test scores. 50 samples in batches of 16: the ranks split each global batch, the tail of 2 as 1 + 1.
    ~30 s on the 2-core box, most of it starting the two ranks."""
    overrides = [*TINY, "data.shots=5", "trainer.precision=64-true", "method.weight_decay=1.0",
                 "method.jacobian_cache_gb=null", "solver=cg", "precond=kfac", "method.stop.max_epochs=3",
                 "trainer.check_val_every_n_epoch=3"]
    out = tmp_path / "ddp"
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "run.py", *overrides, "trainer=ddp", "trainer.devices=2", "trainer.accelerator=cpu",
         f"hydra.run.dir={out}"], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ddp = json.loads((out / "metrics.json").read_text())
    cfg = compose_config(overrides, tmp_path / "single")
    GlobalHydra.instance().clear()
    single = run(cfg)
    histories = [[row["objective"] for row in r["solver"]["history"]] for r in (ddp, single)]
    assert len(histories[0]) == 4  # the start and three passes
    torch.testing.assert_close(torch.tensor(histories[0]), torch.tensor(histories[1]), rtol=1e-6, atol=0.0)
    # CG's first pass computes the gradient at the start; each later pass decreases the quadratic
    assert histories[0][1] == pytest.approx(histories[0][0], rel=1e-9) and histories[0][3] < histories[0][2] < \
        histories[0][1]
    for split in ("val", "test"):
        assert ddp["metrics"][f"{split}/samples"] == single["metrics"][f"{split}/samples"]
        assert ddp["metrics"][f"{split}/acc"] == pytest.approx(single["metrics"][f"{split}/acc"], abs=1e-9)
        assert ddp["metrics"][f"{split}/loss"] == pytest.approx(single["metrics"][f"{split}/loss"], rel=1e-6)


# -- bf16-mixed ---------------------------------------------------------------------------------------------------
MIXED = ["trainer.precision=bf16-mixed", "method.weight_decay=1.0", "solver=kernel", "precond=none"]


def test_bf16_mixed_runs_or_refuses_clearly(tmp_path: Path) -> None:
    """The default tangent path (auto): a finished run whose test accuracy is float32's to a few images (the solve
    runs in float32, evaluation under bf16 autocast), or an error naming trainer.precision and what would be valid."""
    try:
        mixed = solve(MIXED, tmp_path / "bf16")
    except (ValueError, RuntimeError) as error:
        message = str(error)
        assert "trainer.precision" in message and "32-true" in message, message
        return
    full = solve([*MIXED[1:]], tmp_path / "fp32")
    assert mixed["status"] == "finished"
    assert mixed["metrics"]["test/acc"] == pytest.approx(full["metrics"]["test/acc"], abs=10 / TEST_SIZE)
    assert mixed["metrics"]["test/loss"] == pytest.approx(full["metrics"]["test/loss"], rel=2e-2)


def test_bf16_mixed_with_forward_mode_ad_refuses_before_solving(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """method.tangent=autodiff cannot run under autocast: refused at setup (it used to fail at the first validation
    batch, after the whole solve, with a message about BatchNorm)."""

    def solve_started(self: LQF) -> None:
        raise AssertionError("the solve started before the refusal")

    monkeypatch.setattr(LQF, "on_fit_start", solve_started)
    with pytest.raises(ValueError, match=r"trainer.precision=bf16-mixed .*method.tangent=autodiff.*32-true"):
        solve([*MIXED, "method.tangent=autodiff"], tmp_path / "run")


# -- composition --------------------------------------------------------------------------------------------------
RECIPES = sorted(p.stem for p in (REPO_ROOT / "conf" / "experiment").glob("*.yaml"))
SQRT_COV = {"b_lqf", "mpn_cov"}  # replace a pooling layer a ViT does not have: refused at build


@pytest.fixture
def compose(tmp_path: Path) -> Iterator[MakeCfg]:
    yield lambda overrides: compose_config(overrides, tmp_path / "run")
    GlobalHydra.instance().clear()


@pytest.mark.parametrize("recipe", [*RECIPES, "+sweep=ablation"])
def test_recipes_compose_with_the_vit(recipe: str, compose: MakeCfg) -> None:
    override = recipe if recipe.startswith("+") else f"experiment={recipe}"
    cfg = compose([override, "model=vit_tiny", "model.weights=null"])
    assert cfg.model.arch == "vit_tiny" and cfg.model.weights is None
    if recipe in SQRT_COV:
        assert cfg.model.pooling == "sqrt_cov"


@pytest.mark.parametrize("recipe", sorted(SQRT_COV))
def test_sqrt_cov_recipes_refuse_the_vit(recipe: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="model.pooling=sqrt_cov is not available for vit_tiny.*model.pooling=avg"):
        solve([f"experiment={recipe}", "debug=smoke"], tmp_path / "run")
