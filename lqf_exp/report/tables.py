"""Table 1 with the relative error increase over NLFT (Fig. 1 left), and the ablation (Fig. 2)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path

from lqf_exp.report.collect import Cell
from lqf_exp.report.markdown import Section, Table, fmt_num
from lqf_exp.report.paired import ABLATION_PAIRED_HEADER, ABLATION_PAIRED_NOTE, ablation_paired_rows, paired_section
from lqf_exp.report.plots import box_plot
from lqf_exp.report.stats import (
    HP_KEYS,
    Pick,
    base_label,
    distinct,
    make_labeler,
    median,
    nlft_label,
    pct,
    rel_increase,
    sort_labels,
)

SELECTION_NOTE = (
    "Each entry is the best point of the optimization grid (lr × weight_decay, and batch_size/momentum where they "
    "vary), chosen by **validation** accuracy (`val/acc_best`, else `val/acc`) averaged over seeds, never by test "
    "accuracy; a point on which any seed diverged ranks below every point on which none did, and equal accuracies "
    "(the same number of images right) go to the first point in sorted order (the smallest lr). It shows test error "
    "(%) = 100·(1 − test/acc) as mean ± sample std over the seeds of that point, n = number of finished seeds (± 0.00 "
    "with n=1: a single seed, no spread)."
)
COMPONENTS = ("activation", "loss", "precond")
COMPONENT_VALUES = {"activation": ("leaky_relu", "relu"), "loss": ("mse", "ce"), "precond": ("kfac", "none")}
FULL_LQF = ("leaky_relu", "mse", "kfac")
_REMOVED_NAMES = {"activation": "Leaky-ReLU → ReLU", "loss": "MSE → CE", "precond": "K-FAC → none"}


def removals(full: tuple) -> dict[str, tuple]:
    """Each component of ``full`` LQF swapped for the paper's alternative: the activation only where full LQF swaps
    ReLU for Leaky-ReLU (a ResNet); a ViT keeps its own GELU, so its ablation has no activation row."""
    activation, loss, precond = full
    out = {"MSE → CE": (activation, "ce", precond), "K-FAC → none": (activation, loss, "none")}
    if activation == "leaky_relu":
        out["Leaky-ReLU → ReLU"] = ("relu", loss, precond)
    return out



def rel_text(value: float | None, pick: Pick, ref: Pick) -> str:
    """A relative increase, or why there is none."""
    if value is not None:
        return pct(value)
    if ref.best.n == 0:
        return f"n/a (reference {ref.text().split(' (')[0]})" if ref.cells else "n/a (no reference)"
    if pick.best.n == 0:
        return f"n/a ({pick.text().split(' (')[0]})"
    return "n/a (reference error 0)"


def _bold_best(texts: list[str], picks: list[Pick]) -> list[str]:
    means = [p.best.mean for p in picks]
    known = [m for m in means if m is not None]
    if len(known) < 2:
        return texts
    lowest = min(known)
    return [f"**{t}**" if m == lowest else t for t, m in zip(texts, means, strict=True)]


def _hp_text(pick: Pick, varying: Sequence[str]) -> str:
    if pick.best_key is None:
        return pick.text().split(" (")[0]
    names = {"lr": "lr", "weight_decay": "wd", "batch_size": "bs", "momentum": "m", "target_scale": "α"}
    # A method without a factor (no lr for a solved method, no α for cross-entropy) shows none for it.
    shown = [f"{names.get(k, k)}={fmt_num(pick.hp[k])}" for k in varying if pick.hp[k] is not None]
    return ", ".join(shown) or "—"


def table1_section(cells: Sequence[Cell], out_dir: Path) -> list[Section]:
    """Table 1 (best test error per data set × method) and the relative error increase over NLFT."""
    cells = [c for c in cells if c.get("data") is not None]
    label = make_labeler(cells, ignore=("data", "seed", *HP_KEYS))
    datasets, labels = distinct(cells, "data"), sort_labels(label(c) for c in cells)
    picks = {(d, m): Pick([c for c in cells if c.get("data") == d and label(c) == m]) for d in datasets for m in labels}
    varying = [k for k in HP_KEYS if len(distinct(cells, k)) > 1] or ["lr", "weight_decay"]

    rows = [[d, *_bold_best([picks[d, m].text() for m in labels], [picks[d, m] for m in labels])] for d in datasets]
    csv_rows = [{"data": d, "method": m, **picks[d, m].csv_fields()} for d in datasets for m in labels]
    table = Table("table1", "Table 1: test error (%) per data set and method", ["data set", *labels], rows, csv_rows)
    hp_rows = [[d, *(_hp_text(picks[d, m], varying) for m in labels)] for d in datasets]
    hp_table = Table("table1", "Selected grid point (by validation accuracy)", ["data set", *labels], hp_rows, None)
    sections = [Section("Table 1: test error", [SELECTION_NOTE, "Bold: lowest error of the row."], [table, hp_table])]
    sections += paired_section(picks, datasets, labels)

    nlft = nlft_label(labels)
    if nlft is None:
        note = "No non-linear fine-tuning cell (recipe `nlft`, or method `finetune`): no relative error increase."
        sections.append(Section("Relative error increase over NLFT", [note]))
        return sections
    others = [m for m in labels if m != nlft]
    rel = {(d, m): rel_increase(picks[d, m].best.mean, picks[d, nlft].best.mean) for d in datasets for m in others}
    rows = [[d, *(rel_text(rel[d, m], picks[d, m], picks[d, nlft]) for m in others)] for d in datasets]
    medians = {m: median(rel[d, m] for d in datasets) for m in others}
    counts = {m: sum(rel[d, m] is not None for d in datasets) for m in others}
    rows.append(["**median**", *(f"{pct(medians[m])} (n={counts[m]})" for m in others)])
    csv_rows = [
        {
            "data": d,
            "method": m,
            "reference": nlft,
            "test_err": picks[d, m].best.mean,
            "reference_test_err": picks[d, nlft].best.mean,
            "rel_increase_pct": rel[d, m],
        }
        for d in datasets
        for m in others
    ]
    csv_rows += [{"data": "median", "method": m, "reference": nlft, "rel_increase_pct": medians[m]} for m in others]
    plot = box_plot(
        out_dir / "relative_error.png",
        {m: [rel[d, m] for d in datasets] for m in others},
        f"Relative test error increase over {nlft} (per data set)",
        f"(err − err_{nlft}) / err_{nlft}  (%)",
    )
    note = (
        f"(err − err_NLFT)/err_NLFT in %, with NLFT = `{nlft}`, from the Table 1 entries; median over data sets "
        "(n = data sets with both values). Negative: better than NLFT."
    )
    table = Table("relative_error", f"Relative error increase over {nlft} (%)", ["data set", *others], rows, csv_rows)
    sections.append(Section("Relative error increase over NLFT (Fig. 1, left)", [note], [table], [plot.name]))
    return sections


def _ablation_groups(cells: Sequence[Cell]) -> dict[str, list[Cell]]:
    """The methods whose cells vary activation/loss/precond (all methods if none does)."""
    by_base: dict[str, list[Cell]] = {}
    for cell in cells:
        by_base.setdefault(base_label(cell.factors), []).append(cell)
    varying = {b: cs for b, cs in by_base.items() if len({tuple(c.get(k) for k in COMPONENTS) for c in cs}) > 1}
    chosen = varying or by_base
    return {b: chosen[b] for b in sort_labels(chosen)}


def _removed(combo: tuple, full: tuple) -> str:
    pairs = zip(COMPONENTS, combo, full, strict=True)
    names = [_REMOVED_NAMES.get(k, f"{k}={v}") for k, v, full in pairs if v != full]
    return ", ".join(names) if names else "— (full LQF)"


def _ablation_picks(group: list[Cell], datasets: list, combos: list[tuple]) -> dict[tuple, Pick]:
    return {
        (d, combo): Pick([c for c in group if c.get("data") == d and tuple(c.get(k) for k in COMPONENTS) == combo])
        for d, combo in itertools.product(datasets, combos)
    }


def _ablation_rows(picks: dict[tuple, Pick], base: str, datasets: list, combos: list[tuple], full: tuple,
                   prefix: list[str]) -> tuple:
    """Markdown rows, CSV rows and plot values of one method's ablation against its ``full`` combination."""
    swaps = removals(full)
    rows = [[*prefix, *combo, _removed(combo, full), *(picks[d, combo].text() for d in datasets)] for combo in combos]
    csv_rows = [
        {"method": base, "data": d, **dict(zip(COMPONENTS, combo, strict=True)), "removed": _removed(combo, full)}
        | picks[d, combo].csv_fields()
        for combo in combos
        for d in datasets
    ]
    rel_rows, rel_csv = [], []
    rel = {
        (d, name): rel_increase(picks[d, combo].best.mean, picks[d, full].best.mean)
        for d in datasets
        for name, combo in swaps.items()
    }
    for d in datasets:
        reference = picks[d, full]
        texts = [rel_text(rel[d, name], picks[d, combo], reference) for name, combo in swaps.items()]
        rel_rows.append([*prefix, d, *texts])
        rel_csv += [
            {
                "method": base,
                "data": d,
                "removed": name,
                "full_test_err": reference.best.mean,
                "ablated_test_err": picks[d, combo].best.mean,
                "rel_increase_pct": rel[d, name],
            }
            for name, combo in swaps.items()
        ]
    boxes = {name: [rel[d, name] for d in datasets] for name in swaps}
    medians = {name: median(values) for name, values in boxes.items()}
    counts = {name: sum(v is not None for v in values) for name, values in boxes.items()}
    rel_rows.append([*prefix, "**median**", *(f"{pct(medians[n])} (n={counts[n]})" for n in swaps)])
    rel_csv += [{"method": base, "data": "median", "removed": n, "rel_increase_pct": medians[n]} for n in swaps]
    return rows, csv_rows, rel_rows, rel_csv, boxes


