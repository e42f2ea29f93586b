"""Dataset summarization (paper Fig. 6): drop the most or the least informative fraction of the training set of a
finished LQF run (F-SI from ``influence.csv``), re-solve LQF on the rest, and plot test error against the fraction
dropped, one curve per order, seeds as error bars:

    python -m lqf_exp.influence <run dir>                       # influence.csv first (K-FAC; --method exact)
    python -m lqf_exp.influence.summarize <run dir> [--fractions 0,0.1,0.3,0.5] [--seeds 0,1,2]

Each cell is an ordinary run (``<run dir>/summarize/<order>-<fraction>/seed<s>``, resumable, skipped once finished)
composed from the run's own overrides plus ``data.drop=<index file>``, the run's λ (``method.weight_decay``: only
the data changes between cells) and its k-shot subset (``data.shots_seed``); the seed changes the batch order only,
so on this convex problem the error bars are small by construction. A run that took the dual closed form (λ by
leave-one-out) has its cells solved by it too (``solver=kernel``): an iterative solve to the 1% gap at the pinned λ
would change test predictions by its tolerance alone, and the cells would not measure the data.
"""

from __future__ import annotations

import argparse
import csv
import logging
import statistics
import sys
from pathlib import Path
from typing import Any

import yaml

from lqf_exp.config import compose_config
from lqf_exp.influence.outputs import CSV_FILE
from lqf_exp.influence.run_dir import load_finished_run
from lqf_exp.pipeline import run
from lqf_exp.report.plots import curve_plot
from lqf_exp.report.provenance import result_header, run_command, shown_path
from lqf_exp.results import changed_predictions, read_metrics, read_test_predictions

log = logging.getLogger(__name__)

__all__ = ["ORDERS", "summarize"]

ORDERS = ("most", "least")  # drop the most informative first | the least informative first
PINNED = ("seed", "data.drop", "data.shots_seed", "+data.shuffle_seed", "method.weight_decay", "logger")


def _read_fsi(run_dir: Path) -> list[float]:
    path = run_dir / "influence" / CSV_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run `python -m lqf_exp.influence {run_dir}` first")
    with path.open() as handle:
        return [float(row["fsi"]) for row in csv.DictReader(handle)]


def _exact_solver(metrics: dict[str, Any]) -> list[str]:
    """``solver=kernel`` where the run's own solution was the dual closed form, else nothing (its own solver)."""
    selection = (metrics.get("solver") or {}).get("weight_decay_selection") or {}
    return ["solver=kernel"] if selection.get("method") == "leave-one-out" else []


def _run_overrides(run_dir: Path, also_pinned: set[str]) -> list[str]:
    """The run's command-line overrides without the keys every cell sets itself (PINNED and ``also_pinned``)."""
    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: summarization re-composes the run from its command-line "
                                "overrides, so the run must come from `python run.py`")
    overrides = yaml.safe_load(path.read_text()) or []
    pinned = {p.lstrip("+") for p in (*PINNED, *also_pinned)}
    return [o for o in overrides if o.split("=", 1)[0].lstrip("+~") not in pinned]


def _drop_file(out: Path, order: str, fraction: float, fsi: list[float]) -> Path | None:
    count = round(fraction * len(fsi))
    if count == 0:
        return None
    ranked = sorted(range(len(fsi)), key=lambda i: fsi[i], reverse=order == "most")
    path = out / f"drop-{order}-{fraction:g}.txt"
    path.write_text("\n".join(str(i) for i in sorted(ranked[:count])) + "\n")
    return path


def _changed_from_full(out: Path, order: str, seed: int, cell: Path) -> int | str:
    """How many test predictions of ``cell`` differ from the same seed's cell with nothing dropped: an equal error
    count is not the same predictions. Empty where either run has no ``test_predictions.csv`` (or no 0 cell ran)."""
    full, this = read_test_predictions(out / f"{order}-0" / f"seed{seed}"), read_test_predictions(cell)
    return "" if full is None or this is None else changed_predictions(full, this)


def _plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    curves = {}
    for order in ORDERS:
        fractions = sorted({r["fraction"] for r in rows if r["order"] == order})
        errs = [[r["test_err"] for r in rows if r["order"] == order and r["fraction"] == f] for f in fractions]
        curves[f"{order} informative dropped first"] = [
            (100 * f, statistics.fmean(e), statistics.stdev(e) if len(e) > 1 else 0.0)
            for f, e in zip(fractions, errs, strict=True)]
    curve_plot(path, curves, title, "training samples dropped (%)", "test error (%)")


