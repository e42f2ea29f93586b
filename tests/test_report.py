"""Sweep reports from synthetic sweep directories whose every number is known by construction."""

from __future__ import annotations

import csv
import json
import math
import statistics
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import yaml

from lqf_exp.report import detect_kinds, load_cells, log_tables_to_wandb, write_report

from .helpers.sweep_cells import write_cell

REPO_ROOT = Path(__file__).resolve().parent.parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def md_table(text: str, caption: str) -> list[list[str]]:
    """The body rows of the Markdown table right after the line starting with ``**<caption>``."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"**{caption}"))
    body = []
    for line in lines[start + 4 :]:
        if not line.startswith("|"):
            break
        body.append([cell.strip() for cell in line.strip("|").split(" | ")])
    return body


def rows_where(rows: list[dict[str, str]], **match: str) -> list[dict[str, str]]:
    return [r for r in rows if all(r[k] == v for k, v in match.items())]


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 1000, path


# Ablation: per data set, {(activation, loss, precond): test errors of seeds 0 and 1}; None = that seed failed.
ABLATION = {
    "digits": {
        ("leaky_relu", "mse", "kfac"): [10, 12],
        ("leaky_relu", "ce", "kfac"): [15, 17],
        ("leaky_relu", "mse", "none"): [12, 14],
        ("relu", "mse", "kfac"): [11, 13],
        ("leaky_relu", "ce", "none"): [20, 22],
        ("relu", "ce", "kfac"): [18, 18],
        ("relu", "mse", "none"): [14, 16],
        ("relu", "ce", "none"): [25, None],
    },
    "pets": {
        ("leaky_relu", "mse", "kfac"): [20, 20],
        ("leaky_relu", "ce", "kfac"): [30, 34],
        ("leaky_relu", "mse", "none"): [22, 26],
        ("relu", "mse", "kfac"): [19, 21],
        ("leaky_relu", "ce", "none"): [40, 40],
        ("relu", "ce", "kfac"): [35, 37],
        ("relu", "mse", "none"): [23, 25],
        ("relu", "ce", "none"): [None, None],
    },
}


@pytest.fixture(scope="module")
def ablation_report(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    sweep = tmp_path_factory.mktemp("ablation")
    for data, combos in ABLATION.items():
        for (act, loss, precond), errs in combos.items():
            for seed, err in enumerate(errs):
                name = f"{data}/{act}-{loss}-{precond}-s{seed}"
                # digits keeps one failure; pets loses both seeds of the cell to an out-of-memory error.
                error = None if err is not None else ("ValueError: boom" if data == "digits" else "RuntimeError: OOM")
                write_cell(
                    sweep, name, err, error=error, data=data, activation=act, loss=loss, precond=precond, seed=seed
                )
    path = write_report(sweep)
    return path, path.read_text()


def test_ablation_table_values_and_failures(ablation_report: tuple[Path, str]) -> None:
    path, text = ablation_report
    assert "ablation" in text and (path.parent / "ablation.csv").is_file()
    rows = md_table(text, "Ablation: test error")
    assert len(rows) == 8
    by_combo = {tuple(r[:3]): r for r in rows}
    assert by_combo["leaky_relu", "mse", "kfac"][4] == f"11.00 ± {math.sqrt(2):.2f} (n=2)"
    assert by_combo["relu", "ce", "kfac"][4] == "18.00 ± 0.00 (n=2)"
    assert by_combo["relu", "ce", "none"][4] == "25.00 ± 0.00 (n=1) [1 failed: ValueError: boom]"
    assert by_combo["relu", "ce", "none"][5] == "FAILED (RuntimeError: OOM)"
    assert "— (full LQF)" in by_combo["leaky_relu", "mse", "kfac"][3]

    csv_rows = read_csv(path.parent / "ablation.csv")
    assert len(csv_rows) == 16
    for data, combos in ABLATION.items():
        for combo, errs in combos.items():
            (row,) = rows_where(csv_rows, data=data, activation=combo[0], loss=combo[1], precond=combo[2])
            done = [e for e in errs if e is not None]
            assert int(row["n"]) == len(done) and int(row["n_failed"]) == len(errs) - len(done)
            if done:
                assert float(row["test_err_mean"]) == pytest.approx(statistics.fmean(done))
                expected_std = statistics.stdev(done) if len(done) > 1 else 0.0
                assert float(row["test_err_std"]) == pytest.approx(expected_std)
            else:
                assert row["status"] == "failed" and row["test_err_mean"] == ""


def test_ablation_pairs_every_change_in_every_context_per_seed(ablation_report: tuple[Path, str]) -> None:
    """Each component's paper value against the alternative, the other two fixed: W–T–L and mean Δ over the seeds
    both cells finished (digits relu-ce-none lost seed 1, pets relu-ce-none lost both: no row)."""
    path, text = ablation_report
    rows = {(r[0], r[1], r[2]): r[3:5] for r in md_table(text, "Each change in every context")}
    assert rows["digits", "precond: kfac → none", "activation=leaky_relu, loss=mse"] == ["2–0–0", "+2.00"]
    assert rows["digits", "activation: leaky_relu → relu", "loss=mse, precond=kfac"] == ["2–0–0", "+1.00"]
    assert rows["pets", "activation: leaky_relu → relu", "loss=mse, precond=kfac"] == ["1–0–1", "+0.00"]
    assert rows["digits", "precond: kfac → none", "activation=relu, loss=ce"] == ["1–0–0", "+7.00"]
    assert ("pets", "precond: kfac → none", "activation=relu, loss=ce") not in rows
    assert len(rows) == 2 * 3 * 4 - 3  # pets' relu-ce-none is in three pairs
    per_seed = read_csv(path.parent / "ablation_paired.csv")
    pair = rows_where(per_seed, data="pets", component="activation", held_fixed="loss=mse, precond=kfac")
    assert [r["seed"] for r in pair] == ["0", "1"]
    errors = [float(r[k]) for r in pair for k in ("paper_test_err", "alternative_test_err")]
    assert errors == pytest.approx([20.0, 19.0, 20.0, 21.0])


def test_ablation_relative_increase(ablation_report: tuple[Path, str]) -> None:
    path, text = ablation_report
    rel = read_csv(path.parent / "ablation_relative.csv")
    expected = {
        "digits": {"MSE → CE": (16 - 11) / 11, "K-FAC → none": (13 - 11) / 11, "Leaky-ReLU → ReLU": (12 - 11) / 11},
        "pets": {"MSE → CE": (32 - 20) / 20, "K-FAC → none": (24 - 20) / 20, "Leaky-ReLU → ReLU": 0.0},
    }
    for data, per_removal in expected.items():
        for removed, value in per_removal.items():
            (row,) = rows_where(rel, data=data, removed=removed)
            assert float(row["rel_increase_pct"]) == pytest.approx(100 * value)
    for removed in expected["digits"]:
        (row,) = rows_where(rel, data="median", removed=removed)
        both = [100 * expected[d][removed] for d in expected]
        assert float(row["rel_increase_pct"]) == pytest.approx(statistics.median(both))
    median_row = md_table(text, "Relative error increase of removing")[-1]
    assert median_row[:2] == ["**median**", f"{100 * (5 / 11 + 12 / 20) / 2:+.1f}% (n=2)"]
    assert_png(path.parent / "ablation.png")
    # The failures are listed at the end with their error line.
    failures = text.split("## Diverged, failed and missing cells", 1)[1]
    assert "ValueError: boom" in failures and failures.count("RuntimeError: OOM") == 2


def test_vit_ablation_keeps_gelu_and_has_no_activation_row(tmp_path: Path) -> None:
    """A ViT's ablation runs its own GELU throughout: full LQF is GELU + MSE + K-FAC, two removals, four rows."""
    errs = {("mse", "kfac"): 10, ("ce", "kfac"): 14, ("mse", "none"): 12, ("ce", "none"): 20}
    for (loss, precond), err in errs.items():
        write_cell(tmp_path / "ablation", f"{loss}-{precond}", err, model="vit_tiny", activation="gelu", loss=loss,
                   precond=precond)
    text = write_report(tmp_path / "ablation", kind="ablation").read_text()
    rows = md_table(text, "Ablation: test error")
    assert [r[:4] for r in rows] == [
        ["gelu", "mse", "kfac", "— (full LQF)"], ["gelu", "mse", "none", "K-FAC → none"],
        ["gelu", "ce", "kfac", "MSE → CE"], ["gelu", "ce", "none", "MSE → CE, K-FAC → none"],
    ]
    rel = read_csv(tmp_path / "ablation" / "report" / "ablation_relative.csv")
    assert {r["removed"] for r in rel} == {"MSE → CE", "K-FAC → none"}
    (row,) = rows_where(rel, data="digits", removed="MSE → CE")
    assert float(row["rel_increase_pct"]) == pytest.approx(40.0)
    assert "Full LQF = gelu + mse + kfac" in text


