"""Which code made a result: the git commit of the checkout the package was imported from.

Every run records it in ``metrics.json`` (``code``) and every report header counts its cells by it, so results made
by different versions of the code cannot pass for one another. A package installed outside a git checkout records
none.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

# The checkout this package was imported from (lqf_exp/code_version.py → the repository root).
PACKAGE_ROOT = Path(__file__).resolve().parents[1]
# The commit that last touched the code, not the committed results a reproduction rewrites.
GIT_LOG = ("git", "log", "-1", "--format=%H", "--", ".", ":!docs/results")


def _git(root: Path, *args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def code_version(root: Path = PACKAGE_ROOT) -> dict[str, Any] | None:
    """``{"commit": <sha>, "uncommitted_files": <n>}``: the last commit of the code (``git log -1 -- .
    ':!docs/results'``) and how many tracked code files differ from it; None outside a git checkout of the package
    (e.g. installed into site-packages)."""
    top = _git(root, "rev-parse", "--show-toplevel")
    if top is None or Path(top).resolve() != root.resolve():
        return None
    commit = _git(root, *GIT_LOG[1:])
    if not commit:
        return None
    changed = _git(root, "status", "--porcelain", "--untracked-files=no", "--", ".", ":!docs/results")
    return {"commit": commit, "uncommitted_files": len(changed.splitlines()) if changed else 0}


def describe(version: dict[str, Any] | None, short: bool = False) -> str:
    """E.g. "`1a2b…`", "`1a2b…` with uncommitted changes to 2 tracked file(s)", or "unknown"."""
    if not version or not version.get("commit"):
        return "unknown"
    commit = str(version["commit"])[: 10 if short else None]
    dirty = int(version.get("uncommitted_files") or 0)
    return f"`{commit}`" + (f" with uncommitted changes to {dirty} tracked file(s)" if dirty else "")


__all__ = ["GIT_LOG", "PACKAGE_ROOT", "code_version", "describe"]
