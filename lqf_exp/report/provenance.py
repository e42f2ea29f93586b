"""Where a report comes from: the commit of the code, the sweep's command, the machine kind; and no absolute paths.

A committed report is read on other machines and against later code: it must say which code made it and how, and
must not leak the directory layout (or user name) of the machine that wrote it.
"""

from __future__ import annotations

import os
import re
import shlex
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import yaml

from lqf_exp.code_version import PACKAGE_ROOT, code_version, describe

# An absolute POSIX path of two or more components, not part of a relative path, a URL or a number ratio.
_ABSOLUTE = re.compile(r"(?<![\w.~:/\-])/(?:[^\s/'\"`,;:()\[\]{}<>|*]+/)+[^\s/'\"`,;:()\[\]{}<>|*]*")


def code_commit(root: Path = PACKAGE_ROOT) -> str:
    """The commit of the code (``git log -1 -- . ':!docs/results'``), noting uncommitted changes to tracked code;
    "unknown" when the package does not sit at the top of a git checkout (e.g. installed into site-packages)."""
    return describe(code_version(root))


def machine_kind() -> str:
    """E.g. "2-core CPU (AVX512 kernels), no GPU": the kind of machine, never its name. The CPU kernels PyTorch picked
    at run time are part of it: fine-tuning at a large lr turns their different rounding into points of test error
    (docs/results/README.md, "Reruns")."""
    cpus = f"{os.cpu_count() or '?'}-core CPU"
    try:
        import torch
    except ImportError:
        return f"{cpus}, GPU unknown (no torch)"
    cpus += f" ({torch.backends.cpu.get_cpu_capability()} kernels)"
    if not torch.cuda.is_available():
        return f"{cpus}, no GPU"
    count = torch.cuda.device_count()
    return f"{cpus}, {count}× {torch.cuda.get_device_name(0)}"


def code_line() -> str:
    """The header bullet that names the code (the commit of the checkout writing the report)."""
    return (f"- Code: commit {code_commit()} (`git log -1 -- . ':!docs/results'` of the package's checkout when this "
            "report was written).")


def machine_line(written: str, devices: Sequence[str | None] = ()) -> str:
    """The header bullet naming the kind of machine that wrote ``written`` ("this report") and, given the devices of
    a sweep's cells, how many cells ran on each."""
    ran_on = sorted({d for d in devices if d})
    counts = ", ".join(f"{d} ({sum(x == d for x in devices)})" for d in ran_on)
    ran = f"; the cells ran on: {counts}." if counts else "."
    return f"- Machine: {machine_kind()} (where {written} was written){ran}"


def run_command(run_dir: Path) -> str | None:
    """``python run.py <overrides>`` of a run Hydra started (its ``.hydra/overrides.yaml``), with the paths made
    relative (:func:`strip_paths`); None for a run without that file (e.g. composed by a test)."""
    try:
        overrides = yaml.safe_load((run_dir / ".hydra" / "overrides.yaml").read_text()) or []
    except (OSError, yaml.YAMLError):
        return None
    return strip_paths(" ".join(["python run.py", *(shlex.quote(str(o)) for o in overrides)]), run_dir)


def result_header(commands: Sequence[str]) -> list[str]:
    """The header bullets of a result one command wrote from one run (not a sweep report): the code, the commands
    (the run's first where known, then the one that wrote the result) and the machine kind."""
    shown = [f"  - `{c}`" for c in commands]
    return [code_line(), "- Commands:", *shown, machine_line("this")]


def sweep_commands(sweep: Path) -> list[str]:
    """The multirun commands Hydra recorded under ``sweep`` (``multirun.yaml``: overrides and the script's name).

    Hydra rewrites multirun.yaml on each ``-m`` into the same directory, so only the last one per directory is there;
    scripts that run several should pass them all to the report (``--command``).
    """
    commands = []
    for path in sorted(sweep.rglob("multirun.yaml")):
        try:
            hydra = (yaml.safe_load(path.read_text()) or {}).get("hydra") or {}
        except (OSError, yaml.YAMLError, AttributeError):
            continue
        overrides = hydra.get("overrides") or {}
        task = [str(o) for o in overrides.get("task") or []]
        own = [str(o) for o in overrides.get("hydra") or [] if not str(o).startswith("hydra.mode=")]
        script = f"{(hydra.get('job') or {}).get('name') or 'run'}.py"
        commands.append(" ".join(["python", script, "-m", *(shlex.quote(o) for o in (*task, *own))]))
    return commands


def relative_to(path: Path, base: Path) -> str | None:
    try:
        return path.resolve().relative_to(base.resolve()).as_posix()
    except ValueError:
        return None


def shown_path(path: Path) -> str:
    """``path`` relative to the working directory when it lies below it, else its name: reports travel. A relative
    path that stays below the working directory is shown as given, even through a symbolic link (a checkout whose
    ``outputs/repro`` links to another's: resolving it would leave the working directory and keep only the name)."""
    if not path.is_absolute() and ".." not in path.parts:
        return path.as_posix()
    return relative_to(path, Path.cwd()) or path.name


def strip_paths(text: str, sweep: Path, root: Path = PACKAGE_ROOT) -> str:
    """``text`` with paths below the sweep made relative to it, paths below the checkout relative to that, and any
    other absolute path cut to ``…/<name>``."""
    for base, bare in ((sweep.resolve(), sweep.name), (root.resolve(), ".")):
        text = text.replace(f"{base}/", "")
        # The directory itself, not a longer name that starts like it (/tmp/sweep2 is not /tmp/sweep).
        text = re.sub(re.escape(str(base)) + r"(?![\w.\-])", lambda _m, shown=bare: shown, text)
    return _ABSOLUTE.sub(lambda m: "…/" + (m.group(0).rstrip("/").rsplit("/", 1)[-1]), text)


def strip_row_paths(rows: Iterable[dict[str, Any]], sweep: Path) -> list[dict[str, Any]]:
    """CSV rows with :func:`strip_paths` applied to every string value."""
    return [{k: strip_paths(v, sweep) if isinstance(v, str) else v for k, v in row.items()} for row in rows]


def cells_code_line(versions: Sequence[dict[str, Any] | None]) -> str:
    """How many cells each version of the code made (``metrics.json``'s ``code``), most first; cells written before
    runs recorded it, or outside a checkout, count as "not recorded"."""
    names = [describe(v, short=True) if v else "not recorded" for v in versions]
    counts = sorted({n: names.count(n) for n in names}.items(), key=lambda item: (-item[1], item[0]))
    return "- Cells made by code: " + ", ".join(f"{n} ({c})" for n, c in counts) + "."


def provenance_lines(sweep: Path, report_command: str, commands: Sequence[str] = (),
                     devices: Sequence[str | None] = (),
                     versions: Sequence[dict[str, Any] | None] | None = None) -> list[str]:  # fmt: skip
    """The Markdown bullets of the report header that say where it comes from (``versions``: the code version of
    each cell, when the report has cells)."""
    given = list(commands)
    found = given or sweep_commands(sweep)
    source = ("given to the report" if given else "from Hydra's multirun.yaml: the last multirun into each directory")
    if not found:
        lines = ["- Sweep command: unknown (no multirun.yaml under the sweep directory; scripts pass `--command`)."]
    elif len(found) == 1:
        lines = [f"- Sweep command ({source}): `{found[0]}`"]
    else:
        lines = [f"- Sweep commands ({source}):", *(f"  - `{c}`" for c in found)]
    return [
        code_line(),
        *([cells_code_line(versions)] if versions else []),
        *lines,
        f"- Report command: `{report_command}`",
        machine_line("this report", devices),
    ]
