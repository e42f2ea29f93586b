"""``report.md``, ``cells.csv`` and the tables and plots of the kinds a sweep supports."""

from __future__ import annotations

import csv
import os
import shlex
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from lqf_exp.report.collect import FACTOR_KEYS, Cell, load_cells
from lqf_exp.report.markdown import Section, md_cell, write_csv
from lqf_exp.report.provenance import provenance_lines, shown_path, strip_paths, strip_row_paths
from lqf_exp.report.spread import is_spread_cell, spread_section
from lqf_exp.report.stats import base_label, distinct
from lqf_exp.report.sweeps import lowshot_section, robustness_section
from lqf_exp.report.tables import COMPONENTS, ablation_section, table1_section

KINDS = ("table1", "ablation", "lowshot", "robustness", "spread")
BUILDERS: dict[str, Callable[[Sequence[Cell], Path], list[Section]]] = {
    "table1": table1_section,
    "ablation": ablation_section,
    "lowshot": lowshot_section,
    "robustness": robustness_section,
    "spread": spread_section,
}


def _varies(cells: Sequence[Cell], key: str) -> bool:
    # shots=None means the full data set; any other unset factor is unknown, not a different value.
    return len([v for v in distinct(cells, key) if v is not None or key == "shots"]) > 1


def detect_kinds(cells: Sequence[Cell]) -> list[str]:
    """The tables whose factors vary in the sweep; Table 1 alone if none does, as a plain summary."""
    known = [c for c in cells if c.get("data") is not None]
    by_base: dict[str, list[Cell]] = {}
    for cell in known:
        by_base.setdefault(base_label(cell.factors), []).append(cell)
    kinds = []
    # Low-shot cells are not Table 1 material: the low-shot table already compares methods per shots.
    if len(by_base) > 1 and not _varies(known, "shots"):
        kinds.append("table1")
    # LQF solved by more than one solver or at more than one batch size: the spread study (its preconditioner
    # variation is part of it, not an ablation).
    spread = [c for c in known if is_spread_cell(c)]
    is_spread = _varies(spread, "solver") or _varies(spread, "batch_size")
    # Within one method: NLFT vs LQF differ in all three by construction, which is not an ablation.
    if not is_spread and any(len({tuple(c.get(k) for k in COMPONENTS) for c in group}) > 1
                             for group in by_base.values()):
        kinds.append("ablation")
    if _varies(known, "shots"):
        kinds.append("lowshot")
    with_lr = [c for c in known if c.get("lr") is not None]
    if _varies(with_lr, "lr") and _varies(with_lr, "batch_size"):
        kinds.append("robustness")
    if is_spread:
        kinds.append("spread")
    return kinds or ["table1"]


def cell_rows(cells: Sequence[Cell]) -> list[dict[str, Any]]:
    """One flat row per cell: factors, test error, every metric, status and error message."""
    extra = sorted({k for c in cells for k in c.factors} - set(FACTOR_KEYS))
    metric_keys = sorted({k for c in cells for k in c.metrics})
    return [
        {
            "cell": c.name,
            "status": c.status,
            **{k: c.get(k) for k in (*FACTOR_KEYS, *extra)},
            "test_err": c.test_err,
            **{k: c.metrics.get(k) for k in metric_keys},
            "epochs": c.epochs,
            "steps": c.steps,
            "duration_s": c.duration_s,
            "error": c.error_line if c.status != "finished" else None,
        }
        for c in cells
    ]


def write_cells_csv(path: Path, cells: Sequence[Cell], sweep: Path) -> None:
    """``cells.csv``: one row per cell, paths relative to ``sweep`` (what a report writes and the checker re-reads)."""
    write_csv(path, strip_row_paths(cell_rows(cells), sweep))


def _cell_summary(cell: Cell) -> str:
    keys = ("data", "recipe", "method", "activation", "loss", "precond", "solver", "shots", "lr", "weight_decay",
            "batch_size")
    factors = ", ".join(f"{k}={cell.get(k)}" for k in (*keys, "seed") if cell.get(k) is not None)
    return f"`{cell.name}` ({factors})"


def _header(sweep_dir: Path, cells: Sequence[Cell], kinds: Sequence[str], kind: str, provenance: list[str]) -> str:
    counts = {s: sum(c.status == s for c in cells) for s in ("finished", "diverged", "failed", "missing")}
    why = "detected from the factors that vary" if kind == "auto" else "requested"
    lines = [
        f"# Sweep report: {sweep_dir.name}",
        "",
        *provenance,
        f"- Sweep directory: `{shown_path(sweep_dir)}`",
        f"- Cells: {len(cells)} ({counts['finished']} finished, {counts['diverged']} diverged, {counts['failed']} "
        f"failed, {counts['missing']} missing/running); one row per cell in `cells.csv`.",
        f"- Tables ({why}): {', '.join(kinds)}.",
        "- Diverged, failed and missing cells are marked in every table they belong to and listed at the end.",
    ]
    return "\n".join(lines)


