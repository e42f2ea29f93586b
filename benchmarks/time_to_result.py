"""Time to a result: every method's default recipe on one task, wall time against test accuracy.

The comparison to make before choosing a method. Each (method, seed) runs through :func:`lqf_exp.pipeline.run`
exactly as ``run.py`` runs it (the recipe's own stopping rule, budget and λ choice; nothing is tuned here), into
``<out>/<data-and-overrides slug>/<method>/s<seed>``, and its ``metrics.json`` gives the rest. Methods (``--methods``):

- ``lqf``: the default recipe (no ``experiment=`` override): LQF, λ chosen automatically;
- ``nlft``: ``experiment=nlft`` (BatchNorm statistics updated: ``method.bn=train``);
- ``nlft_bn_eval``: ``experiment=nlft method.bn=eval`` (statistics frozen, as LQF keeps them);
- ``lpft``: ``experiment=lpft`` (the linear probe's head, then NLFT);
- ``probe``: ``experiment=probe`` (the linear probe alone);
- ``--variant NAME=OVERRIDES`` (repeatable) adds an LQF variant: the default recipe plus those overrides.

Columns of the per-run table:

- **status**: LQF's solver status (``converged``: the stopping rule ended the solve; ``capped``: its pass cap did);
  fine-tuning and the probe ``finished`` (``capped`` when fine-tuning used all of ``trainer.max_steps``, i.e. early
  stopping never ended it); ``diverged`` (a :class:`~lqf_exp.solvers.DivergenceError`, recorded by the pipeline);
  ``failed`` (any other exception; the message is in results.json).
- **wall s**: ``time.perf_counter`` around ``run(cfg)``: data loading, model build, head fit, Jacobian cache,
  training or solve, test and checkpoint writes; not the Hydra composition.
- **λ-selection s**: LQF only, the time its ``weight_decay=auto`` spent choosing λ, with the share of wall time.
  From the solver's history (one row per recorded point, ``seconds`` since the controller was built): the final λ's
  solve starts at the last row that opens a solve — a row whose λ differs from the row before, or that no pass
  produced (same ``epoch`` as the row before: the evaluation at the start of a restarted solve). The selection time is
  that row's ``seconds`` minus the first row's, so the validation path's solves at the λs it ranked, their validation
  losses and the restart's evaluation, but neither the head fit nor the Jacobian cache before the first row. With λ
  given (no selection) it is 0. With ``leave-one-out`` (exact, on the dual system) the choice happens before the
  first row and the history cannot separate it from the head fit and the cache: recorded as unknown (``—``, None).
- **passes or steps**: LQF: ``solver.epochs + solver.eval_passes`` (solver passes plus the evaluation passes of the
  stopping rule); ``in memory`` when the solve ran on the stored Jacobian (the passes are then iterations on a
  matrix, with no network pass), ``exact`` when δ* came from the dual system. Fine-tuning: optimizer steps
  (``steps``, Lightning's global step).
- **val acc**, **test acc**: ``metrics["val/acc"]``, ``metrics["test/acc"]`` of ``metrics.json``.

Then per method the median wall over the runs that did not diverge or fail, and its ratio to the median of the
faster of the two NLFT recipes (``nlft``, ``nlft_bn_eval``; among those run). ``--growth N ...`` repeats ``lqf`` and
the NLFT recipes (those in ``--methods``, both if none) on ``data=fashion_mnist_target`` at
``data.train_per_class=N`` and prints how the cost grows with the training set. Outputs in ``--out``: the printed
tables (``results.md``), every run (``results.json``), test accuracy against wall time (``time_to_result.png``)
and, with ``--growth``, wall time against training-set size (``growth.png``). Examples::

    python benchmarks/time_to_result.py                                        # digits, every method, seed 0
    python benchmarks/time_to_result.py --data fashion_mnist_target --overrides data.train_per_class=300 --seeds 0 1
    python benchmarks/time_to_result.py --methods lqf nlft --variant "lqf_nocache=method.jacobian_cache_gb=null"
    python benchmarks/time_to_result.py --growth-only --growth 100 300 1000 3000
    python benchmarks/time_to_result.py --data digits --methods probe nlft --overrides data.shots=5 trainer.max_epochs=2
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import platform
import re
import shlex
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.pyplot as plt
import torch

from lqf_exp.config import compose_config
from lqf_exp.pipeline import run
from lqf_exp.results import ERROR_FILE, METRICS_FILE
from lqf_exp.solvers import DivergenceError

matplotlib.use("Agg")  # files only: the benchmark runs on headless boxes (switching after pyplot's import is fine)

QUIET = ["logger=none", "callbacks.progress_bar.refresh_rate=0", "skip_finished=false", "resume=false"]
RECIPES: dict[str, list[str]] = {
    "lqf": [],
    "nlft": ["experiment=nlft"],
    "nlft_bn_eval": ["experiment=nlft", "method.bn=eval"],
    "lpft": ["experiment=lpft"],
    "probe": ["experiment=probe"],
}
NLFT_RECIPES = ("nlft", "nlft_bn_eval")
GROWTH_DATA = "fashion_mnist_target"
NOT_RESULTS = ("diverged", "failed")  # runs whose wall time is not a time to a result
MARKERS = "osD^vPX*<>ph"


@dataclass
class Row:
    """One run: what the tables, the plots and results.json show."""

    data: str  # the data-and-overrides slug
    method: str
    seed: int
    status: str
    wall_s: float
    selection_s: float | None = None
    selection_method: str | None = None
    weight_decay: float | None = None
    epochs: int | None = None
    eval_passes: int | None = None
    in_memory: bool = False
    exact: bool = False
    steps: int | None = None
    val_acc: float | None = None
    test_acc: float | None = None
    cache_s: float | None = None
    train_per_class: int | None = None
    error: str | None = None
    output_dir: str = ""

    @property
    def ok(self) -> bool:
        return self.status not in NOT_RESULTS

    @property
    def passes(self) -> int | None:
        return None if self.epochs is None else self.epochs + (self.eval_passes or 0)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="digits", help="a conf/data config name")
    p.add_argument("--overrides", nargs="*", default=[], help="Hydra overrides applied to every run")
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--methods", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    p.add_argument("--variant", action="append", default=[], metavar="NAME=OVERRIDES",
                   help="an extra LQF method NAME: the default recipe plus these space-separated overrides")
    p.add_argument("--growth", nargs="*", type=int, default=[], metavar="N",
                   help=f"data.train_per_class values: LQF and NLFT on data={GROWTH_DATA} at each")
    p.add_argument("--growth-only", action="store_true", help="skip the comparison on --data; only --growth")
    p.add_argument("--out", default="outputs/benchmarks/time_to_result")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args(argv)
    if args.growth_only and not args.growth:
        p.error("--growth-only needs --growth sizes")
    try:
        args.variants = parse_variants(args.variant)
    except ValueError as error:
        p.error(str(error))
    return args


def parse_variants(specs: Sequence[str]) -> dict[str, list[str]]:
    """``NAME=OVERRIDES`` → ``{NAME: [override, ...]}``; the name becomes a directory, so it must be a plain word."""
    variants: dict[str, list[str]] = {}
    for spec in specs:
        name, sep, overrides = spec.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or name in RECIPES or name in variants:
            raise ValueError(f"--variant {spec!r}: expected NAME=OVERRIDES with a new name of letters, digits, _.-")
        variants[name] = shlex.split(overrides)
    return variants


def slug(data: str, overrides: Sequence[str]) -> str:
    """A directory name for the task: the data config and the overrides, hashed past a readable length."""
    text = re.sub(r"[^A-Za-z0-9.=_-]+", "_", "-".join([data, *overrides]))
    return text if len(text) <= 80 else f"{text[:60]}-{hashlib.sha1(text.encode()).hexdigest()[:10]}"


# -- one run ----------------------------------------------------------------------------------------------------
def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def execute(overrides: list[str], out_dir: Path) -> tuple[dict[str, Any] | None, float, str | None, int | None]:
    """Run one config; ``(metrics.json payload or None, wall seconds, error message or None, trainer.max_steps)``.

    A diverged or failed run is a result of the comparison, not a reason to lose the other runs: it is caught."""
    for stale in (METRICS_FILE, ERROR_FILE):  # a file left by an earlier invocation must not pass for this run's
        (out_dir / stale).unlink(missing_ok=True)
    gc.collect()  # runs share this process: what an earlier run left in reference cycles must not load the next
    started = time.perf_counter()
    payload, error, max_steps = None, None, None
    try:
        cfg = compose_config(overrides, out_dir)
        max_steps = cfg.trainer.get("max_steps")
        started = time.perf_counter()  # Hydra's composition is the same for every method: not timed
        payload = run(cfg)
    except DivergenceError as exc:
        error = f"DivergenceError: {exc}"
    except Exception as exc:  # noqa: BLE001 - any failure is recorded in the row; the benchmark goes on
        error = f"{type(exc).__name__}: {exc}"
    wall = time.perf_counter() - started
    if payload is None:  # the pipeline writes metrics.json for a diverged run (its history up to the blow-up)
        payload = read_json(out_dir / METRICS_FILE)
    return payload, wall, error, max_steps


def selection_seconds(solver: dict[str, Any]) -> float | None:
    """Seconds LQF's λ selection took (module docstring): 0 with λ given, None where the history cannot tell."""
    selection = solver.get("weight_decay_selection") or {}
    if not selection:
        return 0.0  # λ was given: nothing chosen
    if selection.get("method") == "leave-one-out":
        return None  # chosen before the first history row, together with the head fit and the cache
    history = solver.get("history") or []
    opens = [i for i in range(1, len(history))
             if history[i].get("weight_decay") != history[i - 1].get("weight_decay")
             or history[i].get("epoch") == history[i - 1].get("epoch")]
    if not opens:
        return None  # the path never reached its final solve (e.g. it diverged on the way)
    first, final = history[0].get("seconds"), history[opens[-1]].get("seconds")
    return None if first is None or final is None else float(final) - float(first)


