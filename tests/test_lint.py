"""Lint as tests: ruff (E,W,F,I,UP,B,S) and mypy --strict over the project."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGETS = [t for t in ("svirt", "tests", "bench") if any((ROOT / t).rglob("*.py"))]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, check=False)


def test_ruff_clean() -> None:
    proc = _run("ruff", "check", *TARGETS)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_mypy_strict_clean() -> None:
    proc = _run("mypy", *TARGETS)
    assert proc.returncode == 0, proc.stdout + proc.stderr