def ablation_section(cells: Sequence[Cell], out_dir: Path) -> list[Section]:
    """The activation × loss × precond table per data set, and each component's removal from full LQF."""
    cells = [c for c in cells if c.get("data") is not None]
    groups = _ablation_groups(cells)
    datasets = distinct(cells, "data")
    # Every combination of the paper's two values per component (and any other value seen), present or not; a
    # component none of whose paper values was run (a ViT's GELU) takes the values seen only.
    values = []
    for k in COMPONENTS:
        seen = [v for v in distinct(cells, k) if v is not None]
        paper = COMPONENT_VALUES[k] if set(seen) & set(COMPONENT_VALUES[k]) else ()
        values.append([*paper, *(v for v in seen if v not in paper)])
    combos = list(itertools.product(*values))
    full = (values[0][0], *FULL_LQF[1:])  # Leaky-ReLU where it was run, else the network's own activation
    swaps = removals(full)
    multi = len(groups) > 1
    rows, csv_rows, rel_rows, rel_csv, boxes = [], [], [], [], {}
    paired_rows, paired_csv = [], []
    for base, group in groups.items():
        picks = _ablation_picks(group, datasets, combos)
        parts = _ablation_rows(picks, base, datasets, combos, full, [base] if multi else [])
        paired = ablation_paired_rows(picks, datasets, combos, COMPONENTS, full)
        paired_rows += [[base, *row] if multi else row for row in paired[0]]
        paired_csv += [{"method": base, **row} for row in paired[1]]
        rows += parts[0]
        csv_rows += parts[1]
        rel_rows += parts[2]
        rel_csv += parts[3]
        boxes |= {f"{base}: {name}" if multi else name: v for name, v in parts[4].items()}
    method_col = ["method"] if multi else []
    header = [*method_col, *COMPONENTS, "removed vs full LQF", *datasets]
    table = Table("ablation", "Ablation: test error (%) per component combination", header, rows, csv_rows)
    caption = "Relative error increase of removing one component from full LQF (%)"
    rel_table = Table("ablation_relative", caption, [*method_col, "data set", *swaps], rel_rows, rel_csv)
    title = "Ablation: removing one component from full LQF"
    plot = box_plot(out_dir / "ablation.png", boxes, title, "relative test error increase (%)")
    notes = [
        SELECTION_NOTE,
        f"Full LQF = {' + '.join(full)}. Relative increase = (err_ablated − err_full)/err_full in %, per data "
        "set, and its median over data sets (n = data sets with both values). Positive: the component helps.",
    ]
    sections = [Section("Ablation (Fig. 2)", notes, [table, rel_table], [plot.name])]
    if paired_rows:
        header = [*method_col, *ABLATION_PAIRED_HEADER]
        caption = "Each change in every context, paired per seed"
        paired_table = Table("ablation_paired", caption, header, paired_rows, paired_csv)
        sections.append(Section("Ablation, paired per seed", [ABLATION_PAIRED_NOTE], [paired_table]))
    return sections