def _table(rows: list[dict[str, Any]]) -> str:
    fractions = sorted({r["fraction"] for r in rows})
    lines = ["| dropped | " + " | ".join(f"{o} informative first" for o in ORDERS) + " |", "|---|---|---|"]
    for fraction in fractions:
        cells = []
        for order in ORDERS:
            picked = [r for r in rows if r["order"] == order and r["fraction"] == fraction]
            errs = [r["test_err"] for r in picked]
            spread = statistics.stdev(errs) if len(errs) > 1 else 0.0
            changed = [r["changed"] for r in picked if r["changed"] != ""]
            moved = f"; {statistics.fmean(changed):g} predictions changed" if changed and fraction > 0 else ""
            cells.append(f"{statistics.fmean(errs):.2f} ± {spread:.2f} (n={len(errs)}{moved})" if errs else "—")
        lines.append(f"| {100 * fraction:.0f}% | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summarize(run_dir: Path, fractions: list[float], seeds: list[int], out: Path | None = None) -> Path:
    """Run every (order, fraction, seed) cell not finished yet; write ``summarize.csv``, ``.md`` and ``.png``."""
    if any(not 0 <= f < 1 for f in fractions):
        raise ValueError(f"fractions must lie in [0, 1), got {fractions}")
    finished = load_finished_run(run_dir)
    fsi = _read_fsi(run_dir)
    if len(fsi) != len(finished.datamodule.train_dataset):  # type: ignore[arg-type]
        raise ValueError(f"{run_dir / 'influence' / CSV_FILE} has {len(fsi)} rows for a training set of "
                         f"{len(finished.datamodule.train_dataset)}: recompute it")  # type: ignore[arg-type]
    out = out or run_dir / "summarize"
    out.mkdir(parents=True, exist_ok=True)
    solver = _exact_solver(finished.metrics)
    base = _run_overrides(run_dir, {"solver"} if solver else set()) + solver + [
        f"data.shots_seed={finished.datamodule.shots_seed}", f"method.weight_decay={finished.weight_decay}",
        "logger=csv"]
    rows = []
    for fraction in fractions:
        for order in ORDERS:
            drop = _drop_file(out, order, fraction, fsi)
            for seed in seeds:
                cell = out / f"{order}-{fraction:g}" / f"seed{seed}"
                extra = [f"seed={seed}", f"+data.shuffle_seed={seed}"] + ([f"data.drop={drop}"] if drop else [])
                metrics = read_metrics(cell)
                if metrics is None:
                    log.info("summarize: %s (%d samples dropped)", cell, round(fraction * len(fsi)))
                    metrics = run(compose_config(base + extra, cell))
                rows.append({"order": order, "fraction": fraction, "seed": seed,
                             "dropped": round(fraction * len(fsi)), "train_size": metrics["data"]["train_size"],
                             "test_err": 100 * (1 - metrics["metrics"]["test/acc"]),
                             "changed": _changed_from_full(out, order, seed, cell)})
    with (out / "summarize.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    title = f"Dataset summarization, {finished.cfg.data.name} (LQF, λ = {finished.weight_decay:g})"
    _plot(rows, out / "summarize.png", title)
    this = (f"python -m lqf_exp.influence.summarize {shown_path(run_dir)}"
            f" --fractions {','.join(f'{f:g}' for f in fractions)} --seeds {','.join(str(seed) for seed in seeds)}")
    header = "\n".join(result_header([run_command(run_dir) or f"the run in {shown_path(run_dir)}", this]))
    (out / "summarize.md").write_text(
        f"# {title}\n\n{header}\n\nTest error (%), mean ± std over seeds; predictions changed: test samples (mean "
        f"over seeds) predicted differently from the same seed with nothing dropped.\n\n{_table(rows)}\n\n"
        "![summarization](summarize.png)\n")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lqf_exp.influence.summarize", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="a finished LQF run with influence/influence.csv")
    parser.add_argument("--fractions", default="0,0.1,0.2,0.3,0.4,0.5", help="fractions to drop (default: 0–0.5)")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds (default: 0)")
    parser.add_argument("--out", default=None, help="output directory (default: <run dir>/summarize)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s")
    try:
        fractions = [float(f) for f in args.fractions.split(",")]
        seeds = [int(s) for s in args.seeds.split(",")]
        out = summarize(Path(args.run_dir), fractions, seeds, Path(args.out) if args.out else None)
    except (FileNotFoundError, ValueError) as error:
        parser.error(str(error))
    print(out / "summarize.md")
    print((out / "summarize.md").read_text(), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
