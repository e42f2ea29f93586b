"""The low-shot table (Fig. 4) and the robustness to hyper-parameters (Fig. 1, right)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lqf_exp.report.collect import Cell
from lqf_exp.report.markdown import Section, Table, fmt_num
from lqf_exp.report.paired import paired_section
from lqf_exp.report.plots import box_plot, lowshot_plot
from lqf_exp.report.stats import (
    HP_KEYS,
    Pick,
    distinct,
    make_labeler,
    median,
    nlft_label,
    pct,
    rel_increase,
    sort_labels,
)
from lqf_exp.report.tables import SELECTION_NOTE, rel_text


def shots_text(shots: Any) -> str:
    return "full" if shots is None else str(shots)


def lowshot_section(cells: Sequence[Cell], out_dir: Path) -> list[Section]:
    """Test error per data set × shots × method, and each method's relative error increase over NLFT per shots."""
    cells = [c for c in cells if c.get("data") is not None]
    label = make_labeler(cells, ignore=("data", "seed", "shots", *HP_KEYS))
    datasets, shots, labels = distinct(cells, "data"), distinct(cells, "shots"), sort_labels(label(c) for c in cells)
    picks = {
        (d, s, m): Pick([c for c in cells if c.get("data") == d and c.get("shots") == s and label(c) == m])
        for d, s, m in itertools.product(datasets, shots, labels)
    }
    rows = [[d, shots_text(s), *(picks[d, s, m].text() for m in labels)] for d, s in itertools.product(datasets, shots)]
    csv_rows = [
        {"data": d, "shots": s, "method": m, **picks[d, s, m].csv_fields()}
        for d, s, m in itertools.product(datasets, shots, labels)
    ]
    header = ["data set", "shots", *labels]
    table = Table("lowshot", "Low-shot: test error (%) vs shots per class", header, rows, csv_rows)

    series = {d: {m: [] for m in labels} for d in datasets}
    full: dict[str, dict[str, float]] = {d: {} for d in datasets}
    for (d, s, m), pick in picks.items():
        if pick.best.n and s is None:
            full[d][m] = pick.best.mean
        elif pick.best.n:
            series[d][m].append((float(s), pick.best.mean, pick.best.std))
    plot = lowshot_plot(out_dir / "lowshot.png", series, full)
    notes = [SELECTION_NOTE, "`full`: the whole training set (shots = null); drawn dashed in the plot."]
    sections = [Section("Low-shot (Fig. 4)", notes, [table], [plot.name])]
    # The k-shot subset is drawn from the seed, so two methods on one seed saw the same images: a fair pair.
    rows_keys = list(itertools.product(datasets, shots))
    sections += paired_section({((d, s), m): pick for (d, s, m), pick in picks.items()}, rows_keys, labels,
                               row_fields=lambda key: {"data": key[0], "shots": shots_text(key[1])})

    nlft = nlft_label(labels)
    if nlft is None:
        return sections
    rel_rows, rel_csv, boxes = [], [], {}
    for m, s in itertools.product([m for m in labels if m != nlft], shots):
        rel = {d: rel_increase(picks[d, s, m].best.mean, picks[d, s, nlft].best.mean) for d in datasets}
        med = median(rel.values())
        count = sum(v is not None for v in rel.values())
        texts = [rel_text(rel[d], picks[d, s, m], picks[d, s, nlft]) for d in datasets]
        rel_rows.append([m, shots_text(s), *texts, f"{pct(med)} (n={count})"])
        rel_csv += [
            {
                "method": m,
                "shots": s,
                "data": d,
                "reference": nlft,
                "test_err": picks[d, s, m].best.mean,
                "reference_test_err": picks[d, s, nlft].best.mean,
                "rel_increase_pct": rel[d],
            }
            for d in datasets
        ]
        rel_csv.append({"method": m, "shots": s, "data": "median", "reference": nlft, "rel_increase_pct": med})
        boxes[f"{m} {shots_text(s)}-shot" if s is not None else f"{m} full"] = list(rel.values())
    rel_table = Table(
        "lowshot_relative",
        f"Low-shot: relative error increase over {nlft} (%)",
        ["method", "shots", *datasets, "median"],
        rel_rows,
        rel_csv,
    )
    rel_plot = box_plot(
        out_dir / "lowshot_relative.png",
        boxes,
        f"Low-shot: relative error increase over {nlft}",
        f"(err − err_{nlft}) / err_{nlft}  (%)",
    )
    note = f"(err − err_{nlft})/err_{nlft} in % per data set and shots; negative: better than `{nlft}`."
    sections.append(Section("Low-shot: relative error increase over NLFT", [note], [rel_table], [rel_plot.name]))
    return sections


