"""cgroupkill.kill_dirs against a real fork chain, by each of its three ways:
cgroup.kill (v2, or the cgroup2 beside v1), the v1 freezer, and pids.max=0
with SIGKILL rounds (a v1 host without a freezer).  Each is chosen by which
of the guest's directories are handed in, so all three run on this host.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from svirt.launcher import cgroupfs, cgroupkill, cgroups
from svirt.testing import require_root

#: each process forks, then exits at once: a pid list is stale before it is read
CHAIN = ("import os, time\n"
         "os.setsid()\n"
         "while True:\n"
         "    try:\n"
         "        if os.fork():\n"
         "            os._exit(0)\n"
         "    except OSError:\n"
         "        time.sleep(0.001)\n")


@pytest.fixture
def guest_cgroup() -> Iterator[cgroups.GuestCgroup]:
    require_root()
    layout = cgroupfs.detect()
    if layout is None:
        pytest.skip("no cgroup hierarchy with memory and pids (cgroupfs.detect)")
    tag = os.urandom(4).hex()
    cg = cgroups.create("killtest", 0, 64, "uml", tag=tag)
    yield cg
    with contextlib.suppress(Exception):
        cgroupkill.kill_dirs(cg.paths)
    with contextlib.suppress(Exception):
        cg.remove()


def _chain_in(cg: cgroups.GuestCgroup) -> None:
    enter = cg.enter_in_child()
    subprocess.Popen([sys.executable, "-I", "-c", CHAIN], preexec_fn=enter)  # noqa: S603, PLW1509
    deadline = time.monotonic() + 5
    seen: set[int] = set()
    while len(seen) < 20 and time.monotonic() < deadline:  # it is running and forking
        seen |= cg.tasks()
        time.sleep(0.005)
    assert len(seen) >= 20, f"the chain did not run: {seen}"


def _ways(cg: cgroups.GuestCgroup) -> dict[str, list[Path]]:
    all_dirs = cg.paths
    kill = [p for p in all_dirs if (p / "cgroup.kill").exists()]
    freezer = [p for p in all_dirs if (p / "freezer.state").exists()]
    plain = [p for p in all_dirs if p not in kill and p not in freezer]
    ways = {"pids.max=0": plain}
    if freezer:
        ways["freezer"] = plain + freezer
    if kill:
        ways["cgroup.kill"] = all_dirs
    return ways


@pytest.mark.parametrize("way", ["cgroup.kill", "freezer", "pids.max=0"])
def test_kill_dirs_empties_a_fork_chain(way: str, guest_cgroup: cgroups.GuestCgroup) -> None:
    dirs = _ways(guest_cgroup).get(way)
    if dirs is None:
        pytest.skip(f"this host gives a guest no directory for {way} (cgroupfs.detect)")
    _chain_in(guest_cgroup)
    started = time.monotonic()
    killed = cgroupkill.kill_dirs(dirs)
    took = time.monotonic() - started
    assert not guest_cgroup.tasks(), guest_cgroup.tasks()
    assert killed >= 1
    print(f"{way}: {killed} signalled, empty after {took * 1000:.1f} ms")
    assert took < 5


def test_kill_dirs_refuses_what_is_not_a_svirt_cgroup(tmp_path: Path) -> None:
    require_root()
    from svirt.errors import StateError

    with pytest.raises(StateError):
        cgroupkill.kill_dirs([tmp_path])
    with pytest.raises(StateError):
        cgroupkill.kill_dirs([Path("/sys/fs/cgroup/pids")])
