"""The report header says which code, which command and which kind of machine made it, and no report file holds an
absolute path (committed reports travel)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import types
from pathlib import Path

import pytest
import yaml

from lqf_exp.report import provenance, write_report
from lqf_exp.report.__main__ import main
from tests.test_report import write_cell

REPO_ROOT = Path(__file__).resolve().parent.parent
# Any absolute POSIX path of two or more components (written independently of provenance._ABSOLUTE).
ABSOLUTE = re.compile(r"(?:^|[\s'\"`(=,:\[])/[\w.+-]+/")


def sweep_with_paths(tmp_path: Path) -> Path:
    """A sweep whose files mention absolute paths: Hydra's sweep dir, a failed cell's error, a weights file."""
    sweep = tmp_path / "table1"
    for seed in (0, 1):
        write_cell(sweep, f"lqf-s{seed}", 5.0 + seed, seed=seed, weights=str(tmp_path / "models" / "source.pt"))
        write_cell(sweep, f"nlft-s{seed}", 6.0, seed=seed, recipe="nlft", method="finetune")
    write_cell(sweep, "probe-s0", error=f"FileNotFoundError: {sweep}/probe-s0/checkpoints/last.ckpt and "
               "/usr/lib/python3/site-packages/torch/serialization.py", recipe="probe", method="probe")  # fmt: skip
    for cell in sweep.glob("*-s*/metrics.json"):
        payload = json.loads(cell.read_text())
        cell.write_text(json.dumps({**payload, "device": "cpu"}))
    multirun = {"hydra": {"job": {"name": "run"}, "overrides": {
        "hydra": [f"hydra.sweep.dir={sweep}", "hydra.mode=MULTIRUN"],
        "task": ["+sweep=table1_solved", "seed=0,1", "hydra.sweep.subdir=${data.name}"]}}}  # fmt: skip
    (sweep / "multirun.yaml").write_text(yaml.safe_dump(multirun))
    return sweep


def header(report: Path) -> dict[str, str]:
    """The header bullets before the first table, as {field: text}."""
    lines = report.read_text().split("\n## ", 1)[0].splitlines()
    bullets = [line[2:].split(":", 1) for line in lines if line.startswith("- ") and ":" in line]
    return {field: text.strip() for field, text in bullets}


def assert_no_absolute_path(out: Path, *forbidden: Path) -> None:
    files = sorted(out.glob("*.md")) + sorted(out.glob("*.csv"))
    assert any(f.suffix == ".csv" for f in files)
    for path in files:
        text = path.read_text()
        for base in forbidden:
            assert str(base) not in text, path.name
        assert not ABSOLUTE.search(text), (path.name, ABSOLUTE.search(text))


def test_header_records_commit_command_and_machine(tmp_path: Path) -> None:
    sweep = sweep_with_paths(tmp_path)
    fields = header(write_report(sweep, tmp_path / "out"))
    commit = subprocess.run(["git", "log", "-1", "--format=%H", "--", ".", ":!docs/results"], cwd=REPO_ROOT,
                            capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    assert fields["Code"].startswith(f"commit `{commit}`") and len(commit) == 40
    command = fields["Sweep command (from Hydra's multirun.yaml"]
    assert command.endswith("`python run.py -m +sweep=table1_solved seed=0,1 'hydra.sweep.subdir=${data.name}' "
                            "hydra.sweep.dir=table1`")  # fmt: skip
    assert fields["Report command"] == "`python -m lqf_exp.report table1 --out out`"
    cuda = "no GPU" if not __import__("torch").cuda.is_available() else "×"
    kernels = __import__("torch").backends.cpu.get_cpu_capability()
    assert fields["Machine"].startswith(f"{os.cpu_count()}-core CPU ({kernels} kernels), ")
    assert cuda in fields["Machine"]
    assert fields["Machine"].endswith("the cells ran on: cpu (4).")
    assert_no_absolute_path(tmp_path / "out", tmp_path, REPO_ROOT)


def test_paths_are_made_relative_not_dropped(tmp_path: Path) -> None:
    sweep = sweep_with_paths(tmp_path)
    text = write_report(sweep, tmp_path / "out").read_text()
    assert "FileNotFoundError: probe-s0/checkpoints/last.ckpt and …/serialization.py" in text
    # Shortened in the table after the paths were made relative, not before (which could cut a path in two).
    assert "FAILED (FileNotFoundError: probe-s0/checkpoints/last." in text
    cells = (tmp_path / "out" / "cells.csv").read_text()
    assert "…/source.pt" in cells and "probe-s0/checkpoints/last.ckpt" in cells


def test_commands_given_on_the_command_line_replace_multirun_yaml(tmp_path: Path, capsys) -> None:
    sweep = sweep_with_paths(tmp_path)
    out = tmp_path / "report"
    given = ["python run.py -m +sweep=table1 seed=0,1", "python run.py -m +sweep=table1_solved seed=0,1"]
    assert main([str(sweep), "--out", str(out), "--kind", "table1", "--command", given[0], "--command", given[1]]) == 0
    text = (out / "report.md").read_text()
    assert "- Sweep commands (given to the report):\n" + "\n".join(f"  - `{c}`" for c in given) in text
    assert "table1_solved seed=0,1 'hydra" not in text
    assert header(out / "report.md")["Report command"] == "`python -m lqf_exp.report table1 --out report --kind table1`"
    assert_no_absolute_path(out, tmp_path, REPO_ROOT)
    capsys.readouterr()


def test_header_counts_the_cells_of_each_code_version(tmp_path: Path) -> None:
    """Cells made by different code cannot pass for one another: the header counts them per commit."""
    sweep = tmp_path / "sweep"
    versions = [{"commit": "a" * 40, "uncommitted_files": 0}] * 3 + [{"commit": "b" * 40, "uncommitted_files": 2}]
    for i, version in enumerate([*versions, None]):
        cell = write_cell(sweep, f"c{i}", 5.0, seed=i)
        payload = json.loads((cell / "metrics.json").read_text())
        (cell / "metrics.json").write_text(json.dumps({**payload, **({"code": version} if version else {})}))
    write_cell(sweep, "failed", error="ValueError: boom", seed=9)
    fields = header(write_report(sweep))
    assert fields["Cells made by code"] == (f"`{'a' * 10}` (3), not recorded (2), `{'b' * 10}` with uncommitted "
                                            "changes to 2 tracked file(s) (1).")


def test_unknown_outside_a_checkout_and_without_multirun(tmp_path: Path) -> None:
    assert provenance.code_commit(tmp_path) == "unknown"
    sweep = tmp_path / "sweep"
    write_cell(sweep, "a", 5.0)
    fields = header(write_report(sweep))
    assert fields["Sweep command"].startswith("unknown (no multirun.yaml")
    assert fields["Machine"].endswith("(where this report was written).")  # no cell recorded its device


def test_machine_kind_names_the_gpu_not_the_host(monkeypatch) -> None:
    import torch

    fake = types.SimpleNamespace(is_available=lambda: True, device_count=lambda: 2, get_device_name=lambda _i: "H100")
    monkeypatch.setattr(torch, "cuda", fake)
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert provenance.machine_kind() == "16-core CPU (AVX2 kernels), 2× H100"


@pytest.mark.parametrize("text", ["1/2 of a/b/c", "https://example.org/a/b", "— / —", "outputs/repro/table1"])
def test_strip_paths_leaves_relative_paths_ratios_and_urls(text: str, tmp_path: Path) -> None:
    assert provenance.strip_paths(text, tmp_path / "sweep") == text


def test_a_relative_path_through_a_link_is_shown_as_given(tmp_path: Path, monkeypatch) -> None:
    """A checkout whose outputs/repro links to another checkout's: the report names `outputs/repro/table1`, not
    `table1` (the resolved path leaves the working directory)."""
    elsewhere = tmp_path / "other" / "repro" / "table1"
    elsewhere.mkdir(parents=True)
    checkout = tmp_path / "checkout"
    (checkout / "outputs").mkdir(parents=True)
    (checkout / "outputs" / "repro").symlink_to(tmp_path / "other" / "repro")
    monkeypatch.chdir(checkout)
    assert provenance.shown_path(Path("outputs/repro/table1")) == "outputs/repro/table1"
    assert provenance.shown_path(checkout / "outputs" / "repro" / "table1") == "table1"  # absolute: resolved, named
    assert provenance.shown_path(Path("../other/repro/table1")) == "table1"


def test_a_run_command_comes_from_hydra_overrides_without_absolute_paths(tmp_path: Path) -> None:
    run_dir = tmp_path / "runs" / "one"
    (run_dir / ".hydra").mkdir(parents=True)
    assert provenance.run_command(run_dir) is None  # no overrides.yaml: a composed run, nothing to claim
    overrides = ["task=online", f"data.drop={run_dir / 'drop.txt'}", "data.name=a b", "data.root=/srv/data/fmnist"]
    (run_dir / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    assert provenance.run_command(run_dir) == ("python run.py task=online data.drop=drop.txt 'data.name=a b' "
                                               "data.root=…/fmnist")


def test_a_result_header_names_code_commands_and_machine(monkeypatch) -> None:
    monkeypatch.setattr(provenance, "code_commit", lambda: "`abc123`")
    monkeypatch.setattr(provenance, "machine_kind", lambda: "2-core CPU, no GPU")
    assert provenance.result_header(["python run.py a=1", "python -m x run"]) == [
        "- Code: commit `abc123` (`git log -1 -- . ':!docs/results'` of the package's checkout when this report was "
        "written).",
        "- Commands:", "  - `python run.py a=1`", "  - `python -m x run`",
        "- Machine: 2-core CPU, no GPU (where this was written)."]
