"""Hostile-hypervisor tests: root, real uids, real processes, a stand-in UML.

After exec the hypervisor is the enemy: it runs as the guest's uid, owns its
home directory and everything it writes.  These tests run a stand-in UML
(standin.py) through the real launch path and let it attack the launcher.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from svirt.launcher.registry import Registry
from svirt.testing import require_root

from .helpers import UID_BASE, Canaries, install_standin, kill_uid, make_registry


@pytest.fixture(autouse=True)
def _needs_root() -> None:
    require_root()


@pytest.fixture
def dirs(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Path, Path]]:
    """A private run directory and a private state directory, apart (so one can
    be wiped while the other survives), exported for the CLI and subprocesses."""
    run_root = Path(tempfile.mkdtemp(prefix="svirt-hrun-", dir="/run"))
    run_root.chmod(0o755)
    state_dir = Path(tempfile.mkdtemp(prefix="svirt-hstate-", dir="/var/tmp"))
    monkeypatch.setenv("SVIRT_RUN_DIR", str(run_root))
    monkeypatch.setenv("SVIRT_STATE_DIR", str(state_dir))
    # a uid range of our own: other suites running at the same time get
    # 1500000+slot, and "nothing of the guest's uid survives" must mean ours
    monkeypatch.setenv("SVIRT_UID_BASE", str(UID_BASE))
    yield run_root, state_dir
    shutil.rmtree(run_root, ignore_errors=True)
    shutil.rmtree(state_dir, ignore_errors=True)


@pytest.fixture
def hostile_registry(dirs: tuple[Path, Path]) -> Registry:
    return make_registry(*dirs)


@pytest.fixture
def standin(image_dir: Path) -> Path:
    return install_standin(image_dir)


@pytest.fixture
def canaries(dirs: tuple[Path, Path], hostile_registry: Registry) -> Iterator[Canaries]:
    hostile_registry.reconcile()  # the registry's directories exist: part of the baseline
    base = Path(tempfile.mkdtemp(prefix="svirt-canary-", dir="/var/tmp"))
    c = Canaries(base, list(dirs))
    c.write_targets(extra_files=[dirs[0] / "lock", dirs[1] / "lock"],
                    extra_dirs=[dirs[0], dirs[1], dirs[1] / "guests"])
    yield c
    c.close()
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def guest_uids() -> Iterator[set[int]]:
    """Uids the test's guests ran as: whatever the product left running of
    them is killed afterwards (and the test has already failed for it)."""
    uids: set[int] = set()
    yield uids
    for uid in uids:
        kill_uid(uid)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/hostile" in str(item.fspath):
            item.add_marker(pytest.mark.integration)
