"""Run results on disk: atomic writes, ``metrics.json``, and the record of a failed run."""

from __future__ import annotations

import json
import os
import tempfile
import traceback
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.json"
ERROR_FILE = "error.json"


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` so that a reader sees the old file or the whole new one, never a truncated file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, payload: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")


def read_metrics(output_dir: Path) -> dict[str, Any] | None:
    """The metrics of a finished run in ``output_dir``, or None if it has none (or an unreadable one)."""
    path = output_dir / METRICS_FILE
    try:
        payload = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return payload if payload.get("status") == "finished" else None


def write_error(output_dir: Path, error: BaseException, factors: dict[str, Any]) -> None:
    """Record why a run failed, next to its config, so a sweep report can mark the cell."""
    atomic_write_json(
        output_dir / ERROR_FILE,
        {
            "status": "failed",
            "error": f"{type(error).__name__}: {error}",
            "traceback": "".join(traceback.format_exception(error)),
            "factors": factors,
        },
    )
