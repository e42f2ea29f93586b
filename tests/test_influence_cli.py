"""``python -m lqf_exp.influence`` on a finished LQF run: the files it writes and what they must hold, and the
errors it gives for directories that are not finished LQF runs."""

from __future__ import annotations

import csv
import json
import sys
import types
from pathlib import Path

import pytest
import torch
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from lqf_exp.config import compose_config
from lqf_exp.influence import exact_influence, load_finished_run
from lqf_exp.influence.__main__ import main
from lqf_exp.influence.compute import compute_influence
from lqf_exp.influence.movement import movement, sweep_movement
from lqf_exp.influence.outputs import write_outputs
from lqf_exp.influence.run_dir import scores
from lqf_exp.influence.summarize import summarize
from lqf_exp.pipeline import run
from lqf_exp.results import changed_predictions, read_test_predictions
from lqf_exp.tracking import stable_run_id

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
RUN = ["model.weights=null", "data.shots=2", "logger=none", "trainer.accelerator=cpu",
       "callbacks.progress_bar.refresh_rate=0"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("lqf") / "run"
    cfg = compose_config(RUN, out)
    GlobalHydra.instance().clear()
    metrics = run(cfg)
    assert metrics["status"] == "finished" and Path(metrics["final_checkpoint"]).is_file()
    (out / ".hydra").mkdir()
    (out / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in RUN))  # as `python run.py` does
    return out


