"""LQF against each other method, seed by seed: a paired count of wins, ties and losses beside the means.

Means ± std over 3 seeds hide whether one method is ahead on every seed or on one lucky seed. Each method's grid point
is the one Table 1 picked by validation; the pair of a seed is LQF's and the other method's test error on that seed
(the same test set, so equal errors are the same number of wrong test images: a tie). The ablation pairs every
one-component change of its factorial the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from lqf_exp.report.markdown import Section, Table
from lqf_exp.report.stats import Pick, label_base

REFERENCE = "lqf"
# Errors in % from accuracies that are ratios of counts: equal counts give equal floats up to rounding.
_TIE_TOLERANCE = 1e-9
_COLUMN_NAMES = {"data": "data set"}  # Markdown headers of the CSV's row fields


def _per_seed(pick: Pick) -> dict[int, float]:
    """The test error (%) of every finished seed at the picked grid point."""
    if pick.best_key is None:
        return {}
    hp = pick.hp
    return {
        int(c.get("seed") or 0): c.test_err
        for c in pick.cells
        if c.finished and c.test_err is not None and all(c.get(k) == v for k, v in hp.items())
    }


def paired_counts(lqf: dict[int, float], other: dict[int, float]) -> tuple[int, int, int, list[int]]:
    """(wins, ties, losses, seeds) of LQF over the seeds both have; a win is a lower test error."""
    seeds = sorted(set(lqf) & set(other))
    wins = sum(lqf[s] < other[s] - _TIE_TOLERANCE for s in seeds)
    losses = sum(lqf[s] > other[s] + _TIE_TOLERANCE for s in seeds)
    return wins, len(seeds) - wins - losses, losses, seeds


def paired_section(picks: dict[tuple, Pick], datasets: Sequence, labels: Sequence[str],
                   row_fields: Callable[[Any], dict[str, Any]] = lambda d: {"data": d}) -> list[Section]:
    """One row per data set and method: LQF's wins–ties–losses and the per-seed errors behind them. ``datasets``
    are the first half of the keys of ``picks`` (a data set, or e.g. (data set, shots)); ``row_fields`` names their
    parts for the CSV."""
    reference = next((m for m in labels if label_base(m) == REFERENCE), None)
    if reference is None:
        return []
    rows, csv_rows = [], []
    for d in datasets:
        ours = _per_seed(picks[d, reference])
        fields = row_fields(d)
        for m in (m for m in labels if m != reference):
            theirs = _per_seed(picks[d, m])
            wins, ties, losses, seeds = paired_counts(ours, theirs)
            if not seeds:
                continue
            per_seed = ", ".join(f"s{s}: {ours[s]:.2f} vs {theirs[s]:.2f}" for s in seeds)
            rows.append([*(str(v) for v in fields.values()), m, f"{wins}–{ties}–{losses}", per_seed])
            csv_rows += [{**fields, "method": m, "reference": reference, "seed": s, "reference_test_err": ours[s],
                          "test_err": theirs[s], "outcome": "win" if ours[s] < theirs[s] - _TIE_TOLERANCE else
                          "loss" if ours[s] > theirs[s] + _TIE_TOLERANCE else "tie"} for s in seeds]
    if not rows:
        return []
    note = (f"`{reference}` against each method at the grid points above, on the seeds both finished: wins–ties–losses "
            "of LQF (a win: fewer test errors on that seed; a tie: the same number), then test error (%) per seed, "
            "LQF first.")
    header = [*(_COLUMN_NAMES.get(k, k) for k in row_fields(datasets[0])), "method", "W–T–L",
              "per seed (LQF vs method)"]
    table = Table("paired", f"Paired per seed: {reference} vs each method", header, rows, csv_rows)
    return [Section("Paired comparison per seed", [note], [table])]


ABLATION_PAIRED_NOTE = (
    "Each row changes one component away from the paper's value with the other two fixed, on the seeds both finished: "
    "wins–ties–losses of the paper's value (a win: fewer wrong test images on that seed), the mean increase in test "
    "error (points) the change causes (positive: the paper's value helps), and the errors per seed, paper's value "
    "first. The removal table above compares against full LQF only; a component can help there and hurt elsewhere.")
ABLATION_PAIRED_HEADER = ["data set", "change", "held fixed", "W–T–L", "Δ err (pt)", "per seed"]


def ablation_paired_rows(picks: dict[tuple, Pick], datasets: Sequence, combos: Sequence[tuple],
                         components: Sequence[str], paper: Sequence[str]) -> tuple[list[list[str]], list[dict]]:
    """Markdown and CSV rows: every one-component change of the factorial, in every context of the other two,
    paired per seed (``picks`` maps (data set, combination) to its cells)."""
    rows, csv_rows = [], []
    for d in datasets:
        for i, component in enumerate(components):
            for combo in (c for c in combos if c[i] == paper[i]):
                for alternative in (c for c in combos if c[i] != paper[i] and _only_differs(c, combo, i)):
                    ours, theirs = _per_seed(picks[d, combo]), _per_seed(picks[d, alternative])
                    wins, ties, losses, seeds = paired_counts(ours, theirs)
                    if not seeds:
                        continue
                    diff = sum(theirs[s] - ours[s] for s in seeds) / len(seeds)
                    diff = 0.0 if abs(diff) < _TIE_TOLERANCE else diff  # equal counts: no "-0.00"
                    context = ", ".join(f"{components[j]}={v}" for j, v in enumerate(combo) if j != i)
                    per_seed = ", ".join(f"s{s}: {ours[s]:.2f} vs {theirs[s]:.2f}" for s in seeds)
                    rows.append([d, f"{component}: {paper[i]} → {alternative[i]}", context, f"{wins}–{ties}–{losses}",
                                 f"{diff:+.2f}", per_seed])
                    csv_rows += [{"data": d, "component": component, "paper_value": paper[i],
                                  "alternative": alternative[i], "held_fixed": context, "seed": s,
                                  "paper_test_err": ours[s], "alternative_test_err": theirs[s]} for s in seeds]
    return rows, csv_rows


def _only_differs(a: tuple, b: tuple, index: int) -> bool:
    return all(x == y for j, (x, y) in enumerate(zip(a, b, strict=True)) if j != index)