def run_status(payload: dict[str, Any] | None, error: str | None, max_steps: int | None) -> str:
    if (error or "").startswith("DivergenceError") or (payload or {}).get("status") == "diverged":
        return "diverged"
    if payload is None:
        return "failed"
    solver = payload.get("solver") or {}
    if solver.get("status") in ("converged", "capped"):
        return solver["status"]
    steps = payload.get("steps")
    if not solver and steps and max_steps is not None and 0 < max_steps <= steps:
        return "capped"  # fine-tuning spent its whole step budget: early stopping never ended it
    return str(payload.get("status", "finished"))


def make_row(data: str, method: str, seed: int, out_dir: Path, payload: dict[str, Any] | None, wall: float,
             error: str | None, max_steps: int | None, train_per_class: int | None) -> Row:
    payload = payload or {}
    metrics = payload.get("metrics") or {}
    solver = payload.get("solver") or {}
    cache = solver.get("jacobian_cache") or {}
    row = Row(data=data, method=method, seed=seed, status=run_status(payload or None, error, max_steps),
              wall_s=wall, val_acc=metrics.get("val/acc"), test_acc=metrics.get("test/acc"),
              train_per_class=train_per_class, error=error, output_dir=str(out_dir))
    if solver:  # LQF: solver passes; the optimizer steps Lightning counts are the solver's batches, not shown
        row.selection_s = selection_seconds(solver)
        row.selection_method = (solver.get("weight_decay_selection") or {}).get("method")
        row.weight_decay = solver.get("weight_decay")
        row.epochs, row.eval_passes = solver.get("epochs"), solver.get("eval_passes")
        row.in_memory, row.exact = bool(solver.get("in_memory")), bool(solver.get("exact"))
        row.cache_s = cache.get("seconds") if cache.get("used") else None
    else:
        row.steps = payload.get("steps")
    return row