def test_table1_selects_by_validation_not_test(tmp_path: Path) -> None:
    sweep = tmp_path / "table1"
    grid = [(0.01, 1e-4), (0.01, 1e-5), (0.001, 1e-4), (0.001, 1e-5)]
    # lqf: (0.01, 1e-4) has the best validation accuracy, (0.001, 1e-4) the best test error.
    lqf = {(0.01, 1e-4): ([0.95, 0.93], [20, 22]), (0.001, 1e-4): ([0.90, 0.90], [5, 5])}
    nlft = {(0.001, 1e-5): ([0.9, 0.9], [10, 12])}
    for recipe, points in (("lqf", lqf), ("nlft", nlft)):
        for lr, wd in grid:
            vals, errs = points.get((lr, wd), ([0.8, 0.8], [30, 30]))
            for seed in (0, 1):
                write_cell(
                    sweep,
                    f"digits/{recipe}-{lr}-{wd}-s{seed}",
                    errs[seed],
                    vals[seed],
                    recipe=recipe,
                    lr=lr,
                    weight_decay=wd,
                    seed=seed,
                )
    write_cell(sweep, "pets/nlft-s0", 10, recipe="nlft", data="pets")
    write_cell(sweep, "pets/lqf-s0", error="ValueError: bad lr\nmore detail", recipe="lqf", data="pets")
    # A cell that has only its config so far: running, or killed before it wrote anything.
    missing = sweep / "pets" / "lqf-s1" / ".hydra"
    missing.mkdir(parents=True)
    config = {
        "recipe": "lqf",
        "seed": 1,
        "data": {"name": "pets", "batch_size": 64},
        "activation": {"name": "leaky_relu"},
        "loss": {"_target_": "lqf_exp.losses.ScaledMSELoss"},
        "method": {
            "_target_": "lqf_exp.methods.LQF",
            "solver": {"_target_": "lqf_exp.solvers.SGDSolver", "lr": 0.001, "momentum": 0.9},
            "weight_decay": "${oops}",
        },
        "precond": {"name": "kfac"},
    }
    (missing / "config.yaml").write_text(yaml.safe_dump(config))

    path = write_report(sweep, tmp_path / "out")
    text = path.read_text()
    assert path == tmp_path / "out" / "report.md"
    assert detect_kinds(load_cells(sweep)) == ["table1"]
    rows = read_csv(path.parent / "table1.csv")
    (best,) = rows_where(rows, data="digits", method="lqf")
    assert float(best["test_err_mean"]) == pytest.approx(21.0) and float(best["val_acc_mean"]) == pytest.approx(0.94)
    assert (float(best["lr"]), float(best["weight_decay"]), best["n"]) == (0.01, 1e-4, "2")
    (ref,) = rows_where(rows, data="digits", method="nlft")
    assert float(ref["test_err_mean"]) == pytest.approx(11.0) and float(ref["lr"]) == 0.001
    assert "**validation**" in text

    table = {r[0]: r[1:] for r in md_table(text, "Table 1")}
    # nlft then lqf (the paper's column order); bold marks the lowest error of a row.
    assert table["digits"] == [f"**11.00 ± {math.sqrt(2):.2f} (n=2)**", f"21.00 ± {math.sqrt(2):.2f} (n=2)"]
    assert table["pets"] == ["10.00 ± 0.00 (n=1)", "FAILED (ValueError: bad lr); 1 missing"]
    rel = {r["data"]: r for r in read_csv(path.parent / "relative_error.csv")}
    assert float(rel["digits"]["rel_increase_pct"]) == pytest.approx(100 * (21 - 11) / 11)
    assert rel["pets"]["rel_increase_pct"] == ""
    assert float(rel["median"]["rel_increase_pct"]) == pytest.approx(100 * (21 - 11) / 11)
    assert_png(path.parent / "relative_error.png")

    cells = read_csv(path.parent / "cells.csv")
    assert len(cells) == 16 + 3
    (failed,) = rows_where(cells, status="failed")
    assert failed["error"] == "ValueError: bad lr" and failed["data"] == "pets"
    (pending,) = rows_where(cells, status="missing")
    assert (pending["cell"], pending["data"], pending["method"], pending["loss"]) == (
        "pets/lqf-s1",
        "pets",
        "lqf",
        "mse",
    )
    assert pending["weight_decay"] == "" and float(pending["lr"]) == 0.001
    assert "pets/lqf-s1" in text.split("## Diverged, failed and missing cells", 1)[1]


