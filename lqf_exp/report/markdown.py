"""Tables as Markdown and CSV, and the sections of ``report.md`` that hold them."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Table:
    """One table: a formatted Markdown view and a tidy CSV (numbers unformatted) written as ``<name>.csv``."""

    name: str
    caption: str
    header: list[str]
    rows: list[list[str]]
    csv_rows: list[dict[str, Any]] | None  # None: a Markdown-only view of data another CSV holds

    def markdown(self) -> str:
        source = f" (`{self.name}.csv`)" if self.csv_rows is not None else ""
        lines = [f"**{self.caption}**{source}", "", md_row(self.header)]
        lines.append("|" + "|".join("---" for _ in self.header) + "|")
        lines += [md_row(row) for row in self.rows]
        return "\n".join(lines)

    def write_csv(self, out_dir: Path) -> Path | None:
        return None if self.csv_rows is None else write_csv(out_dir / f"{self.name}.csv", self.csv_rows)


@dataclass
class Section:
    """A heading of the report: explanatory notes, tables and plots."""

    title: str
    notes: list[str] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    plots: list[str] = field(default_factory=list)  # PNG file names, relative to the report

    def markdown(self) -> str:
        parts = [f"## {self.title}"]
        parts += self.notes
        parts += [table.markdown() for table in self.tables]
        parts += [f"![{Path(plot).stem}]({plot})" for plot in self.plots]
        return "\n\n".join(parts)


def md_cell(value: Any) -> str:
    # A pipe or a newline (error messages hold both) would break the Markdown table.
    return str(value).replace("|", "\\|").replace("\n", " ")


def md_row(values: Sequence[Any]) -> str:
    return "| " + " | ".join(md_cell(v) for v in values) + " |"


def csv_value(value: Any) -> Any:
    return "" if value is None else value


def write_csv(path: Path, rows: list[dict[str, Any]]) -> Path:
    """Rows as CSV; the header is the union of the rows' keys in first-seen order."""
    header: list[str] = []
    for row in rows:
        header += [key for key in row if key not in header]
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=header or ["empty"])
        writer.writeheader()
        for row in rows:
            writer.writerow({key: csv_value(value) for key, value in row.items()})
    return path


def fmt_num(value: Any) -> str:
    """Hyper-parameters as people write them: 0.01, 1e-04, 64."""
    if value is None:
        return "—"
    if isinstance(value, float) and value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e4):
        return f"{value:.0e}"
    return f"{value:g}" if isinstance(value, float) else str(value)