def run_task(data: str, overrides: list[str], methods: dict[str, list[str]], seeds: Sequence[int], out: Path,
             rows: list[Row], train_per_class: int | None = None, done: Callable[[Row], None] | None = None) -> None:
    """Every (method, seed) on one task, appended to ``rows``; ``done`` sees each row as it comes (progress and an
    incremental save, so an interrupted benchmark keeps what it measured)."""
    task = slug(data, overrides)
    for method, recipe in methods.items():
        for seed in seeds:
            out_dir = out / task / method / f"s{seed}"
            cfg_overrides = [f"data={data}", *recipe, *QUIET, *overrides, f"seed={seed}"]
            print(f"\n=== {task} | {method} | seed {seed}: {' '.join(cfg_overrides)}", flush=True)
            payload, wall, error, max_steps = execute(cfg_overrides, out_dir)
            rows.append(make_row(task, method, seed, out_dir, payload, wall, error, max_steps, train_per_class))
            if done is not None:
                done(rows[-1])


# -- tables -----------------------------------------------------------------------------------------------------
def num(value: float | None, fmt: str = ".1f") -> str:
    return "—" if value is None else format(value, fmt)


def effort_text(row: Row) -> str:
    if row.passes is not None:
        notes = [note for note, on in (("in memory", row.in_memory), ("exact", row.exact)) if on]
        return plural(row.passes, "pass", "passes") + (f" ({', '.join(notes)})" if notes else "")
    return "—" if row.steps is None else plural(row.steps, "step", "steps")


