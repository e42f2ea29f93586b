"""Forgetting (``python -m lqf_exp.forget``): the edited δ against retraining, in float64.

On a small problem (tests/helpers/problems.py) for a single sample, a whole class and a random 10%: ``exact`` within
1e-6·‖δ_ref‖ of ``retrain`` and ``solve`` within 1e-2·‖δ* − δ_ref‖, δ_ref the remaining problem's dense optimum.
Through the command on a finished float64 run: the same, the new run directory (a finished run, the original
untouched), ``--refit-head`` against the full retrain by the pipeline, and the errors for bad input.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from hydra.core.global_hydra import GlobalHydra
from torch import Tensor
from torch.utils.data import Subset

from lqf_exp.config import compose_config
from lqf_exp.data.torchvision_sets import labels_of
from lqf_exp.delta_layout import flatten
from lqf_exp.forget import conjugate_gradient_from, exact_solution
from lqf_exp.forget.__main__ import main
from lqf_exp.forget.table import forget_table
from lqf_exp.forget.table import main as table_main
from lqf_exp.influence import load_finished_run
from lqf_exp.pipeline import run
from lqf_exp.results import METRICS_FILE, read_test_predictions
from lqf_exp.solvers import DualSystem, LQFObjective

from .helpers.problems import SmallProblem, small_problem

EXACT, SOLVE = 1e-6, 1e-2
LAMBDA = 0.01
# A float64 LQF run solved exactly (solver=kernel) on 3 digits per class at 8 px; layer3 and the head linearized.
RUN = ["model.weights=null", "data.shots=3", "data.image_size=8", "method.linearize=layer3", "logger=none",
       "trainer.accelerator=cpu", "callbacks.progress_bar.refresh_rate=0", "trainer.precision=64-true", "solver=kernel",
       "precond=none",
       f"method.weight_decay={LAMBDA}"]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Every test here, and the module's run, on one thread: tiny tensors on a shared 2-core box spend most of their
    time in thread overhead otherwise (the file took 125 s with torch's default threads, 16 s with one, at load ~5)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def dense_optimum(J: Tensor, r: Tensor, weight_decay: float) -> Tensor:
    """``argmin (1/N)Σ‖r_n − J_nδ‖² + (λ/2)‖δ‖²`` over the N samples given (primal, dense, float64)."""
    rows = J.reshape(-1, J.shape[-1])
    mu = len(J) * weight_decay / 2
    return torch.linalg.solve(rows.T @ rows + mu * torch.eye(rows.shape[1], dtype=rows.dtype), rows.T @ r.reshape(-1))


def removals(y: Tensor) -> dict[str, list[int]]:
    g = torch.Generator().manual_seed(3)
    return {"single": [7], "class": (y == 1).nonzero()[:, 0].tolist(),
            "random10": torch.randperm(len(y), generator=g)[: len(y) // 10].tolist()}


@pytest.fixture(scope="module")
def small() -> tuple[SmallProblem, Tensor, Tensor, Tensor]:
    problem = small_problem(n=60, weight_decay=LAMBDA, seed=4)
    with torch.no_grad():
        r = problem.loss.targets(problem.y, 3, torch.float64) - problem.net.apply_to_base(problem.x)
    J = problem.net.jacobian(problem.x).detach()
    return problem, J, r, dense_optimum(J, r, LAMBDA)


@pytest.mark.parametrize("which", ["single", "class", "random10"])
def test_exact_and_solve_match_retraining(small: tuple, which: str) -> None:
    problem, J, r, full = small
    keep = [n for n in range(len(J)) if n not in set(removals(problem.y)[which])]
    reference = dense_optimum(J[keep], r[keep], LAMBDA)
    objective = LQFObjective(problem.net, problem.loss, LAMBDA)
    batches = lambda: [(problem.x[keep], problem.y[keep])]  # noqa: E731
    retrain = conjugate_gradient_from(objective, batches, torch.zeros_like(full), 500, tol=1e-10)  # float64's
    exact = exact_solution(DualSystem(J[keep], r[keep]), LAMBDA)
    solve = conjugate_gradient_from(objective, batches, full, 500, error=SOLVE)
    assert retrain.converged and solve.converged and solve.iterations <= retrain.iterations
    assert torch.linalg.norm(exact.delta - reference) <= EXACT * torch.linalg.norm(reference)
    assert torch.linalg.norm(retrain.delta - reference) <= EXACT * torch.linalg.norm(reference)
    assert torch.linalg.norm(exact.delta - retrain.delta) <= EXACT * torch.linalg.norm(retrain.delta)
    assert torch.linalg.norm(solve.delta - reference) <= SOLVE * torch.linalg.norm(full - reference)
    # The leave-out convention of influence (the full set's penalty Nλ/2 kept) is another problem: not the retrain.
    kept_penalty = DualSystem(J[keep], r[keep]).rows.T @ torch.linalg.solve(
        DualSystem(J[keep], r[keep]).kernel + len(J) * LAMBDA / 2 * torch.eye(len(keep) * 3, dtype=torch.float64),
        r[keep].reshape(-1))
    assert torch.linalg.norm(kept_penalty - reference) > 1e3 * EXACT * torch.linalg.norm(reference)


def _tree(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def _run(overrides: list[str], out: Path) -> dict:
    GlobalHydra.instance().clear()
    metrics = run(compose_config(overrides, out))
    GlobalHydra.instance().clear()
    (out / ".hydra").mkdir(exist_ok=True)
    (out / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))  # as `python run.py`
    return metrics


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("forget") / "run"
    metrics = _run(RUN, out)
    assert metrics["status"] == "finished" and metrics["solver"]["grad_ratio"] < 1e-8  # solver=kernel
    return out


def _delta_and_head(run_dir: Path) -> tuple[Tensor, Tensor]:
    module = load_finished_run(run_dir, native_precision=True).module
    head = module.linearized.base_network.fc
    return flatten([d.detach() for d in module.linearized.delta_list()]).double(), torch.cat(
        [head.weight.detach().reshape(-1), head.bias.detach()]).double()


def _forget(run_dir: Path, out: Path, *args: str) -> dict:
    assert main([str(run_dir), "--out", str(out), "--sketch-rank", "0", *args]) == 0  # no sketch: a tiny problem
    return json.loads((out / METRICS_FILE).read_text())


def test_command_matches_retrain_and_writes_a_finished_run(run_dir: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    before = _tree(run_dir)
    drop = tmp_path / "ten_percent.txt"
    drop.write_text("4\n17\n25\n")
    runs = {m: _forget(run_dir, tmp_path / m, "--drop", str(drop), "--method", m)
            for m in ("exact", "solve", "retrain")}
    assert _tree(run_dir) == before  # the original run is never touched
    original, _ = _delta_and_head(run_dir)
    deltas = {m: _delta_and_head(tmp_path / m)[0] for m in runs}
    reference = deltas["retrain"]
    assert torch.linalg.norm(deltas["exact"] - reference) <= EXACT * torch.linalg.norm(reference)
    assert torch.linalg.norm(deltas["solve"] - reference) <= SOLVE * torch.linalg.norm(original - reference)
    for method, metrics in runs.items():
        record = metrics["forget"]
        assert metrics["status"] == "finished" and record["method"] == method and record["removed"] == 3
        assert record["train_size"] == 27 and metrics["data"]["train_size"] == 27
        assert record["before"]["test/acc"] == pytest.approx(json.loads((run_dir / METRICS_FILE).read_text())
                                                              ["metrics"]["test/acc"], abs=1e-6)
        assert 0 <= metrics["metrics"]["test/acc"] == record["after"]["test/acc"] <= 1
        assert (tmp_path / method / "drop.txt").read_text() == drop.read_text()
        certificate = json.loads((tmp_path / method / "certificate.json").read_text())
        assert certificate == record["certificate"] and certificate["relative_to_zero"] <= 1e-6
        assert any("head" in note for note in record["remains_of_removed"])
        # Its test predictions are on disk, as a run's are, and counted against the run's own.
        edited, own = read_test_predictions(tmp_path / method), read_test_predictions(run_dir)
        assert edited is not None and own is not None and len(edited) == len(own)
        assert record["after"]["test/changed_predictions"] == sum(a != b for a, b in zip(own, edited, strict=True))
        labels = [int(line.split(",")[1]) for line in (tmp_path / method / "test_predictions.csv").read_text()
                  .splitlines()[1:]]
        assert sum(y == p for y, p in zip(labels, edited, strict=True)) / len(labels) == pytest.approx(
            metrics["metrics"]["test/acc"], abs=1e-9)
    # The new directory is a finished run: it loads, on the remaining 27 samples, at the edited δ.
    edited = load_finished_run(tmp_path / "exact", native_precision=True)
    assert len(edited.datamodule.train_dataset) == 27 and edited.weight_decay == LAMBDA
    overrides = (tmp_path / "exact" / ".hydra" / "overrides.yaml").read_text()
    assert f"data.drop={tmp_path / 'exact' / 'drop.txt'}" in overrides and f"method.weight_decay={LAMBDA}" in overrides
    # The summary table: one row per forget run, its numbers those of metrics.json.
    table = forget_table([tmp_path / m for m in runs]).splitlines()
    assert len(table) == 2 + len(runs)
    for line, (method, metrics) in zip(table[2:], runs.items(), strict=True):
        before, after = metrics["forget"]["before"], metrics["forget"]["after"]
        assert line.startswith(f"| 3 samples | {method} | kept | {before['test/acc']:.4f} → "
                               f"{after['test/acc']:.4f} | — | {after['test/changed_predictions']} |")
    with pytest.raises(ValueError, match="no 'forget' entry"):
        forget_table([run_dir])
    # The command writes the table under a header: the code, the command (paths relative or cut), the machine.
    capsys.readouterr()  # what the forget runs printed
    assert table_main([str(tmp_path / m) for m in runs]) == 0
    printed = capsys.readouterr().out
    assert printed.endswith("\n".join(table) + "\n") and "- Code: commit " in printed and str(tmp_path) not in printed
    assert "python -m lqf_exp.forget.table exact solve retrain`" in printed


def test_labels_of_matches_reading_every_item(run_dir: Path) -> None:
    dm = load_finished_run(run_dir, native_precision=True).datamodule
    for dataset in (dm.train_dataset, dm.test_dataset, Subset(dm.test_dataset, [5, 2, 9])):
        assert labels_of(dataset) == [int(dataset[i][1]) for i in range(len(dataset))]


def test_refit_head_matches_the_full_retrain(run_dir: Path, tmp_path: Path) -> None:
    """Class 1 removed with the head refitted: the pipeline's own run on the rest (same overrides, data.drop, the
    run's λ) is the reference, head and δ."""
    exact = _forget(run_dir, tmp_path / "exact", "--drop-class", "1", "--refit-head", "--method", "exact")
    solve = _forget(run_dir, tmp_path / "solve", "--drop-class", "1", "--refit-head", "--method", "solve")
    full = _run(RUN + [f"data.drop={tmp_path / 'exact' / 'drop.txt'}"], tmp_path / "full")
    assert full["data"]["train_size"] == exact["forget"]["train_size"] == 27
    reference, head = _delta_and_head(tmp_path / "full")
    original, _ = _delta_and_head(run_dir)
    delta, refit = _delta_and_head(tmp_path / "exact")
    assert torch.linalg.norm(refit - head) <= EXACT * torch.linalg.norm(head)
    assert torch.linalg.norm(delta - reference) <= EXACT * torch.linalg.norm(reference)
    assert torch.linalg.norm(_delta_and_head(tmp_path / "solve")[0] - reference) <= SOLVE * torch.linalg.norm(
        original - reference)
    assert exact["metrics"]["test/acc"] == pytest.approx(full["metrics"]["test/acc"], abs=1e-6)  # float32 metric
    record = exact["forget"]
    assert record["drop_class"] == 1 and record["before"]["test/acc_class1"] > 0
    assert record["after"]["test/acc_class1"] < record["before"]["test/acc_class1"]
    for when in ("before", "after"):  # "right/total" on the test images of class 1 (scored on those alone before)
        right, total = map(int, record[when]["test/right_class1"].split("/"))
        assert total > 0 and right / total == pytest.approx(record[when]["test/acc_class1"])
    assert not any("head" in note for note in record["remains_of_removed"])
    # solve's stopping rule certifies its distance to the optimum: ‖∇L'‖/λ ≤ tol/(1 + tol)·‖δ − δ*‖.
    certificate = solve["forget"]["certificate"]
    assert certificate["distance_to_optimum_bound"] <= 1.01 * SOLVE / (1 + SOLVE) * certificate["distance_moved"]


