"""Seed aggregation, model selection by validation accuracy, method labels and cell formatting."""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from lqf_exp.report.collect import Cell

# The optimization hyper-parameters a table takes the best of (by validation accuracy), as the paper does.
HP_KEYS = ("lr", "weight_decay", "batch_size", "momentum", "target_scale")  # target_scale: MSE's α
# Factors that may tell two methods apart when recipe/method alone does not.
EXTRA_KEYS = ("task", "model", "weights", "activation", "loss", "precond", "linearize", "shots", "method", "bn",
              "lambda_rule")
# Column order of the paper's Tables 1 and 2 (MPN-COV and B-LQF: Table 2); other labels follow alphabetically.
METHOD_ORDER = ("nlft", "finetune", "lpft", "mpn_cov", "b_lqf", "lqf", "lqf_fc", "gaf", "probe", "fc")
MAX_ERROR_CHARS = 70
# Validation accuracies are float32 fractions of a few hundred images at most: two grid points with the same number of
# correct images can differ in the 8th digit of their seed mean (0.85199998 vs 0.85199999 for 213 of 250), so their
# means are compared at this many decimals and an equal count is a tie, not a win decided by rounding.
VAL_DECIMALS = 6


def order_key(value: Any) -> tuple[int, Any]:
    """Numbers first (ascending), then strings, then None ("full" data, unset factors)."""
    if value is None:
        return (2, "")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (0, float(value))
    return (1, str(value))


def group_by(cells: Iterable[Cell], keys: Sequence[str]) -> dict[tuple, list[Cell]]:
    """Cells grouped by the values of ``keys``, in sorted key order."""
    groups: dict[tuple, list[Cell]] = {}
    for cell in cells:
        groups.setdefault(tuple(cell.get(k) for k in keys), []).append(cell)
    return {k: groups[k] for k in sorted(groups, key=lambda t: tuple(order_key(v) for v in t))}


def short_error(cell: Cell) -> str:
    line = cell.error_line
    return line if len(line) <= MAX_ERROR_CHARS else line[: MAX_ERROR_CHARS - 1] + "…"


@dataclass
class Stats:
    """Mean ± sample std of the test error (%), mean validation accuracy and median optimizer steps over the
    finished seeds (steps: None when no cell recorded them)."""

    n: int
    mean: float | None
    std: float | None
    val: float | None
    steps: float | None = None

    @classmethod
    def of(cls, cells: Iterable[Cell]) -> Stats:
        done = [c for c in cells if c.finished and c.test_err is not None]
        errs = [c.test_err for c in done]
        vals = [c.val_acc for c in done if c.val_acc is not None]
        if not errs:
            return cls(0, None, None, None)
        # A single seed has no spread to estimate; 0.0 together with "n=1" says so.
        std = statistics.stdev(errs) if len(errs) > 1 else 0.0
        steps = [c.steps for c in done if c.steps is not None]
        return cls(len(errs), statistics.fmean(errs), std, statistics.fmean(vals) if vals else None,
                   statistics.median(steps) if steps else None)

    def text(self, digits: int = 2) -> str:
        if not self.n:
            return "—"
        steps = "" if self.steps is None else f", {self.steps:.0f} steps"
        return f"{self.mean:.{digits}f} ± {self.std:.{digits}f} (n={self.n}{steps})"