def plural(count: int, one: str, many: str) -> str:
    return f"{count} {one if count == 1 else many}"


def selection_text(row: Row) -> str:
    if row.selection_s is None:
        return "—" if row.selection_method is None else f"— ({row.selection_method})"
    share = f" ({row.selection_s / row.wall_s:.0%})" if row.wall_s > 0 else ""
    return f"{row.selection_s:.1f}{share}"


def row_line(row: Row) -> str:
    return (f"| {row.method} | {row.seed} | {row.status} | {row.wall_s:.1f} | {selection_text(row)} | "
            f"{effort_text(row)} | {num(row.val_acc, '.4f')} | {num(row.test_acc, '.4f')} |")


def runs_table(rows: Sequence[Row]) -> list[str]:
    return ["| method | seed | status | wall s | λ-selection s | passes or steps | val acc | test acc |",
            "|---|---:|---|---:|---:|---|---:|---:|", *map(row_line, rows)]


def median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def median_walls(rows: Sequence[Row]) -> dict[str, float | None]:
    """Median wall per method over its runs that reached a result (diverged and failed runs have none)."""
    methods = dict.fromkeys(r.method for r in rows)
    return {m: median([r.wall_s for r in rows if r.method == m and r.ok]) for m in methods}


def nlft_reference(walls: dict[str, float | None]) -> tuple[str, float] | None:
    """The faster NLFT recipe by median wall (diverged runs left out), or None when none reached a result."""
    timed = [(m, w) for m, w in walls.items() if m in NLFT_RECIPES and w is not None]
    return min(timed, key=lambda item: item[1]) if timed else None


def summary_table(rows: Sequence[Row]) -> list[str]:
    walls = median_walls(rows)
    reference = nlft_reference(walls)
    if reference is not None:
        ratio_head = f"wall / {reference[0]}"
    elif any(m in NLFT_RECIPES for m in walls):
        ratio_head = "wall / NLFT (no NLFT run reached a result)"
    else:
        ratio_head = "wall / NLFT (not run)"
    lines = [f"| method | runs with a result | median wall s | median test acc | {ratio_head} |",
             "|---|---:|---:|---:|---:|"]
    for method, wall in walls.items():
        mine = [r for r in rows if r.method == method]
        ratio = None if wall is None or reference is None or reference[1] <= 0 else wall / reference[1]
        test = median([r.test_acc for r in mine if r.ok])
        lines.append(f"| {method} | {sum(r.ok for r in mine)}/{len(mine)} | {num(wall)} | {num(test, '.4f')} | "
                     f"{num(ratio, '.2f')} |")
    return lines


def growth_line(size: int, rows: Sequence[Row]) -> str:
    lqf = [r for r in rows if r.method == "lqf"]
    lqf_ok = [r for r in lqf if r.ok]
    passes = median([r.passes for r in lqf_ok])
    notes = [note for note, on in (("in memory", any(r.in_memory for r in lqf_ok)),
                                   ("exact", any(r.exact for r in lqf_ok))) if on]
    where = f" ({', '.join(notes)})" if notes else ""
    lqf_wall = median([r.wall_s for r in lqf_ok])
    reference = nlft_reference(median_walls([r for r in rows if r.method in NLFT_RECIPES]))
    nlft_text, ratio, nlft_test = "all diverged", None, None
    if reference is not None:
        nlft_text = f"{reference[1]:.1f} ({reference[0]})"
        ratio = None if lqf_wall is None or reference[1] <= 0 else lqf_wall / reference[1]
        nlft_test = median([r.test_acc for r in rows if r.method == reference[0] and r.ok])
    lqf_status = ", ".join(sorted({r.status for r in lqf})) or "—"
    return (f"| {size} | {num(passes, '.0f')}{where} | {num(lqf_wall)} | {nlft_text} | {num(ratio, '.2f')} | "
            f"{num(median([r.test_acc for r in lqf_ok]), '.4f')} | {num(nlft_test, '.4f')} | {lqf_status} |")


def growth_table(sizes: Sequence[int], rows: Sequence[Row]) -> list[str]:
    lines = ["| train per class | LQF passes | LQF wall s | fastest NLFT wall s | LQF / NLFT wall | LQF test acc | "
             "NLFT test acc | LQF status |", "|---:|---:|---:|---:|---:|---:|---:|---|"]
    return lines + [growth_line(size, [r for r in rows if r.train_per_class == size]) for size in sizes]


