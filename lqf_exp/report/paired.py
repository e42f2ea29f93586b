"""LQF against each other method, seed by seed: a paired count of wins, ties and losses beside the means.

Means ± std over 3 seeds hide whether one method is ahead on every seed or on one lucky seed. Each method's grid point
is the one Table 1 picked by validation; the pair of a seed is LQF's and the other method's test error on that seed
(the same test set, so equal errors are the same number of wrong test images: a tie).
"""

from __future__ import annotations

from collections.abc import Sequence

from lqf_exp.report.markdown import Section, Table
from lqf_exp.report.stats import Pick, label_base

REFERENCE = "lqf"
# Errors in % from accuracies that are ratios of counts: equal counts give equal floats up to rounding.
_TIE_TOLERANCE = 1e-9


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


def paired_section(picks: dict[tuple, Pick], datasets: Sequence, labels: Sequence[str]) -> list[Section]:
    """One row per data set and method: LQF's wins–ties–losses and the per-seed errors behind them."""
    reference = next((m for m in labels if label_base(m) == REFERENCE), None)
    if reference is None:
        return []
    rows, csv_rows = [], []
    for d in datasets:
        ours = _per_seed(picks[d, reference])
        for m in (m for m in labels if m != reference):
            theirs = _per_seed(picks[d, m])
            wins, ties, losses, seeds = paired_counts(ours, theirs)
            if not seeds:
                continue
            per_seed = ", ".join(f"s{s}: {ours[s]:.2f} vs {theirs[s]:.2f}" for s in seeds)
            rows.append([d, m, f"{wins}–{ties}–{losses}", per_seed])
            csv_rows += [{"data": d, "method": m, "reference": reference, "seed": s, "reference_test_err": ours[s],
                          "test_err": theirs[s], "outcome": "win" if ours[s] < theirs[s] - _TIE_TOLERANCE else
                          "loss" if ours[s] > theirs[s] + _TIE_TOLERANCE else "tie"} for s in seeds]
    if not rows:
        return []
    note = (f"`{reference}` against each method at the grid points above, on the seeds both finished: wins–ties–losses "
            "of LQF (a win: fewer test errors on that seed; a tie: the same number), then test error (%) per seed, "
            "LQF first.")
    table = Table("paired", f"Paired per seed: {reference} vs each method", ["data set", "method", "W–T–L",
                                                                            "per seed (LQF vs method)"], rows, csv_rows)
    return [Section("Paired comparison per seed", [note], [table])]