@dataclass
class Pick:
    """The best grid point of a group of cells, chosen by mean validation accuracy over seeds (never test)."""

    cells: list[Cell]
    grid: Sequence[str] = HP_KEYS
    points: dict[tuple, Stats] = field(init=False)
    best_key: tuple | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        groups = group_by(self.cells, self.grid)
        self.points = {key: Stats.of(group) for key, group in groups.items()}
        # A point on which a seed diverged ranks below every point on which none did: its mean validation accuracy
        # over the seeds that survived would hide that the setting fails (a user with those seeds would not pick it).
        stable = {key: not any(c.status == "diverged" for c in group) for key, group in groups.items()}
        ranked = [((stable[key], round(s.val, VAL_DECIMALS) if s.val is not None else float("-inf")), key)
                  for key, s in self.points.items() if s.n]
        if ranked:
            # max() keeps the first of equal scores, so ties go to the first grid point in sorted order.
            self.best_key = max(ranked, key=lambda item: item[0])[1]

    @property
    def best(self) -> Stats:
        return self.points[self.best_key] if self.best_key is not None else Stats(0, None, None, None)

    @property
    def hp(self) -> dict[str, Any]:
        return dict(zip(self.grid, self.best_key, strict=True)) if self.best_key is not None else {}

    @property
    def failed(self) -> list[Cell]:
        """Cells without a result: failed runs and diverged solves (their error line says which)."""
        return [c for c in self.cells if c.status in ("failed", "diverged")]

    @property
    def missing(self) -> list[Cell]:
        return [c for c in self.cells if c.status == "missing"]

    @property
    def status(self) -> str:
        if self.best.n:
            return "finished"
        return "failed" if self.failed else "missing"

    def _diverged_text(self) -> str | None:
        """E.g. ``6 diverged (lr=0.05: 3, lr=0.01: 3)``: by grid point, as their messages differ only in the step."""
        diverged = [c for c in self.failed if c.status == "diverged"]
        if not diverged:
            return None
        varying = [k for k in self.grid if len({c.get(k) for c in self.cells}) > 1]
        where = ", ".join(f"{', '.join(f'{k}={v}' for k, v in zip(varying, key, strict=True))}: {len(group)}"
                          for key, group in group_by(diverged, varying).items()) if varying else ""
        return f"{len(diverged)} diverged" + (f" ({where})" if where else "")

    def _failure_texts(self) -> list[str]:
        """The distinct errors of the failed (not diverged) cells."""
        return sorted({short_error(c) for c in self.failed if c.status != "diverged"})

    def note(self) -> str:
        """Diverged, failed and missing runs of this group, e.g. ``6 diverged (lr=0.05: 3, lr=0.01: 3); 1 failed:
        ValueError: boom; 1 missing``."""
        parts = [text] if (text := self._diverged_text()) else []
        if errors := self._failure_texts():
            parts.append(f"{sum(c.status != 'diverged' for c in self.failed)} failed: " + " / ".join(errors))
        if self.missing:
            parts.append(f"{len(self.missing)} missing")
        return "; ".join(parts)

    def text(self, digits: int = 2) -> str:
        if not self.cells:
            return "missing"
        if self.status == "failed":
            reasons = [*self._failure_texts(), *([text] if (text := self._diverged_text()) else [])]
            return f"FAILED ({' / '.join(reasons)})" + (f"; {len(self.missing)} missing" if self.missing else "")
        if self.status == "missing":
            return f"missing ({len(self.missing)} run{'s' if len(self.missing) > 1 else ''} pending)"
        note = self.note()
        return self.best.text(digits) + (f" [{note}]" if note else "")

    def csv_fields(self) -> dict[str, Any]:
        best = self.best
        return {
            "status": self.status if self.cells else "missing",
            "test_err_mean": best.mean,
            "test_err_std": best.std,
            "n": best.n,
            "val_acc_mean": best.val,
            "steps_median": best.steps,
            **{key: self.hp.get(key) for key in self.grid},
            "grid_points": len(self.points),
            "n_failed": len(self.failed),
            "n_missing": len(self.missing),
            "note": self.note() if self.cells else "no cell in the sweep",
        }


def base_label(factors: dict[str, Any]) -> str:
    """The recipe if set, else the method (LQF that linearizes only the head is the paper's LQF FC)."""
    if factors.get("recipe"):
        return str(factors["recipe"])
    method = str(factors.get("method") or "unknown")
    linearize = factors.get("linearize")
    if method == "lqf" and linearize not in (None, "all"):
        return "lqf_fc" if linearize == "head" else f"lqf_{linearize}"
    return method


def make_labeler(cells: Sequence[Cell], ignore: Iterable[str] = ()) -> Callable[[Cell], str]:
    """A method label per cell, qualified by any factor that varies within one recipe/method (e.g. ``loss=ce``)."""
    ignored = set(ignore)
    seen: dict[str, dict[str, set[str]]] = {}
    for cell in cells:
        per_key = seen.setdefault(base_label(cell.factors), {})
        for key in EXTRA_KEYS:
            # A cell known only from its config may lack a factor: unknown is not a different value.
            if cell.get(key) is not None or cell.status != "missing":
                per_key.setdefault(key, set()).add(str(cell.get(key)))
    varying = {base: [k for k, v in keys.items() if len(v) > 1 and k not in ignored] for base, keys in seen.items()}

    def label(cell: Cell) -> str:
        base = base_label(cell.factors)
        extra = ", ".join(f"{k}={cell.get(k)}" for k in varying.get(base, []))
        return f"{base} ({extra})" if extra else base

    return label


def label_base(label: str) -> str:
    return label.split(" (", 1)[0]


def sort_labels(labels: Iterable[str]) -> list[str]:
    def key(label: str) -> tuple[int, str]:
        base = label_base(label)
        return (METHOD_ORDER.index(base) if base in METHOD_ORDER else len(METHOD_ORDER), label)

    return sorted(set(labels), key=key)


def nlft_label(labels: Iterable[str]) -> str | None:
    """Non-linear fine-tuning: recipe ``nlft`` if the sweep has it, else method ``finetune`` (BatchNorm in train
    mode, what users do, where both modes are present)."""
    ordered = sorted(sort_labels(labels), key=lambda label: "bn=eval" in label)
    for base in ("nlft", "finetune"):
        for label in ordered:
            if label_base(label) == base:
                return label
    return None


def rel_increase(err: float | None, ref: float | None) -> float | None:
    """(err − ref)/ref in %; None where either is unknown or the reference error is 0."""
    if err is None or ref is None or ref == 0:
        return None
    return 100.0 * (err - ref) / ref


def median(values: Iterable[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def pct(value: float | None) -> str:
    if value is None:
        return "n/a"
    # Round first so that float noise around 0 (e.g. -1e-14) does not print as "-0.0%".
    return f"{round(value, 1) + 0.0:+.1f}%"


def distinct(cells: Iterable[Cell], key: str) -> list[Any]:
    return sorted({c.get(key) for c in cells}, key=order_key)