# -- plots and files --------------------------------------------------------------------------------------------
def plot_accuracy(rows: Sequence[Row], title: str, path: Path) -> None:
    """Test accuracy against wall time, one marker per run, one legend entry per method."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, method in enumerate(dict.fromkeys(r.method for r in rows)):
        mine = [r for r in rows if r.method == method and r.test_acc is not None]
        if mine:
            ax.scatter([r.wall_s for r in mine], [100 * r.test_acc for r in mine], marker=MARKERS[i % len(MARKERS)],
                       s=60, label=method)
    walls = [r.wall_s for r in rows if r.test_acc is not None]
    if walls and min(walls) > 0 and max(walls) / min(walls) > 10:
        ax.set_xscale("log")  # the methods' costs span orders of magnitude
    ax.set_xlabel("wall time per run (s)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(title="method")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_growth(rows: Sequence[Row], path: Path) -> None:
    """Median wall time against training-set size, per method, log-log."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    sizes = sorted({r.train_per_class for r in rows if r.train_per_class is not None})
    for i, method in enumerate(dict.fromkeys(r.method for r in rows)):
        points = [(n, median([r.wall_s for r in rows if r.method == method and r.train_per_class == n and r.ok]))
                  for n in sizes]
        points = [(n, w) for n, w in points if w is not None]
        if points:
            ax.plot(*zip(*points, strict=True), marker=MARKERS[i % len(MARKERS)], label=method)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("training images per class (data.train_per_class)")
    ax.set_ylabel("median wall time per run (s)")
    ax.set_title(f"data={GROWTH_DATA}", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(title="method")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def save_rows(out: Path, header: dict[str, Any], rows: Sequence[Row], growth: Sequence[Row]) -> None:
    payload = {**header, "rows": [asdict(r) for r in rows], "growth": [asdict(r) for r in growth]}
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")


# -- main -------------------------------------------------------------------------------------------------------
def machine() -> dict[str, Any]:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "torch": torch.__version__, "threads": torch.get_num_threads()}


def selected_methods(args: argparse.Namespace) -> dict[str, list[str]]:
    methods = {m: RECIPES[m] for m in args.methods}
    return methods | {name: [*RECIPES["lqf"], *overrides] for name, overrides in args.variants.items()}


def growth_methods(args: argparse.Namespace) -> dict[str, list[str]]:
    nlft = [m for m in args.methods if m in NLFT_RECIPES] or list(NLFT_RECIPES)
    return {m: RECIPES[m] for m in ("lqf", *nlft)}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    info = machine()
    print(f"machine: {info['platform']}, {info['processor']}, torch {info['torch']}, threads {info['threads']}; "
          f"args {vars(args)}", flush=True)
    header = {"machine": info, "args": vars(args)}
    rows: list[Row] = []
    growth: list[Row] = []

    def progress(row: Row) -> None:
        print(f"--> {row.method} s{row.seed}: {row.status}, {row.wall_s:.1f} s, test acc {num(row.test_acc, '.4f')}"
              + (f" [{row.error.splitlines()[0]}]" if row.error else ""), flush=True)
        save_rows(out, header, rows, growth)

    if not args.growth_only:
        run_task(args.data, list(args.overrides), selected_methods(args), args.seeds, out, rows, done=progress)
    for size in args.growth:
        run_task(GROWTH_DATA, [*args.overrides, f"data.train_per_class={size}"], growth_methods(args), args.seeds,
                 out, growth, train_per_class=size, done=progress)

    lines = [f"machine: {info['platform']}, {info['processor']}, torch {info['torch']}, threads {info['threads']}"]
    if rows:
        task = slug(args.data, args.overrides)
        lines += ["", f"## {task}", "", *runs_table(rows), "", *summary_table(rows)]
        plot_accuracy(rows, task, out / "time_to_result.png")
    if growth:
        lines += ["", f"## growth on data={GROWTH_DATA} (medians over seeds {args.seeds})", "",
                  *growth_table(args.growth, growth), "", *runs_table(growth)]
        plot_growth(growth, out / "growth.png")
    print("\n" + "\n".join(lines), flush=True)
    save_rows(out, header, rows, growth)
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print(f"\nresults in {out / 'results.json'}, {out / 'results.md'}"
          + (f", {out / 'time_to_result.png'}" if rows else "") + (f", {out / 'growth.png'}" if growth else ""))


if __name__ == "__main__":
    main()
