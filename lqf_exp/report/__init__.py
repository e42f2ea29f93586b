"""Sweep reports in the style of the LQF paper: Table 1, Fig. 1, Fig. 2 and Fig. 4 from a sweep directory.

python -m lqf_exp.report <sweep dir> [--out DIR] [--kind auto|table1|ablation|lowshot|robustness]
"""

from lqf_exp.report.collect import Cell, load_cells
from lqf_exp.report.report import KINDS, detect_kinds, log_tables_to_wandb, write_report

__all__ = ["KINDS", "Cell", "detect_kinds", "load_cells", "log_tables_to_wandb", "write_report"]