def test_paired_wins_ties_losses_per_seed(tmp_path: Path) -> None:
    """LQF against NLFT seed by seed, at NLFT's grid point picked by validation (lr 0.01 here, not the lower-error
    lr 0.001)."""
    sweep = tmp_path / "table1"
    lqf, nlft, nlft_other_lr = [7.0, 6.0, 5.0], [8.0, 6.0, 4.0], [1.0, 1.0, 1.0]
    for seed in range(3):
        write_cell(sweep, f"lqf-s{seed}", lqf[seed], recipe="lqf", seed=seed)
        write_cell(sweep, f"nlft-a-s{seed}", nlft[seed], val=0.9, recipe="nlft", method="finetune", seed=seed)
        write_cell(sweep, f"nlft-b-s{seed}", nlft_other_lr[seed], val=0.5, recipe="nlft", method="finetune",
                   lr=0.001, seed=seed)
    text = write_report(sweep, kind="table1").read_text()
    (row,) = md_table(text, "Paired per seed")
    assert row == ["digits", "nlft", "1–1–1", "s0: 7.00 vs 8.00, s1: 6.00 vs 6.00, s2: 5.00 vs 4.00"]
    outcomes = [r["outcome"] for r in read_csv(sweep / "report" / "paired.csv")]
    assert outcomes == ["win", "tie", "loss"]


