"""A user's mistake on the real command line ends with one line on stderr and a non-zero status; the traceback
appears only under HYDRA_FULL_ERROR=1."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import REPO_ROOT

pytestmark = pytest.mark.slow


def run_cli(args: list[str], tmp_path: Path, full_error: bool = False) -> subprocess.CompletedProcess[str]:
    env = {key: value for key, value in os.environ.items() if key != "HYDRA_FULL_ERROR"}
    env.update({"WANDB_MODE": "disabled", **({"HYDRA_FULL_ERROR": "1"} if full_error else {})})
    return subprocess.run([sys.executable, "run.py", *args, f"hydra.run.dir={tmp_path / 'run'}"], cwd=REPO_ROOT,
                          env=env, capture_output=True, text=True, timeout=300)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("Error: ")]


def test_a_bad_config_value_is_one_line(tmp_path: Path) -> None:
    result = run_cli(["method.bn_affine=bogus"], tmp_path)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert error_lines(result.stderr) == [
        "Error: invalid config value method.bn_affine='bogus': expected one of freeze, linearize "
        "(HYDRA_FULL_ERROR=1 shows the traceback)"
    ]


def test_a_missing_weights_file_is_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pt"
    result = run_cli(["debug=smoke", f"model.weights={missing}"], tmp_path)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    (line,) = error_lines(result.stderr)
    assert str(missing) in line


def test_the_traceback_is_there_under_hydra_full_error(tmp_path: Path) -> None:
    result = run_cli(["method.bn_affine=bogus"], tmp_path, full_error=True)
    assert result.returncode != 0
    assert "Traceback" in result.stderr and "ConfigError" in result.stderr
    assert "invalid config value method.bn_affine='bogus'" in result.stderr