def _bad_copy(run_dir: Path, tmp_path: Path, edit: str) -> Path:
    copy = tmp_path / f"bad-{edit}"
    shutil.copytree(run_dir, copy)
    config = copy / "config_resolved.yaml"
    if edit == "finetune":
        config.write_text(config.read_text().replace("lqf_exp.methods.LQF", "lqf_exp.methods.FineTune"))
    elif edit == "ce":
        config.write_text(config.read_text().replace("lqf_exp.losses.ScaledMSELoss\n  target_scale: 15.0",
                                                     "lqf_exp.losses.CrossEntropyLoss"))
    else:
        shutil.rmtree(copy / "checkpoints")
        metrics = json.loads((copy / METRICS_FILE).read_text())
        metrics["final_checkpoint"] = None
        (copy / METRICS_FILE).write_text(json.dumps(metrics))
    return copy


@pytest.mark.parametrize(("content", "edit", "message"), [
    ("3\n30\n", None, "indices [30] outside the training set [0, 30)"),
    ("3\n5\n3\n", None, "an index is listed twice"),
    ("".join(f"{i}\n" for i in range(30)), None, "drops all 30 training samples"),
    ("x\n", None, "expected one integer index per line"),
    ("3\n", "finetune", "needs an LQF run"),
    ("3\n", "ce", "needs the quadratic objective (loss=mse)"),
    ("3\n", "checkpoint", "has no final LQF checkpoint"),
])
def test_bad_input_is_refused_and_nothing_is_written(run_dir: Path, tmp_path: Path, content: str, edit: str | None,
                                                    message: str, capsys: pytest.CaptureFixture[str]) -> None:
    source = run_dir if edit is None else _bad_copy(run_dir, tmp_path, edit)
    drop = tmp_path / "drop.txt"
    drop.write_text(content)
    listing = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(SystemExit):
        main([str(source), "--drop", str(drop), "--out", str(tmp_path / "out")])
    assert message in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == listing  # no output, no partial directory


def test_bad_class_and_existing_output_are_refused(run_dir: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main([str(run_dir), "--drop-class", "10", "--out", str(tmp_path / "out")])
    assert "--drop-class 10: the run's classes are 0..9" in capsys.readouterr().err
    (tmp_path / "out").mkdir()
    with pytest.raises(SystemExit):
        main([str(run_dir), "--drop-class", "2", "--out", str(tmp_path / "out")])
    assert "exists already" in capsys.readouterr().err
    assert list((tmp_path / "out").iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
