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
  (relative) or 1e-6 (absolute, :data:`GAP_FLOOR`), whichever is larger: a closed form's gap of 2e-8 or 4e-9 is
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
import csv
import math
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from lqf_exp.report.collect import FACTOR_KEYS, load_cells
from lqf_exp.report.markdown import write_csv
from lqf_exp.report.provenance import strip_row_paths
from lqf_exp.report.report import cell_rows

KEY_NAMES = ("cell", "data", "method", "reference", "removed", "shots", "seed", "order", "fraction", "mode", "step",
             "index")  # fmt: skip
# Columns that may complete a key (robustness_grid.csv: one row per lr × batch size); elsewhere they are picks.
KEY_EXTENSIONS = (*FACTOR_KEYS, "elr")
COUNT_NAMES = {"n", "grid_points", "dropped", "train_size", "val_size", "test_size", "samples", "label"}
ITERATION_WORDS = {"steps", "epochs", "passes", "iterations"}
TEXT_NAMES = {"note", "error", "message", "traceback", "command", "commit", "path", "output_dir"}
IGNORED = ("timing", "text")
GAP_FLOOR = 1e-6  # objective gaps below this are rounding (see the module docstring)
_EPS = 1e-9  # float noise in the tolerance arithmetic itself, not a tolerance


@dataclass
class Options:
    tolerance: float = 0.1  # percentage points of accuracy / test error
    steps_tolerance: float = 0.1  # relative
    rel_tolerance: float = 0.05  # relative


def column_class(name: str) -> str:
    """The class of a non-key column, from its name (see the module docstring)."""
    low = name.lower()
    words = set(re.split(r"[_/\s]+", low))
    if low in TEXT_NAMES:
        return "text"
    if low.endswith(("_s", "_ms")) or words & {"seconds", "duration", "time", "wall", "elapsed"}:
        return "timing"
    if words & ITERATION_WORDS:
        return "iterations"
    if "rel" in words or low.startswith("rel_increase"):
        return "relative"
    if "gap" in words:
        return "gap"
    if words & {"err", "acc"}:
        return "spread" if "std" in words else ("percent" if "err" in words else "fraction")
    if low in COUNT_NAMES or low.startswith("n_"):
        return "count"
    if low in FACTOR_KEYS or low in {"elr", "status", "outcome", "best", "class"}:
        return "exact"
    return "measure"  # numbers by default; text values in such a column are compared exactly


def _num(value: str) -> float | None:
    try:
        return float(value)
    except ValueError:
        return None


def _norm(value: str) -> str:
    number = _num(value)
    return repr(number) if number is not None else value


def read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """(header, rows) of a CSV."""
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        return list(reader.fieldnames or []), list(reader)


def key_columns(header: list[str], rows: list[dict[str, str]]) -> list[str]:
    """The identifying columns, extended by grid factors in header order until they tell every row apart."""
    # A cells.csv row is one cell directory: its name says it all, and its factors are then compared as values.
    keys = ["cell"] if "cell" in header else [c for c in header if c in KEY_NAMES]
    extensions = [c for c in header if c in KEY_EXTENSIONS and c not in keys]
    while len({_row_key(r, keys) for r in rows}) < len(rows) and extensions:
        keys.append(extensions.pop(0))
    return keys


def _row_key(row: dict[str, str], keys: list[str]) -> tuple[str, ...]:
    return tuple(_norm(row.get(k) or "") for k in keys)


def _index(rows: list[dict[str, str]], keys: list[str]) -> dict[tuple[str, ...], dict[str, str]]:
    """Rows by key; rows whose key repeats (no factor tells them apart) are told apart by their order."""
    seen: dict[tuple[str, ...], int] = {}
    out = {}
    for row in rows:
        key = _row_key(row, keys)
        seen[key] = seen.get(key, 0) + 1
        out[key if seen[key] == 1 else (*key, f"#{seen[key]}")] = row
    return out


def _relative_bound(row: dict[str, str], tol: float) -> float | None:
    """The change of 100·(e − r)/r that moves of at most ``tol`` in e and r allow; None without e and r."""
    refs = [c for c in row if column_class(c) == "percent" and c.startswith(("reference_", "full_"))]
    errs = [c for c in row if column_class(c) == "percent" and c not in refs]
    if not refs or not errs:
        return None
    r, e = _num(row[refs[0]] or "x"), _num(row[errs[0]] or "x")
    if r is None or e is None:
        return None
    return math.inf if r <= tol else 100.0 * tol * (r + e) / (r * (r - tol))


