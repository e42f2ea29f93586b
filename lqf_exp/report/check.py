"""``python -m lqf_exp.report.check <regenerated dir> <committed dir>``: do regenerated results match committed ones?

Every CSV the two directories hold (recursively) is compared cell by cell, rows matched by their key columns. Each
column falls in one class (``--explain`` prints them), decided from its name because the report CSVs name their
columns consistently:

- ``key``: identifies the row: ``cell`` (cells.csv), else data, method, reference, removed, shots, seed, order,
  fraction, mode, step, index, then grid factors such as lr and batch_size until the key is unique in the file.
- ``percent``: test errors in % (an ``err`` word: test_err, test_err_mean, reference_test_err …): within
  ``--tolerance`` percentage points.
- ``fraction``: accuracies in [0, 1] (an ``acc`` word: val_acc_mean, test/acc …): within ``--tolerance`` / 100.
- ``spread``: a std of those over n seeds: if each seed moves by at most t, the sample std moves by at most
  t·√(n/(n−1)), so that is its tolerance.
- ``relative``: rel_increase_pct = 100·(e − r)/r: the bound the tolerance on e and r implies, 100·t·(r+e)/(r·(r−t));
  a median row (no e and r of its own) gets the largest bound of its file, which bounds any median of those rows.
- ``count``: n, n_failed, n_missing, grid_points, dropped, train_size, samples, label: fixed by the configuration and
  the data (or a cell that diverged on one side only, which is a difference), so exactly equal.
- ``exact``: discrete outcomes and picked grid points (status, outcome, best, lr, weight_decay, elr …, and any text
  column not listed elsewhere): exactly equal; a different pick is a different result.
- ``iterations``: steps, steps_median, epochs, passes: outcomes of a stopping rule, as reproducible as the floats it
  reads; within ``--steps-tolerance`` (relative; 0 demands equality, right for bit-for-bit reruns).
- ``gap``: an objective gap (L − L*)/(L(start) − L*), relative by construction: within ``--rel-tolerance``
  (relative) or 1e-6 (absolute, `compare.GAP_FLOOR`), whichever is larger: a closed form's gap of 2e-8 or 4e-9 is
  rounding, three orders below anything a stopping rule reads.
- ``measure``: any other number (losses, influence scores): within ``--rel-tolerance`` (relative), a guard against
  gross changes; no claim of docs/results rests on these.
- ``timing`` (duration_s, seconds, any ``_s`` column) and ``text`` (note, error: messages that embed numbers the
  other columns already carry) are not compared. Images (PNG) and other files are not compared either.

Exit status 0 when everything agrees, 1 with one line per differing cell, missing row, column or CSV.

``--cells <sweep dir> <committed cells.csv>`` checks a sample instead: the cells re-run under a sweep directory (a
subset of a committed sweep, made by the same command restricted to fewer values) against the committed cells.csv
that holds them among others. Every re-run cell must be a committed row and agree with it; committed rows not re-run
are not compared.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from lqf_exp.report.collect import load_cells
from lqf_exp.report.compare import Options, column_class, compare_csv, key_columns, read_csv
from lqf_exp.report.report import write_cells_csv

__all__ = ["Options", "check", "check_cells", "column_class", "compare_csv", "main"]


def check(regenerated: Path, committed: Path, opts: Options | None = None, ignore: set[str] | None = None,
          explain: bool = False) -> tuple[list[str], int]:  # fmt: skip
    """(problems, CSVs compared) for two results directories."""
    opts, ignore = opts or Options(), ignore or set()
    new = {p.relative_to(regenerated).as_posix() for p in regenerated.rglob("*.csv")}
    old = {p.relative_to(committed).as_posix() for p in committed.rglob("*.csv")}
    problems = [f"{n}: CSV missing in regenerated" for n in sorted(old - new)]
    problems += [f"{n}: CSV not in committed" for n in sorted(new - old)]
    for name in sorted(old & new):
        if explain:
            header, rows = read_csv(committed / name)
            keys = key_columns(header, rows)
            print(f"{name}: key {', '.join(keys)}; " + ", ".join(
                f"{c}={'ignored' if c in ignore else column_class(c)}" for c in header if c not in keys))  # fmt: skip
        problems += compare_csv(name, regenerated / name, committed / name, opts, ignore)
    return problems, len(old & new)


def check_cells(sweep_dir: Path, committed_csv: Path, opts: Options | None = None,
                ignore: set[str] | None = None) -> tuple[list[str], int]:  # fmt: skip
    """(problems, cells compared) for the cells re-run under ``sweep_dir``, a sample of the committed ``cells.csv``."""
    sweep = sweep_dir.resolve()
    cells = load_cells(sweep)
    if not cells:
        return [f"{sweep_dir}: no cells to compare"], 0
    with tempfile.TemporaryDirectory() as tmp:
        regenerated = Path(tmp) / "cells.csv"
        write_cells_csv(regenerated, cells, sweep)
        problems = compare_csv(committed_csv.as_posix(), regenerated, committed_csv, opts or Options(), ignore or set(),
                               subset=True)  # fmt: skip
    return problems, len(cells)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lqf_exp.report.check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("regenerated", type=Path, help="the results directory just regenerated")
    parser.add_argument("committed", type=Path, help="the committed results directory, e.g. docs/results")
    parser.add_argument("--tolerance", type=float, default=Options.tolerance,
                        help="percentage points allowed on accuracies and test errors (default: %(default)s)")
    parser.add_argument("--steps-tolerance", type=float, default=Options.steps_tolerance,
                        help="relative difference allowed on steps/epochs/passes; 0: exact (default: %(default)s)")
    parser.add_argument("--rel-tolerance", type=float, default=Options.rel_tolerance,
                        help="relative difference allowed on other numbers (default: %(default)s)")
    parser.add_argument("--ignore", action="append", default=[], metavar="COLUMN", help="a column not to compare")
    parser.add_argument("--explain", action="store_true", help="print each CSV's key and column classes")
    parser.add_argument("--cells", action="store_true",
                        help="REGENERATED is a sweep directory holding a sample of the cells of COMMITTED, a cells.csv")
    args = parser.parse_args(argv)
    if not args.regenerated.is_dir():
        parser.error(f"{args.regenerated} is not a directory")
    if args.cells and not args.committed.is_file():
        parser.error(f"{args.committed} is not a file (--cells compares with a committed cells.csv)")
    if not args.cells and not args.committed.is_dir():
        parser.error(f"{args.committed} is not a directory")
    opts = Options(args.tolerance, args.steps_tolerance, args.rel_tolerance)
    if args.cells:
        problems, compared = check_cells(args.regenerated, args.committed, opts, set(args.ignore))
        what = f"cell(s) of {args.regenerated}"
    else:
        problems, compared = check(args.regenerated, args.committed, opts, set(args.ignore), args.explain)
        what = "CSV(s)"
    for line in problems:
        print(line)
    if problems:
        print(f"FAIL: {len(problems)} difference(s) in {compared} {what} compared", file=sys.stderr)
        return 1
    print(f"OK: {compared} {what} agree (tolerance {opts.tolerance} pt; timings, notes and images not compared)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