def test_selected_grid_point_shows_each_methods_own_factors(tmp_path: Path) -> None:
    """A solved LQF has MSE's α and no lr; NLFT has lr and wd and no α: each shows its own (was a KeyError)."""
    sweep = tmp_path / "table1"
    write_cell(sweep, "lqf-s0", 5.0, recipe="lqf", lr=None, weight_decay="auto", target_scale=15.0)
    for lr in (0.01, 0.001):
        write_cell(sweep, f"nlft-{lr}-s0", 6.0, val=0.9 if lr == 0.01 else 0.5, recipe="nlft", method="finetune",
                   loss="ce", lr=lr, target_scale=None)
    text = write_report(sweep, kind="table1").read_text()
    (row,) = md_table(text, "Selected grid point")
    assert row == ["digits", "lr=0.01, wd=1e-04", "wd=auto, α=15"]


def test_a_grid_point_with_a_diverged_seed_is_not_picked(tmp_path: Path) -> None:
    """lr 0.05 has the best validation accuracy on the seeds that survived but diverged on seed 2: lr 0.01 is picked."""
    sweep = tmp_path / "table1"
    for seed in range(3):
        write_cell(sweep, f"lqf-s{seed}", 5.0, recipe="lqf", seed=seed)
        write_cell(sweep, f"nlft-0.01-s{seed}", 7.0, val=0.8, recipe="nlft", method="finetune", lr=0.01, seed=seed)
        cell = write_cell(sweep, f"nlft-0.05-s{seed}", 4.0, val=0.95, recipe="nlft", method="finetune", lr=0.05,
                          seed=seed)
        if seed == 2:
            payload = json.loads((cell / "metrics.json").read_text())
            payload.update(status="diverged", metrics={}, error="training loss nan")
            (cell / "metrics.json").write_text(json.dumps(payload))
    text = write_report(sweep, kind="table1").read_text()
    (nlft,) = rows_where(read_csv(sweep / "report" / "table1.csv"), method="nlft")
    assert float(nlft["lr"]) == 0.01 and float(nlft["test_err_mean"]) == pytest.approx(7.0) and nlft["n"] == "3"
    # Divergences are counted by grid point in the table, not listed message by message.
    assert md_table(text, "Table 1")[0][1] == "7.00 ± 0.00 (n=3) [1 diverged (lr=0.05: 1)]"


