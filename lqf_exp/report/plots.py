"""The report's figures, in the style of the paper's Fig. 1, 2 and 4; one PNG each."""

from __future__ import annotations

import math
from pathlib import Path

# Figure + the Agg canvas directly, instead of pyplot: no global backend switch and no GUI in a headless job.
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

DPI = 120


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    return path


def _no_data(ax, text: str = "no finished cells") -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="gray")


def box_plot(
    path: Path,
    groups: dict[str, list[float]],
    title: str,
    ylabel: str,
    *,
    log: bool = False,
    zero_line: bool = True,
) -> Path:
    """A box per group with every value drawn on top (few data sets make a box alone misleading)."""
    groups = {name: [v for v in values if v is not None and math.isfinite(v)] for name, values in groups.items()}
    groups = {name: values for name, values in groups.items() if values}
    fig = Figure(figsize=(max(4.0, 1.4 * len(groups) + 1.5), 4.0))
    ax = fig.add_subplot()
    if groups:
        names = list(groups)
        ax.boxplot([groups[n] for n in names], showfliers=False, widths=0.5)
        for i, name in enumerate(names, start=1):
            values = groups[name]
            # Spread the points a little so that equal values stay visible.
            xs = [i + 0.12 * ((j % 5) - 2) / 2 for j in range(len(values))]
            ax.scatter(xs, values, s=18, alpha=0.7, zorder=3)
        ax.set_xticks(range(1, len(names) + 1), names, rotation=20 if len(names) > 3 else 0)
        if log and all(v > 0 for values in groups.values() for v in values):
            ax.set_yscale("log")
            low = min(min(v) for v in groups.values())
            high = max(max(v) for v in groups.values())
            # At least a decade of axis, so that a narrow band looks narrow (the point of Fig. 1 right).
            pad = max(1.5, (10 * low / high) ** 0.5)
            ax.set_ylim(low / pad, high * pad)
        elif zero_line:
            ax.axhline(0.0, color="gray", lw=0.8, ls="--")
    else:
        _no_data(ax)
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def lowshot_plot(
    path: Path,
    series: dict[str, dict[str, list[tuple[float, float, float]]]],
    full: dict[str, dict[str, float]],
) -> Path:
    """Test error vs shots (log x), one panel per data set, one line per method; dashed: full data."""
    datasets = sorted(set(series) | set(full))
    cols = min(3, max(1, len(datasets)))
    rows = max(1, math.ceil(len(datasets) / cols))
    fig = Figure(figsize=(4.5 * cols, 3.6 * rows))
    axes = [fig.add_subplot(rows, cols, i + 1) for i in range(max(1, len(datasets)))]
    for ax, data in zip(axes, datasets or ["(none)"], strict=False):
        plotted = False
        for i, (method, points) in enumerate(sorted(series.get(data, {}).items())):
            color = f"C{i}"
            if points:
                xs, ys, errs = zip(*sorted(points), strict=True)
                ax.errorbar(xs, ys, yerr=errs, marker="o", capsize=3, label=method, color=color)
                plotted = True
            if method in full.get(data, {}):
                ax.axhline(full[data][method], color=color, ls="--", lw=1, label=f"{method} (full data)")
                plotted = True
        if plotted:
            ax.set_xscale("log")
            shots = sorted({x for points in series.get(data, {}).values() for x, _, _ in points})
            if shots:
                # The shots themselves as ticks: a log axis alone labels 2×10^0, 3×10^0, ...
                ax.minorticks_off()
                ax.set_xticks(shots, [f"{x:g}" for x in shots])
            ax.legend(fontsize=8)
        else:
            _no_data(ax)
        ax.set_title(f"Low-shot: {data}")
        ax.set_xlabel("shots per class (log scale)")
        ax.set_ylabel("test error (%)")
        ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    return _save(fig, path)


def curve_plot(path: Path, curves: dict[str, list[tuple[float, float, float]]], title: str, xlabel: str,
               ylabel: str) -> Path:
    """One line per curve through its ``(x, y, y error)`` points (error bars where the error is not 0)."""
    fig = Figure(figsize=(5.0, 3.6))
    ax = fig.add_subplot(1, 1, 1)
    for label, points in curves.items():
        if points:
            xs, ys, errs = zip(*sorted(points), strict=True)
            ax.errorbar(xs, ys, yerr=errs if any(errs) else None, marker="o", capsize=3, label=label)
    if not any(curves.values()):
        _no_data(ax)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)
