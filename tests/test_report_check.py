"""The results checker on a copy of the committed docs/results, clean and perturbed one change at a time."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest

from lqf_exp.report import write_report
from lqf_exp.report.check import Options, check, check_cells, column_class, main

from .helpers.sweep_cells import write_cell

RESULTS = Path(__file__).resolve().parent.parent / "docs" / "results"


@pytest.fixture
def copies(tmp_path: Path) -> tuple[Path, Path]:
    """(regenerated, committed): two copies of the committed CSVs, so the tests never touch docs/results."""
    if not any(RESULTS.rglob("*.csv")):
        pytest.skip("no committed results")
    pair = []
    for side in ("regenerated", "committed"):
        shutil.copytree(RESULTS, tmp_path / side, ignore=lambda _d, names: [n for n in names if n.endswith(".png")])
        pair.append(tmp_path / side)
    return pair[0], pair[1]


def find(root: Path, column: str) -> tuple[Path, int, dict[str, str]]:
    """The first CSV under ``root`` (sorted) with a non-empty, numeric value in ``column``: (path, row index, row)."""
    for path in sorted(root.rglob("*.csv")):
        with path.open(newline="") as handle:
            for i, row in enumerate(csv.DictReader(handle)):
                try:
                    float(row.get(column) or "")
                except ValueError:
                    continue
                return path, i, row
    pytest.skip(f"no committed CSV has a value in {column}")


def edit(path: Path, index: int, column: str | None, value: str | None = None) -> None:
    """Set ``column`` of row ``index`` to ``value``; with ``column`` None, drop that row."""
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        header, rows = list(reader.fieldnames or []), list(reader)
    if column is None:
        del rows[index]
    else:
        rows[index][column] = value or ""
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=header)
        writer.writeheader()
        writer.writerows(rows)


def test_a_copy_of_the_committed_results_checks_clean(copies: tuple[Path, Path], capsys) -> None:
    regenerated, committed = copies
    problems, compared = check(regenerated, committed)
    assert problems == []
    assert compared == len(list(RESULTS.rglob("*.csv")))
    assert main([str(regenerated), str(committed)]) == 0
    assert capsys.readouterr().out.startswith("OK:")


@pytest.mark.parametrize(("shift", "fails"), [(0.2, True), (-0.2, True), (0.05, False), (0.099, False)])
def test_a_test_error_moved_fails_beyond_the_tolerance(copies: tuple[Path, Path], shift: float, fails: bool) -> None:
    regenerated, committed = copies
    path, i, row = find(regenerated, "test_err_mean")
    moved = str(float(row["test_err_mean"]) + shift)
    edit(path, i, "test_err_mean", moved)
    problems, _ = check(regenerated, committed)
    if not fails:
        assert problems == []
        return
    name = path.relative_to(regenerated).as_posix()
    assert len(problems) == 1, problems
    line = problems[0]
    where = line.split("]")[0]
    assert where.startswith(f"{name} [") and f"data={row['data']}" in where and f"method={row['method']}" in where
    assert "] test_err_mean:" in line
    assert f"committed {row['test_err_mean']} vs regenerated {moved}" in line and "> 0.1 (percent)" in line
    # A looser tolerance lets it through.
    assert check(regenerated, committed, Options(tolerance=0.25))[0] == []


def test_a_dropped_row_and_a_missing_csv_fail(copies: tuple[Path, Path], capsys) -> None:
    regenerated, committed = copies
    path, i, row = find(regenerated, "test_err_mean")
    edit(path, i, None)
    gone = next(p for p in sorted(regenerated.rglob("*.csv")) if p != path)
    gone.unlink()
    (regenerated / "extra.csv").write_text("data,test_err\ndigits,1.0\n")
    problems, _ = check(regenerated, committed)
    name = path.relative_to(regenerated).as_posix()
    assert any(p.startswith(f"{name} [") and f"data={row['data']}" in p and f"method={row['method']}" in p
               and p.endswith("]: row missing in regenerated") for p in problems)  # fmt: skip
    assert f"{gone.relative_to(regenerated).as_posix()}: CSV missing in regenerated" in problems
    assert "extra.csv: CSV not in committed" in problems
    assert main([str(regenerated), str(committed)]) == 1
    out = capsys.readouterr()
    assert "row missing in regenerated" in out.out and out.err.startswith("FAIL: 3 difference(s)")


def test_a_deterministic_count_must_be_equal(copies: tuple[Path, Path]) -> None:
    regenerated, committed = copies
    path, i, row = find(regenerated, "n_failed")
    edit(path, i, "n_failed", str(int(row["n_failed"]) + 1))
    problems, _ = check(regenerated, committed)
    assert len(problems) == 1 and " n_failed: committed " in problems[0]
    assert problems[0].endswith("must be equal (count)")
    # No tolerance loosens a count.
    assert check(regenerated, committed, Options(tolerance=100, steps_tolerance=1, rel_tolerance=1))[0] == problems


def test_timings_notes_and_images_are_not_compared(copies: tuple[Path, Path]) -> None:
    regenerated, committed = copies
    path, i, row = find(regenerated, "duration_s")
    edit(path, i, "duration_s", str(float(row["duration_s"]) * 10 + 1))
    path, i, _ = find(regenerated, "n_failed")
    edit(path, i, "note", "a different note")
    (regenerated / "figure.png").write_bytes(b"not the committed figure")
    assert check(regenerated, committed)[0] == []
    assert [column_class(c) for c in ("duration_s", "seconds", "wall_s", "note", "error")] == [
        "timing", "timing", "timing", "text", "text"]  # fmt: skip


def test_steps_within_their_relative_tolerance(copies: tuple[Path, Path]) -> None:
    regenerated, committed = copies
    path, i, row = find(regenerated, "steps_median")
    steps = float(row["steps_median"])
    edit(path, i, "steps_median", str(steps * 1.05 + 0.01))
    assert check(regenerated, committed)[0] == []
    assert len(check(regenerated, committed, Options(steps_tolerance=0))[0]) == 1
    edit(path, i, "steps_median", str(steps * 1.5 + 1))
    assert "steps_median" in check(regenerated, committed)[0][0]


def test_relative_increase_and_std_follow_from_the_tolerance(tmp_path: Path) -> None:
    """rel = 100·(e − r)/r with e, r within 0.1 pt each may move by 100·0.1·(r+e)/(r·(r−0.1)); a median row by the
    file's largest such bound; a std over n seeds by 0.1·√(n/(n−1))."""
    old, new = tmp_path / "committed", tmp_path / "regenerated"
    header = "data,method,reference,test_err,reference_test_err,rel_increase_pct\n"
    # r = 5, e = 6: rel = 20%, bound = 10·11/(5·4.9) = 4.49 pt.
    for root, rel, median in ((old, 20.0, 20.0), (new, 24.4, 24.4)):
        root.mkdir()
        (root / "rel.csv").write_text(header + f"digits,lqf,nlft,6.0,5.0,{rel}\nmedian,lqf,nlft,,,{median}\n")
        (root / "t.csv").write_text("data,method,test_err_mean,test_err_std,n\ndigits,lqf,6.0,0.5,3\n")
    assert check(new, old)[0] == []
    (new / "rel.csv").write_text(header + "digits,lqf,nlft,6.0,5.0,24.6\nmedian,lqf,nlft,,,24.6\n")
    (new / "t.csv").write_text("data,method,test_err_mean,test_err_std,n\ndigits,lqf,6.0,0.63,3\n")
    problems = check(new, old)[0]
    assert [p.split("]")[0] for p in problems] == [
        "rel.csv [data=digits, method=lqf, reference=nlft", "rel.csv [data=median, method=lqf, reference=nlft",
        "t.csv [data=digits, method=lqf"]  # fmt: skip
    assert "test_err_std" in problems[2] and "> 0.1225 (spread)" in problems[2]