def test_equal_validation_counts_tie_whatever_float32_rounding_says(tmp_path: Path) -> None:
    """Two lr points with 213 of 250 validation images right over 5 seeds, stored as float32 fractions whose means
    differ in the 8th digit (the lowshot_why cells of fmnist_target at 10 shots): a tie, so the first grid point in
    sorted order (lr 0.001) is picked, not the one that float32 rounding favours."""
    sweep = tmp_path / "lowshot"
    vals = {0.001: [0.8999999761581421, 0.8399999737739563, 0.800000011920929, 0.8399999737739563, 0.8799999952316284],
            0.01: [0.8999999761581421, 0.8600000143051147, 0.800000011920929, 0.8399999737739563, 0.8600000143051147]}
    assert statistics.fmean(vals[0.01]) > statistics.fmean(vals[0.001])
    for lr, errs in ((0.001, 20.0), (0.01, 16.0)):
        for seed, val in enumerate(vals[lr]):
            write_cell(sweep, f"nlft-{lr}-s{seed}", errs, val, recipe="nlft", method="finetune", lr=lr, seed=seed,
                       shots=10)
    write_report(sweep, kind="lowshot")
    (row,) = rows_where(read_csv(sweep / "report" / "lowshot.csv"), method="nlft")
    assert float(row["test_err_mean"]) == pytest.approx(20.0)


def test_lowshot_values(tmp_path: Path) -> None:
    errs = {"lqf": {1: [40, 44], 5: [20, 22], None: [5, 7]}, "finetune": {1: [50, 50], 5: [20, 20], None: [4, 4]}}
    for method, per_shots in errs.items():
        for shots, seeds in per_shots.items():
            for seed, err in enumerate(seeds):
                write_cell(tmp_path, f"{method}-{shots}-s{seed}", err, method=method, shots=shots, seed=seed)
    path = write_report(tmp_path)
    assert detect_kinds(load_cells(tmp_path)) == ["lowshot"]
    rows = read_csv(path.parent / "lowshot.csv")
    for method, per_shots in errs.items():
        for shots, seeds in per_shots.items():
            (row,) = rows_where(rows, method=method, shots="" if shots is None else str(shots))
            assert float(row["test_err_mean"]) == pytest.approx(statistics.fmean(seeds))
            assert float(row["test_err_std"]) == pytest.approx(statistics.stdev(seeds)) and row["n"] == "2"
    rel = read_csv(path.parent / "lowshot_relative.csv")
    for shots, value in (("1", -16.0), ("5", 5.0), ("", 50.0)):
        (row,) = rows_where(rel, method="lqf", shots=shots, data="median")
        assert float(row["rel_increase_pct"]) == pytest.approx(value)
    table = md_table(path.read_text(), "Low-shot: test error")
    assert table[0] == ["digits", "1", "50.00 ± 0.00 (n=2)", f"42.00 ± {math.sqrt(8):.2f} (n=2)"]
    assert [r[1] for r in table] == ["1", "5", "full"]
    assert_png(path.parent / "lowshot.png")
    # Each seed draws its own k-shot subset, the same for every method: LQF is paired with fine-tuning per seed.
    paired = md_table(path.read_text(), "Paired per seed")
    assert [r[:4] for r in paired] == [["digits", "1", "finetune", "2–0–0"], ["digits", "5", "finetune", "0–1–1"],
                                       ["digits", "full", "finetune", "0–0–2"]]
    outcomes = [(r["shots"], r["seed"], r["outcome"]) for r in read_csv(path.parent / "paired.csv")]
    assert outcomes == [("1", "0", "win"), ("1", "1", "win"), ("5", "0", "tie"), ("5", "1", "loss"),
                        ("full", "0", "loss"), ("full", "1", "loss")]


