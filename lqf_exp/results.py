"""Run results on disk: atomic writes, ``metrics.json``, and the record of a failed run."""

from __future__ import annotations

import json
import os
import tempfile
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from lqf_exp.code_version import code_version

METRICS_FILE = "metrics.json"
ERROR_FILE = "error.json"
FINAL_CHECKPOINT = "final.ckpt"  # the weights at the end of fit of a method tested on them (LQF)
PREDICTIONS_FILE = "test_predictions.csv"  # index,label,prediction: one row per test sample, in test-set order


@contextmanager
def atomic_file(path: Path, mode: str = "w") -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path``; on success it replaces ``path`` whole, on error it is removed.

    A reader sees the old file or the complete new one, never a truncated file, even if the writer is killed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o644)  # mkstemp makes it private; results and checkpoints are meant to be read
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    with atomic_file(path, "w") as handle:
        handle.write(text)


def atomic_write_json(path: Path, payload: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")


FINAL_STATUSES = ("finished", "diverged")


def read_metrics(output_dir: Path) -> dict[str, Any] | None:
    """The record of a run in ``output_dir`` that ended — finished, or diverged (a result too) — else None."""
    path = output_dir / METRICS_FILE
    try:
        payload = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return payload if payload.get("status") in FINAL_STATUSES else None


def write_error(output_dir: Path, error: BaseException, factors: dict[str, Any]) -> None:
    """Record why a run failed, next to its config, so a sweep report can mark the cell."""
    atomic_write_json(
        output_dir / ERROR_FILE,
        {
            "status": "failed",
            "error": f"{type(error).__name__}: {error}",
            "traceback": "".join(traceback.format_exception(error)),
            "factors": factors,
            "code": code_version(),
        },
    )


def write_test_predictions(output_dir: Path, labels: list[int], predictions: list[int]) -> None:
    """``test_predictions.csv`` of a run: the test set's labels and the run's predicted classes, in order."""
    if len(labels) != len(predictions):
        raise ValueError(f"{len(labels)} test labels but {len(predictions)} predictions")
    rows = "".join(f"{i},{y},{p}\n" for i, (y, p) in enumerate(zip(labels, predictions, strict=True)))
    atomic_write_text(output_dir / PREDICTIONS_FILE, "index,label,prediction\n" + rows)


def read_test_predictions(output_dir: Path) -> list[int] | None:
    """The predicted classes of a run's ``test_predictions.csv`` in test-set order, or None if it has none."""
    path = output_dir / PREDICTIONS_FILE
    if not path.is_file():
        return None
    lines = path.read_text().splitlines()
    if not lines or lines[0] != "index,label,prediction":
        raise ValueError(f"{path}: expected the header 'index,label,prediction', got {lines[:1]}")
    return [int(line.rsplit(",", 1)[1]) for line in lines[1:]]


def changed_predictions(first: list[int], second: list[int]) -> int:
    """How many test samples two runs on the same test set predict differently."""
    if len(first) != len(second):
        raise ValueError(f"prediction lists of different test sets: {len(first)} and {len(second)} samples")
    return sum(a != b for a, b in zip(first, second, strict=True))
