"""Sweeps as the user launches them: the 8 ablation cells, re-runs that skip, failing cells, the W&B spec."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from lqf_exp.report import load_cells, write_report

from .conftest import REPO_ROOT, compose_config
from .test_cli import FAST, run_cli

pytestmark = pytest.mark.slow

TINY = [*FAST, "seed=0"]


def test_ablation_sweep_runs_8_cells_reports_and_skips_on_rerun(tmp_path: Path) -> None:
    sweep = tmp_path / "ablation"
    args = ["-m", "+sweep=ablation", *TINY, "skip_finished=true", "resume=true", f"hydra.sweep.dir={sweep}"]
    first = run_cli(args, tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    metrics = sorted(sweep.glob("*/metrics.json"))
    assert len(metrics) == 8
    cells = {(m["factors"]["activation"], m["factors"]["loss"], m["factors"]["precond"])
             for m in (json.loads(p.read_text()) for p in metrics)}
    assert len(cells) == 8
    solvers = {json.loads(p.read_text())["factors"]["solver"] for p in metrics}
    assert solvers == {"adaptive"}  # one solver for every cell: K-FAC → none changes only the preconditioner
    # Stable cell dirs named by the cell's own overrides.
    assert len(list(sweep.glob("activation=leaky_relu,*loss=mse,*precond=kfac,seed=0/metrics.json"))) == 1

    report = write_report(sweep, kind="ablation")
    text = report.read_text()
    assert "leaky_relu" in text and "kfac" in text
    rows = (report.parent / "ablation.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 8

    stamps = {p: p.stat().st_mtime_ns for p in metrics}
    second = run_cli(args, tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert second.stdout.count("Final test accuracy") == 0  # every cell skipped
    assert all(p.stat().st_mtime_ns == stamp for p, stamp in stamps.items())


def test_failing_cell_leaves_the_others_and_is_marked(tmp_path: Path) -> None:
    sweep = tmp_path / "shots"
    result = run_cli(["-m", *TINY, "precond=none", "data.shots=2,100000", f"hydra.sweep.dir={sweep}"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((sweep / "0" / "metrics.json").read_text())["status"] == "finished"
    error = json.loads((sweep / "1" / "error.json").read_text())
    assert "shots=100000" in error["error"]
    cells = load_cells(sweep)
    assert sorted(c.status for c in cells) == ["failed", "finished"]
    report = write_report(sweep).read_text()
    assert "FAILED" in report and "shots=100000" in report


def test_wandb_sweep_spec_composes_a_valid_config(tmp_path: Path) -> None:
    spec = yaml.safe_load((REPO_ROOT / "sweeps" / "wandb" / "ablation.yaml").read_text())
    assert spec["program"] == "run.py" and "${args_no_hyphens}" in spec["command"]
    first_values = [f"{key}={p['values'][0] if 'values' in p else p['value']}" for key, p in spec["parameters"].items()]
    cfg = compose_config(first_values, tmp_path)
    assert cfg.activation.name == "relu" and cfg.precond.name == "none" and cfg.seed == 0
    assert cfg.hydra.runtime.choices.solver == "adaptive" and cfg.logger.wandb.offline is False