def test_lowshot_picks_alpha_on_validation_and_keeps_lambda_rules_apart(tmp_path: Path) -> None:
    """MSE's α is LQF's own setting: picked by mean validation accuracy over seeds like fine-tuning's lr; the λ rule
    is a variant of the method, a column of its own."""
    cells = {  # (α, rule) -> (val acc, test error) per seed
        (15.0, "leave_one_out"): [(0.80, 20.0), (0.82, 22.0)],
        (1.0, "leave_one_out"): [(0.85, 30.0), (0.83, 32.0)],  # best on validation, worse on test: still picked
        (15.0, "validation"): [(0.70, 10.0), (0.70, 12.0)],
    }
    for (alpha, rule), seeds in cells.items():
        for seed, (val, err) in enumerate(seeds):
            write_cell(tmp_path, f"lqf-{alpha}-{rule}-s{seed}", err, val, shots=5, seed=seed, target_scale=alpha,
                       lambda_rule=rule, lr=None, momentum=None, weight_decay="auto")
    path = write_report(tmp_path, kind="lowshot")
    rows = read_csv(path.parent / "lowshot.csv")
    (loo,) = rows_where(rows, method="lqf (lambda_rule=leave_one_out)", shots="5")
    assert loo["target_scale"] == "1.0" and float(loo["test_err_mean"]) == pytest.approx(31.0)
    assert loo["grid_points"] == "2"
    (validation,) = rows_where(rows, method="lqf (lambda_rule=validation)", shots="5")
    assert float(validation["test_err_mean"]) == pytest.approx(11.0)


def test_batchnorm_modes_are_separate_methods(tmp_path: Path) -> None:
    """bn=train and bn=eval fine-tuning at the same lr are two methods, not two seeds of one grid point."""
    for bn, errs in (("train", (10.0, 12.0)), ("eval", (30.0, 32.0))):
        for seed, err in enumerate(errs):
            write_cell(tmp_path, f"ft-{bn}-s{seed}", err, method="finetune", recipe="nlft", bn=bn, seed=seed)
    write_cell(tmp_path, "lqf-s0", 8.0)
    path = write_report(tmp_path)
    table = md_table(path.read_text(), "Table 1: test error")
    header = next(line for line in path.read_text().splitlines() if line.startswith("| data set"))
    assert "nlft (bn=eval)" in header and "nlft (bn=train)" in header
    assert table[0][1:] == ["31.00 ± 1.41 (n=2)", "11.00 ± 1.41 (n=2)", "**8.00 ± 0.00 (n=1)**"]


def test_steps_per_cell_in_tables_and_csv(tmp_path: Path) -> None:
    for shots in (5, 10):
        for seed, steps in enumerate((300, 500, 1000)):
            write_cell(tmp_path, f"ft-{shots}-s{seed}", 20.0, method="finetune", shots=shots, seed=seed, steps=steps)
            write_cell(tmp_path, f"lqf-{shots}-s{seed}", 10.0, method="lqf", shots=shots, seed=seed, steps=0)
    path = write_report(tmp_path)
    table = md_table(path.read_text(), "Low-shot: test error")
    assert table[0] == ["digits", "5", "20.00 ± 0.00 (n=3, 500 steps)", "10.00 ± 0.00 (n=3, 0 steps)"]
    rows = read_csv(path.parent / "lowshot.csv")
    assert float(rows_where(rows, method="finetune", shots="5")[0]["steps_median"]) == 500
    cells = read_csv(path.parent / "cells.csv")
    assert sorted(int(r["steps"]) for r in cells if r["method"] == "finetune") == [300, 300, 500, 500, 1000, 1000]