def _compare(cls: str, old: str, new: str, bound: float) -> str | None:
    """Why ``new`` (regenerated) is not ``old`` (committed) within ``bound``; None when they agree."""
    if old == new:
        return None
    if not old or not new:
        return f"empty on one side ({cls})"
    a, b = _num(old), _num(new)
    if a is None or b is None or cls in ("count", "exact"):
        if a is not None and b is not None and (a == b or (math.isnan(a) and math.isnan(b))):
            return None
        return f"must be equal ({cls})"
    if math.isnan(a) and math.isnan(b):
        return None
    if abs(a - b) <= bound + _EPS:
        return None
    return f"|Δ| {abs(a - b):.4g} > {bound:.4g} ({cls})"


def _bound(cls: str, column: str, old: str, new: str, row: dict[str, str], median_bound: float,
           opts: Options) -> float:  # fmt: skip
    """How far ``new`` may lie from ``old`` in column ``column`` of class ``cls`` (committed row ``row``)."""
    if cls == "percent":
        return opts.tolerance
    if cls == "fraction":
        return opts.tolerance / 100
    if cls == "spread":
        n = _num(row.get("n") or "x")
        factor = math.sqrt(n / (n - 1)) if n is not None and n > 1 else math.sqrt(2)
        return opts.tolerance * factor / (100 if "acc" in re.split(r"[_/]", column.lower()) else 1)
    if cls == "relative":
        bound = _relative_bound(row, opts.tolerance)
        return median_bound if bound is None else bound
    scale = max(abs(_num(old) or 0.0), abs(_num(new) or 0.0))
    if cls == "gap":
        return max(opts.rel_tolerance * scale, GAP_FLOOR)
    return (opts.steps_tolerance if cls == "iterations" else opts.rel_tolerance) * scale


def compare_csv(name: str, new_path: Path, old_path: Path, opts: Options, ignore: set[str],
                subset: bool = False) -> list[str]:  # fmt: skip
    """Every difference between the regenerated and the committed version of one CSV, one line each; with ``subset``
    the regenerated rows are a sample, so committed rows it lacks are not differences."""
    new_header, new_rows = read_csv(new_path)
    old_header, old_rows = read_csv(old_path)
    keys = key_columns(old_header, old_rows)
    classes = {c: "ignored" if c in ignore else column_class(c) for c in old_header if c not in keys}
    problems = [f"{name}: key column {k!r} missing in regenerated" for k in keys if k not in new_header]
    problems += [f"{name}: column {c!r} missing in regenerated" for c, cls in classes.items()
                 if c not in new_header and cls not in (*IGNORED, "ignored")]  # fmt: skip
    problems += [f"{name}: column {c!r} not in committed" for c in new_header
                 if c not in old_header and c not in ignore and column_class(c) not in IGNORED]  # fmt: skip
    if any(k not in new_header for k in keys):
        return problems
    old, new = _index(old_rows, keys), _index(new_rows, keys)
    bounds = [b for r in old_rows if (b := _relative_bound(r, opts.tolerance)) is not None]
    median_bound = max(bounds, default=math.inf)

    def shown(key: tuple[str, ...]) -> str:
        row = old.get(key) or new[key]  # as written in the committed file, not as normalized for matching
        return ", ".join(f"{k}={row.get(k)}" for k in keys) + (f" {key[-1]}" if len(key) > len(keys) else "")

    if not subset:
        problems += [f"{name} [{shown(k)}]: row missing in regenerated" for k in old if k not in new]
    problems += [f"{name} [{shown(k)}]: row not in committed" for k in new if k not in old]
    for key in (k for k in old if k in new):
        for column, cls in classes.items():
            if cls in (*IGNORED, "ignored") or column not in new_header:
                continue
            before, after = old[key].get(column) or "", new[key].get(column) or ""
            why = _compare(cls, before, after, _bound(cls, column, before, after, old[key], median_bound, opts))
            if why is not None:
                problems.append(f"{name} [{shown(key)}] {column}: committed {before or '(empty)'} vs regenerated "
                                f"{after or '(empty)'}: {why}")
    return problems


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
        write_csv(regenerated, strip_row_paths(cell_rows(cells), sweep))
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
