"""Where a benchmark's record came from: the commit of the code that produced it."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

__all__ = ["commit"]


def commit() -> dict:
    """The repository's commit: the ``FUSEDBUN_COMMIT`` environment variable when set (for a copy of the tree
    whose ``.git``, if any, is not the tree's own), else git's."""
    root = Path(__file__).resolve().parents[1]

    def git(*args):
        try:
            out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)
            return out.stdout.strip() if out.returncode == 0 else None
        except (OSError, subprocess.SubprocessError):
            return None

    sha = git("rev-parse", "HEAD")
    env = os.environ.get("FUSEDBUN_COMMIT")
    if env:
        return dict(commit=env, source="FUSEDBUN_COMMIT", uncommitted=None)
    if sha:
        dirty = (git("status", "--porcelain", "--", "fusedbun", "benchmarks") or "").splitlines()
        return dict(commit=sha, source="git", uncommitted=[d for d in dirty if not d.endswith(".jsonl")])
    return dict(commit=None, source=None, uncommitted=None)