def test_cli_writes_csv_gallery_changes_and_summary(run_dir: Path, tmp_path: Path) -> None:
    assert main([str(run_dir), "--method", "both", "--gallery", "3", "--out", str(tmp_path)]) == 0
    with (tmp_path / "influence.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    finished = load_finished_run(run_dir)
    train = finished.datamodule.train_dataset
    assert len(rows) == len(train) == 20
    assert [int(r["index"]) for r in rows] == list(range(20))
    assert [int(r["label"]) for r in rows] == [int(train[i][1]) for i in range(20)]
    for row in rows:
        assert float(row["fsi"]) == float(row["fsi_exact"]) >= 0 and float(row["fsi_kfac"]) >= 0
        assert 0 <= float(row["leverage_exact"]) <= 10 and float(row["self_influence_exact"]) >= 0
    assert (tmp_path / "gallery.png").read_bytes()[:8] == PNG_MAGIC
    change = torch.load(tmp_path / "test_change_exact.pt", weights_only=True)["change"]
    assert change.shape == (20, len(finished.datamodule.test_dataset), 10)
    summary = json.loads((tmp_path / "influence.json").read_text())
    assert -1 <= summary["spearman_fsi_kfac_vs_exact"] <= 1 and summary["train_size"] == 20
    assert set(summary["seconds"]) == {"kfac", "exact"}


def test_exact_influence_of_a_run_predicts_its_leave_one_out_residuals(run_dir: Path) -> None:
    """The influence on the training inputs themselves: f(x_i) − f₋ᵢ(x_i) = ẽ_i − e_i, from the same Jacobians."""
    finished = load_finished_run(run_dir)
    net, loss = finished.module.linearized, finished.module.loss_fn
    x, y = next(iter(torch.utils.data.DataLoader(finished.datamodule.train_dataset, batch_size=20)))
    J = net.jacobian(x).detach().double()
    with torch.no_grad():
        e = loss.targets(y, 10, torch.float64) - net(x).double()
    result = exact_influence(J, e, J, finished.weight_decay)
    own = result.change.diagonal(dim1=0, dim2=1).T
    torch.testing.assert_close(own, result.loo_residual - e, rtol=1e-6, atol=1e-9)


def test_errors_name_what_is_wrong(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main([str(tmp_path / "nowhere")])
    assert "holds no finished run" in capsys.readouterr().err
    finetune = tmp_path / "finetune"
    GlobalHydra.instance().clear()
    run(compose_config(["debug=smoke", "model.weights=null", "data.batch_size=16", "precond=none",
                        "experiment=probe"], finetune))
    with pytest.raises(SystemExit):
        main([str(finetune)])
    assert "influence needs an LQF run" in capsys.readouterr().err


def test_summarization_drops_by_informativeness_and_plots(run_dir: Path) -> None:
    assert main([str(run_dir), "--method", "exact"]) == 0  # influence/influence.csv of the run itself
    out = summarize(run_dir, [0.0, 0.5], [0])
    with (out / "summarize.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["order"], float(r["fraction"]), int(r["train_size"])) for r in rows] == [
        ("most", 0.0, 20), ("least", 0.0, 20), ("most", 0.5, 10), ("least", 0.5, 10)]
    with (run_dir / "influence" / "influence.csv").open() as handle:
        fsi = [float(r["fsi"]) for r in csv.DictReader(handle)]
    ranked = sorted(range(20), key=lambda i: fsi[i], reverse=True)
    assert sorted(int(i) for i in (out / "drop-most-0.5.txt").read_text().split()) == sorted(ranked[:10])
    assert sorted(int(i) for i in (out / "drop-least-0.5.txt").read_text().split()) == sorted(ranked[10:])
    assert (out / "summarize.png").read_bytes()[:8] == PNG_MAGIC
    summary_md = (out / "summarize.md").read_text()
    assert "| 50% |" in summary_md and "- Code: commit " in summary_md and str(run_dir.parent) not in summary_md
    assert f"python -m lqf_exp.influence.summarize {run_dir.name} --fractions 0,0.5 --seeds 0`" in summary_md
    kept = json.loads((out / "most-0.5" / "seed0" / "metrics.json").read_text())
    assert kept["data"]["train_size"] == 10 and kept["data"]["dropped"] == "drop-most-0.5.txt"
    for row in rows:  # every cell records its test predictions; they agree with its accuracy
        cell = out / f"{row['order']}-{float(row['fraction']):g}" / "seed0"
        lines = (cell / "test_predictions.csv").read_text().splitlines()
        assert lines[0] == "index,label,prediction"
        table = [tuple(int(v) for v in line.split(",")) for line in lines[1:]]
        metrics = json.loads((cell / "metrics.json").read_text())
        assert [i for i, _, _ in table] == list(range(metrics["data"]["test_size"]))
        right = sum(y == p for _, y, p in table)
        assert right / len(table) == pytest.approx(metrics["metrics"]["test/acc"], abs=1e-6)
        errors = len(table) - right
        if float(row["fraction"]) == 0:
            assert row["changed"] == "0"
            full_errors = errors
            # The run took the dual closed form, so its cells do: nothing dropped is the run itself, exactly.
            assert metrics["solver"]["solver"] == "kernel"
            assert changed_predictions(read_test_predictions(run_dir), read_test_predictions(cell)) == 0
        else:  # a changed error count needs at least that many changed predictions
            assert int(row["changed"]) >= abs(errors - full_errors)


def test_influence_goes_to_the_runs_own_wandb_run(run_dir: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    calls: dict = {"log": {}, "summary": {}}

    class FakeRun:
        summary = calls["summary"]

        def log(self, payload: dict) -> None:
            calls["log"].update(payload)

        def finish(self) -> None:
            calls["finished"] = True

    def init(**kwargs: object) -> FakeRun:
        calls["init"] = kwargs
        return FakeRun()

    fake = types.SimpleNamespace(init=init, Table=lambda columns, data: ("table", columns, len(data)),
                                 Image=lambda path: ("image", path))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    finished = load_finished_run(run_dir)
    finished.cfg.logger = OmegaConf.create({"wandb": {"project": "lqf_exp", "group": "g", "name": "n", "id": None,
                                                      "offline": True}})
    summary = write_outputs(finished, compute_influence(finished, "kfac"), tmp_path)
    assert summary["wandb"] and calls["finished"]
    assert calls["init"]["id"] == stable_run_id(str(finished.cfg.paths.output_dir))
    assert calls["init"]["resume"] == "allow" and calls["init"]["mode"] == "offline"
    table = calls["log"]["influence/table"]
    assert table[2] == 20 and "fsi" in table[1] and calls["log"]["influence/gallery"][1].endswith("gallery.png")


def test_movement_compares_the_solution_with_its_probe(run_dir: Path, tmp_path: Path) -> None:
    row = movement(run_dir)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert row["test_acc_lqf"] == pytest.approx(metrics["metrics"]["test/acc"], abs=1e-6)
    finished = load_finished_run(run_dir)
    delta = torch.cat([d.detach().reshape(-1) for d in finished.module.linearized.delta_list()]).double()
    assert row["delta_norm"] == pytest.approx(float(delta.norm()), rel=1e-9) and row["delta_norm"] > 0
    assert row["weight_decay"] == finished.weight_decay
    # At δ = 0 the network is the probe: scoring it by hand (δ zeroed) gives the probe columns.
    with torch.no_grad():
        for d in finished.module.linearized.delta_list():
            d.zero_()
    data = finished.datamodule
    probe = scores(finished.module, data.test_dataset, data.eval_batch_size)
    assert row["test_acc_probe"] == pytest.approx(probe.acc, abs=1e-12)
    lqf_predictions = read_test_predictions(run_dir)
    assert lqf_predictions is not None
    assert row["test_changed"] == sum(int(a) != b for a, b in zip(probe.predictions, lqf_predictions, strict=True))
    path = sweep_movement(run_dir, tmp_path / "movement")
    with (tmp_path / "movement" / "movement.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    own = [r for r in rows if r["cell"] == "."]  # (and any summarization cells an earlier test left below it)
    assert len(own) == 1 and float(own[0]["delta_norm"]) == pytest.approx(row["delta_norm"])
    assert "| digits |" in path.read_text()