def test_robustness_best_elr(tmp_path: Path) -> None:
    # Validation accuracy per (lr, batch_size) and seed; lqf's seed 0 alone would pick (0.01, 64), the mean (0.001, 16).
    vals = {
        "lqf": {(0.001, 16): [0.90, 0.94], (0.01, 64): [0.95, 0.85]},
        "finetune": {(0.01, 64): [0.90, 0.90]},
    }
    for method, points in vals.items():
        for lr in (0.01, 0.001):
            for bs in (16, 64):
                for seed, val in enumerate(points.get((lr, bs), [0.8, 0.8])):
                    write_cell(
                        tmp_path,
                        f"{method}/lr{lr}-bs{bs}-s{seed}",
                        100 * (1 - val) + 1,
                        val,
                        method=method,
                        lr=lr,
                        batch_size=bs,
                        seed=seed,
                    )
    path = write_report(tmp_path, kind="robustness")
    best = {r["method"]: r for r in read_csv(path.parent / "robustness_best_elr.csv")}
    assert float(best["lqf"]["elr"]) == pytest.approx(0.001 / ((1 - 0.9) * 16))
    assert float(best["finetune"]["elr"]) == pytest.approx(0.01 / ((1 - 0.9) * 64))
    grid = read_csv(path.parent / "robustness_grid.csv")
    assert len(grid) == 2 * 2 * 2
    assert [(r["lr"], r["batch_size"]) for r in rows_where(grid, method="lqf", best="True")] == [("0.001", "16")]
    assert "6.25e-04 (lr=0.001, bs=16)" in path.read_text()
    assert_png(path.parent / "robustness_elr.png")
    assert set(detect_kinds(load_cells(tmp_path))) == {"table1", "robustness"}


def test_cli_prints_report_path(ablation_report: tuple[Path, str], tmp_path: Path) -> None:
    sweep = ablation_report[0].parent.parent
    out = tmp_path / "cli"
    result = subprocess.run(
        [sys.executable, "-m", "lqf_exp.report", str(sweep), "--out", str(out), "--kind", "ablation"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == str(out / "report.md")
    assert "## Ablation (Fig. 2)" in result.stdout and (out / "cells.csv").is_file()
    bad = subprocess.run(
        [sys.executable, "-m", "lqf_exp.report", str(tmp_path / "nope")],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode != 0 and "does not exist" in bad.stderr


def test_unknown_kind_raises(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown report kind"):
        write_report(tmp_path, kind="fig9")


def test_wandb_logging_is_a_noop_without_a_run(ablation_report: tuple[Path, str], monkeypatch) -> None:
    out = ablation_report[0].parent
    pytest.importorskip("wandb")
    import wandb

    assert wandb.run is None
    assert log_tables_to_wandb(out) == 0

    logged: dict[str, Any] = {}
    fake_run = types.SimpleNamespace(log=logged.update)
    fake = types.SimpleNamespace(run=fake_run, Table=lambda columns, data: (columns, data))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    assert log_tables_to_wandb(out) == len(list(out.glob("*.csv")))
    columns, data = logged["report/ablation"]
    assert "test_err_mean" in columns and len(data) == 16


def test_diverged_cells_are_results_marked_in_tables_and_listed(tmp_path: Path) -> None:
    sweep = tmp_path / "ablation"
    for seed in (0, 1):
        write_cell(sweep, f"kfac-s{seed}", 10 + seed, seed=seed, precond="kfac")
    diverged = write_cell(sweep, "none-s0", 12, seed=0, precond="none")
    payload = json.loads((diverged / "metrics.json").read_text())
    payload.update(status="diverged", metrics={}, error="the LQF objective exploded: 3.1e+09 > 1000 × its start")
    (diverged / "metrics.json").write_text(json.dumps(payload))
    cells = {c.name: c for c in load_cells(sweep)}
    assert cells["none-s0"].status == "diverged" and cells["none-s0"].error_line.startswith("DIVERGED: ")
    text = write_report(sweep, kind="ablation").read_text()
    assert "1 diverged" in text and f"`{sweep}`" not in text  # relative paths only
    listed = text.split("## Diverged, failed and missing cells", 1)[1]
    assert "**Diverged (1):**" in listed and "exploded" in listed
