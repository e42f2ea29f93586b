"""Compare one regenerated CSV with its committed version, cell by cell: the column classes and their tolerances
(``python -m lqf_exp.report.check``'s docstring lists them; ``--explain`` prints each CSV's)."""

from __future__ import annotations

import csv
import math
import re
from dataclasses import dataclass
from pathlib import Path

from lqf_exp.report.collect import FACTOR_KEYS

KEY_NAMES = ("cell", "data", "method", "reference", "removed", "shots", "seed", "order", "fraction", "mode", "step",
             "index")  # fmt: skip
# Columns that may complete a key (robustness_grid.csv: one row per lr × batch size); elsewhere they are picks.
KEY_EXTENSIONS = (*FACTOR_KEYS, "elr")
COUNT_NAMES = {"n", "grid_points", "dropped", "train_size", "val_size", "test_size", "samples", "label"}
ITERATION_WORDS = {"steps", "epochs", "passes", "iterations"}
TEXT_NAMES = {"note", "error", "message", "traceback", "command", "commit", "path", "output_dir"}
IGNORED = ("timing", "text")
GAP_FLOOR = 1e-6  # objective gaps below this are rounding (lqf_exp.report.check's docstring, "gap")
_EPS = 1e-9  # float noise in the tolerance arithmetic itself, not a tolerance


@dataclass
class Options:
    tolerance: float = 0.1  # percentage points of accuracy / test error
    steps_tolerance: float = 0.1  # relative
    rel_tolerance: float = 0.05  # relative


def column_class(name: str) -> str:
    """The class of a non-key column, from its name (``lqf_exp.report.check``'s docstring lists the classes)."""
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
