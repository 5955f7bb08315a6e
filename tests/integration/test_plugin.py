"""The pytest plugin as a user meets it: the README's example test file, run
by a separate pytest with two xdist workers against one registry."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from svirt.launcher.registry import Registry
from svirt.pytest_plugin import worker_name

pytestmark = pytest.mark.integration

README = Path(__file__).resolve().parents[2] / "README.rst"
EXAMPLE_INTRO = "(CI runs it with ``pytest -n 2``)::"
BASE = Path("/var/lib/svirt/images/example-base.img")


def readme_example() -> str:
    """The indented literal block after EXAMPLE_INTRO, dedented."""
    text = README.read_text()
    block = text.split(EXAMPLE_INTRO, 1)[1].split("\n")[1:]
    lines = []
    for line in block:
        if line and not line.startswith("    "):
            break
        lines.append(line[4:])
    return "\n".join(lines).strip() + "\n"


def test_worker_names(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)
    assert worker_name("web") == "web"
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw3")
    assert worker_name("web") == "web-gw3"
    assert worker_name("web-gw3") == "web-gw3"
    assert len(worker_name("x" * 64)) == 64 and worker_name("x" * 64).endswith("-gw3")


def test_the_readme_example_passes_under_xdist(tmp_path: Path) -> None:
    """As a user runs it: the host's registry (/run/svirt, /var/lib/svirt), its
    default image root, no svirt.testing plugin."""
    example = readme_example()
    assert "svirt_guest" in example and "def test_" in example
    (tmp_path / "test_guests.py").write_text(example)
    BASE.unlink(missing_ok=True)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("PYTEST_") and k not in ("SVIRT_RUN_DIR", "SVIRT_STATE_DIR")}
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "-n", "2", "-p", "no:cacheprovider", "-q",
             "test_guests.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
            timeout=300, check=False)
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
        assert re.search(r"\b4 passed\b", proc.stdout), proc.stdout[-2000:]
        # four guests wrote to "their" disk, two at a time: the base never changed
        expected = b"base image\n".ljust(1 << 20, b"\0")
        assert hashlib.sha256(BASE.read_bytes()).digest() == hashlib.sha256(expected).digest()
        left = [r.name for r in Registry().records() if r.name.startswith("example")]
        assert left == [], f"not released: {left}"
    finally:
        BASE.unlink(missing_ok=True)