def test_rows_keyed_by_grid_factors_when_the_names_do_not_suffice(tmp_path: Path) -> None:
    old, new = tmp_path / "committed", tmp_path / "regenerated"
    rows = "data,method,lr,batch_size,test_err_mean\nd,nlft,0.1,16,5.0\nd,nlft,0.1,64,6.0\nd,nlft,0.01,16,7.0\n"
    for root in (old, new):
        root.mkdir()
        (root / "grid.csv").write_text(rows)
    # Reordered rows and 0.01 written as 1e-2 still match their committed rows.
    (new / "grid.csv").write_text("data,method,lr,batch_size,test_err_mean\nd,nlft,1e-2,16,7.0\nd,nlft,0.1,64,6.0\n"
                                  "d,nlft,0.1,16,5.0\n")  # fmt: skip
    assert check(new, old)[0] == []
    (new / "grid.csv").write_text("data,method,lr,batch_size,test_err_mean\nd,nlft,0.1,16,5.0\nd,nlft,0.1,64,6.5\n")
    assert sorted(check(new, old)[0]) == [
        "grid.csv [data=d, method=nlft, lr=0.01, batch_size=16]: row missing in regenerated",
        "grid.csv [data=d, method=nlft, lr=0.1, batch_size=64] test_err_mean: committed 6.0 vs regenerated 6.5: "
        "|Δ| 0.5 > 0.1 (percent)",
    ]


