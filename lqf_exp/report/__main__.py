"""``python -m lqf_exp.report <sweep dir>``: write the report and print its path and Markdown."""

from __future__ import annotations

import argparse
import sys

from lqf_exp.report.report import KINDS, write_report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lqf_exp.report", description=__doc__)
    parser.add_argument("sweep_dir", help="a sweep directory: one sub-directory (at any depth) per cell")
    parser.add_argument("--out", default=None, help="where to write the report (default: <sweep_dir>/report)")
    parser.add_argument("--kind", default="auto", choices=("auto", *KINDS), help="which tables (default: auto)")
    parser.add_argument("--command", action="append", default=[], metavar="CMD",
                        help="the command that ran the sweep, recorded in the report header (repeatable; default: "
                        "what Hydra's multirun.yaml under the sweep directory kept)")
    args = parser.parse_args(argv)
    try:
        path = write_report(args.sweep_dir, args.out, args.kind, args.command)
    except FileNotFoundError as error:
        parser.error(str(error))
    print(path)
    print()
    print(path.read_text(), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