def effective_lr(hp: dict[str, Any]) -> float | None:
    """ELR = lr / ((1 − momentum)·batch_size), the paper's §4.7 (momentum 0 where the optimizer has none)."""
    lr, batch_size, momentum = hp.get("lr"), hp.get("batch_size"), hp.get("momentum") or 0.0
    if lr is None or not batch_size or momentum >= 1:
        return None
    return lr / ((1.0 - momentum) * batch_size)


def robustness_section(cells: Sequence[Cell], out_dir: Path) -> list[Section]:
    """The ELR of the best grid point per data set and method, and the full lr × batch_size grid (cells without a
    learning rate, e.g. the spread study's LQF, are not part of it)."""
    cells = [c for c in cells if c.get("data") is not None and c.get("lr") is not None]
    label = make_labeler(cells, ignore=("data", "seed", *HP_KEYS))
    datasets, labels = distinct(cells, "data"), sort_labels(label(c) for c in cells)
    picks = {(d, m): Pick([c for c in cells if c.get("data") == d and label(c) == m]) for d in datasets for m in labels}
    elr = {key: effective_lr(pick.hp) for key, pick in picks.items()}

    def best_text(key: tuple) -> str:
        pick = picks[key]
        if elr[key] is None:
            return pick.text().split(" (")[0] if pick.best_key is None else "n/a"
        return f"{elr[key]:.2e} (lr={fmt_num(pick.hp['lr'])}, bs={pick.hp['batch_size']})"

    rows = [[d, *(best_text((d, m)) for m in labels)] for d in datasets]
    per_method = {m: [elr[d, m] for d in datasets if elr[d, m] is not None] for m in labels}
    rows.append(["**median**", *(f"{median(per_method[m]):.2e}" if per_method[m] else "n/a" for m in labels)])
    spread = {m: max(v) / min(v) if v else None for m, v in per_method.items()}
    rows.append(["**max / min**", *(f"{spread[m]:.1f}×" if spread[m] else "n/a" for m in labels)])
    csv_rows = [{"data": d, "method": m, "elr": elr[d, m]} | picks[d, m].csv_fields() for d in datasets for m in labels]
    best_table = Table(
        "robustness_best_elr",
        "Effective learning rate of the best cell (by validation accuracy)",
        ["data set", *labels],
        rows,
        csv_rows,
    )

    lrs, sizes = distinct(cells, "lr"), distinct(cells, "batch_size")
    grid_rows, grid_csv = [], []
    for d, m, lr in itertools.product(datasets, labels, lrs):
        row = [d, m, fmt_num(lr)]
        for bs in sizes:
            # Any other grid factor (weight decay, momentum) is again chosen by validation accuracy.
            pick = Pick(
                [
                    c
                    for c in cells
                    if c.get("data") == d and label(c) == m and c.get("lr") == lr and c.get("batch_size") == bs
                ],
                grid=("weight_decay", "momentum"),
            )
            is_best = picks[d, m].hp.get("lr") == lr and picks[d, m].hp.get("batch_size") == bs
            row.append(f"**{pick.text()}**" if is_best else pick.text())
            point_elr = effective_lr({"lr": lr, "batch_size": bs, "momentum": pick.hp.get("momentum")})
            grid_csv.append(
                {
                    "data": d,
                    "method": m,
                    "lr": lr,
                    "batch_size": bs,
                    "elr": point_elr,
                    "best": is_best,
                    **pick.csv_fields(),
                }
            )
        grid_rows.append(row)
    grid_table = Table(
        "robustness_grid",
        "Test error (%) over the lr × batch_size grid (bold: best by validation)",
        ["data set", "method", "lr", *(f"bs={bs}" for bs in sizes)],
        grid_rows,
        grid_csv,
    )
    plot = box_plot(
        out_dir / "robustness_elr.png",
        per_method,
        "Best effective learning rate per data set",
        "ELR = lr / ((1 − m)·batch size)",
        log=True,
        zero_line=False,
    )
    notes = [
        SELECTION_NOTE,
        "ELR = lr / ((1 − momentum)·batch_size) of the grid point with the best mean validation accuracy over seeds, "
        "per data set and method; `max / min`: how far apart the best ELRs of the data sets lie (the paper finds a "
        "narrow band for LQF and orders of magnitude for NLFT).",
    ]
    return [Section("Robustness to hyper-parameters (Fig. 1, right)", notes, [best_table, grid_table], [plot.name])]