def test_a_sample_of_cells_rerun_checks_against_the_committed_cells_csv(tmp_path: Path, capsys) -> None:
    """--cells: a re-run subset of a sweep agrees with the committed cells.csv; a cell that moved, or one the
    committed sweep never had, fails; committed cells not re-run are not differences."""
    full, sample = tmp_path / "full", tmp_path / "sample"
    for seed, err in enumerate((5.0, 6.0, 7.0)):
        write_cell(full, f"digits/seed={seed}", err=err, seed=seed)
    write_report(full, tmp_path / "committed", kind="auto")
    committed = tmp_path / "committed" / "cells.csv"
    write_cell(sample, "digits/seed=1", err=6.0, seed=1)
    assert check_cells(sample, committed) == ([], 1)
    assert main(["--cells", str(sample), str(committed)]) == 0
    assert "OK: 1 cell(s)" in capsys.readouterr().out

    write_cell(sample, "digits/seed=2", err=7.2, seed=2)  # 0.2 pt off, beyond the 0.1-pt tolerance
    problems, compared = check_cells(sample, committed)
    assert compared == 2 and len(problems) == 2  # test_err in % and test/acc, both of seed 2
    assert all("seed=2" in p for p in problems)

    write_cell(sample, "digits/seed=9", err=5.0, seed=9)
    problems, _ = check_cells(sample, committed)
    assert any("seed=9" in p and "row not in committed" in p for p in problems)
    assert main(["--cells", str(sample), str(committed)]) == 1


def test_a_sample_check_needs_cells_and_a_committed_file(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "cells.csv").write_text("cell,status\n")
    assert check_cells(tmp_path / "empty", tmp_path / "cells.csv")[0] == [f"{tmp_path / 'empty'}: no cells to compare"]
    with pytest.raises(SystemExit):
        main(["--cells", str(tmp_path / "empty"), str(tmp_path)])  # a directory, not the committed cells.csv


def test_objective_gaps_below_the_floor_are_rounding(tmp_path: Path) -> None:
    """spread.csv's gap_max of a closed form: 2e-8 and 4e-9 agree (both rounding), 0.01 and 0.02 do not."""
    assert column_class("gap_max") == "gap"
    for side, gaps in (("committed", ("1.9e-08", "0.01")), ("regenerated", ("4.1e-09", "0.02"))):
        (tmp_path / side).mkdir()
        (tmp_path / side / "spread.csv").write_text("data,group,gap_max\n" + "".join(
            f"d{i},g,{gap}\n" for i, gap in enumerate(gaps)))  # fmt: skip
    problems, _ = check(tmp_path / "regenerated", tmp_path / "committed")
    assert len(problems) == 1 and "data=d1" in problems[0] and "(gap)" in problems[0]