def _failures(cells: Sequence[Cell]) -> str:
    diverged = [c for c in cells if c.status == "diverged"]
    failed = [c for c in cells if c.status == "failed"]
    missing = [c for c in cells if c.status == "missing"]
    parts = ["## Diverged, failed and missing cells"]
    if not diverged and not failed and not missing:
        parts.append("None: every cell finished." if cells else "None.")
    if diverged:
        parts.append(f"**Diverged ({len(diverged)}):**\n\n" + "\n".join(
            f"- {_cell_summary(c)}: {md_cell(c.error_line)}" for c in diverged))  # fmt: skip
    if failed:
        parts.append(f"**Failed ({len(failed)}):**\n\n" + "\n".join(
            f"- {_cell_summary(c)}: {md_cell(c.error_line)}" for c in failed))  # fmt: skip
    if missing:
        parts.append(f"**Missing or running ({len(missing)}):**\n\n" + "\n".join(
            f"- {_cell_summary(c)}: {md_cell(c.error_line)}" for c in missing))  # fmt: skip
    return "\n\n".join(parts)


def _report_command(sweep: Path, out_dir: str | os.PathLike[str] | None, kind: str) -> str:
    """The command line that writes this report again (paths as :func:`shown_path` shows them)."""
    args = [shown_path(sweep), *(["--out", shown_path(Path(out_dir))] if out_dir is not None else []),
            *(["--kind", kind] if kind != "auto" else [])]  # fmt: skip
    return " ".join(["python -m lqf_exp.report", *(shlex.quote(a) for a in args)])


def write_report(sweep_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str] | None = None,
                 kind: str = "auto", command: str | Sequence[str] | None = None) -> Path:  # fmt: skip
    """Write ``report.md``, ``cells.csv`` and the tables (CSV) and plots (PNG) of ``kind``; return report.md.

    The header records the code's commit, the sweep's ``command`` (the ones given, else those Hydra's multirun.yaml
    kept), this report's command and the machine kind. Absolute paths are cut out of the Markdown and every CSV
    (relative to the sweep where they lie below it): committed reports travel between machines.
    """
    if kind != "auto" and kind not in KINDS:
        raise ValueError(f"unknown report kind {kind!r}; expected auto or one of {', '.join(KINDS)}")
    sweep = Path(sweep_dir).resolve()
    out = Path(out_dir) if out_dir is not None else sweep / "report"
    cells = load_cells(sweep)
    for cell in cells:  # before any table shortens an error message and cuts a path in two
        cell.error = strip_paths(cell.error, sweep) if cell.error else cell.error
        cell.factors = strip_row_paths([cell.factors], sweep)[0]
    out.mkdir(parents=True, exist_ok=True)
    write_cells_csv(out / "cells.csv", cells, sweep)
    kinds = detect_kinds(cells) if kind == "auto" else [kind]
    sections = [section for k in kinds for section in BUILDERS[k](cells, out)]
    for table in (t for s in sections for t in s.tables):
        if table.csv_rows is not None:
            table.csv_rows = strip_row_paths(table.csv_rows, sweep)
        table.write_csv(out)
    if not cells:
        sections.insert(0, Section("No cells", [f"No metrics.json, error.json or config under `{shown_path(sweep)}`."]))
    commands = [command] if isinstance(command, str) else list(command or [])
    provenance = provenance_lines(sweep, _report_command(sweep, out_dir, kind), commands, [c.device for c in cells],
                                  [c.code for c in cells if c.status != "missing"])
    parts = [_header(sweep, cells, kinds, kind, provenance), *(s.markdown() for s in sections), _failures(cells)]
    path = out / "report.md"
    path.write_text(strip_paths("\n\n".join(parts), sweep) + "\n")
    return path


def _number(value: str) -> Any:
    try:
        return float(value) if value != "" else None
    except ValueError:
        return value


def log_tables_to_wandb(out_dir: str | os.PathLike[str]) -> int:
    """Log every CSV of ``out_dir`` as a ``wandb.Table`` to the active run; returns how many (0: no run, no-op).

    Never starts a run: a report is often made long after the sweep, and a stray run would pollute the project.
    """
    try:
        import wandb
    except ImportError:
        return 0
    if getattr(wandb, "run", None) is None:
        return 0
    logged = 0
    for path in sorted(Path(out_dir).glob("*.csv")):
        with path.open(newline="") as handle:
            rows = list(csv.reader(handle))
        if not rows:
            continue
        table = wandb.Table(columns=rows[0], data=[[_number(v) for v in row] for row in rows[1:]])
        wandb.run.log({f"report/{path.stem}": table})
        logged += 1
    return logged


__all__ = ["KINDS", "cell_rows", "detect_kinds", "load_cells", "log_tables_to_wandb", "write_cells_csv", "write_report"]
