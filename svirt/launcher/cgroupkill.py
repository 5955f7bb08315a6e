"""Killing what is left of a guest, by its cgroup: a fork chain cannot
outrun it, and a pid reused elsewhere on the host is never signalled.

Root finds a guest's processes by what root controls (the cgroup the kernel
reports, pidfds), never by what the process carries.  :func:`kill_dirs` is
what the registry's release, fencing and ``svirt gc`` kill with; it uses the
v1 ``freezer`` directory and, on a hybrid host, the cgroup2 directory beside
the v1 ones (``cgroup.kill``) that :mod:`svirt.launcher.cgroups` gives every
guest when they are mounted.  :func:`frozen` holds a cgroup still while it
is read.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from svirt.errors import StateError
from svirt.launcher.cgroupfs import detect, leaf_of, ours, read_value, tasks_of, write_value

#: kill_dirs: how long it keeps killing until the cgroup is empty (a frozen or
#: cgroup.kill'ed guest empties in milliseconds; this bounds a stuck one)
KILL_TIMEOUT = 10.0
#: kill_dirs: how long one v1 freeze may take before it kills anyway (a task
#: in an uninterruptible sleep holds FREEZING); pids.max=0 still stops forks
FREEZE_TIMEOUT = 1.0


def kill_dirs(paths: Iterable[Path | str], timeout: float = KILL_TIMEOUT) -> int:
    """SIGKILL every process in a guest's cgroup directories until they are
    empty; how many processes were signalled (cgroup.kill counts as what was
    in it).  A fork chain cannot outrun it:

    - a v2 directory with ``cgroup.kill`` (v2 hosts, and the cgroup2 beside
      v1 on a hybrid one): the kernel kills the whole cgroup, and a child
      forked meanwhile is killed as it is born;
    - v1 with a freezer directory: freeze, SIGKILL every task, thaw, until
      empty (a frozen task cannot fork; the kill takes effect on thaw);
    - v1 without: ``pids.max`` = 0 first (every fork fails), then SIGKILL
      every task until empty.

    Raises StateError when a directory is not a svirt cgroup of this host, or
    when tasks are left after ``timeout``."""
    layout = detect()
    todo = sorted({Path(p) for p in paths})
    for path in todo:
        if not ours(path, layout):
            raise StateError(f"{path} is not a svirt cgroup of this host")
    todo = [p for p in todo if p.is_dir()]
    if not todo or not tasks_of(todo):
        return 0
    killer = next((p for p in todo if (p / "cgroup.kill").exists()), None)
    freezer = next((p for p in todo if (p / "freezer.state").exists()), None)
    pids = next((p for p in todo if (p / "pids.max").exists()), None)
    signalled: set[int] = set()
    if pids is not None and killer is None:
        try:
            write_value(pids / "pids.max", "0")  # no fork succeeds from now on
        except OSError:
            pass
    deadline = time.monotonic() + timeout
    while True:
        left = tasks_of(todo)
        if not left:
            return len(signalled)
        if time.monotonic() >= deadline:
            raise StateError(f"cgroup {todo[0].name} still has processes {sorted(left)[:8]} "
                             f"after {timeout:g} s of killing",
                             hint="a task in uninterruptible sleep (D state)? svirt gc retries")
        if killer is not None:
            signalled |= left
            try:
                write_value(killer / "cgroup.kill", "1")
            except OSError:
                killer = None  # fall back to signals
                continue
            _wait_empty(todo, min(0.5, max(0.0, deadline - time.monotonic())))
            continue
        frozen = freezer is not None and _freeze(freezer, "FROZEN")
        try:
            for pid in tasks_of(todo):
                if kill_member(pid, todo[0].name):
                    signalled.add(pid)
        finally:
            if frozen and freezer is not None:
                _freeze(freezer, "THAWED")
        _wait_empty(todo, 0.05)


@contextmanager
def frozen(paths: Iterable[Path | str]) -> Iterator[None]:
    """Hold a svirt cgroup frozen while the caller reads it (a fork chain
    changes pid faster than /proc can be read): v2's ``cgroup.freeze``
    (also the cgroup2 beside v1), else the v1 freezer; neither: not frozen.
    Thawed on the way out, whatever happened."""
    layout = detect()
    todo = [Path(p) for p in paths if ours(Path(p), layout) and Path(p).is_dir()]
    v2 = next((p for p in todo if (p / "cgroup.freeze").exists()), None)
    v1 = next((p for p in todo if (p / "freezer.state").exists()), None)
    done = False
    if v2 is not None:
        try:
            write_value(v2 / "cgroup.freeze", "1")
            done = True
            deadline = time.monotonic() + FREEZE_TIMEOUT
            while "frozen 1" not in read_value(v2 / "cgroup.events").splitlines():
                if time.monotonic() >= deadline:
                    break
                time.sleep(0.002)
        except OSError:
            pass
    elif v1 is not None:
        done = _freeze(v1, "FROZEN")
    try:
        yield
    finally:
        if done and v2 is not None:
            with suppress(OSError):
                write_value(v2 / "cgroup.freeze", "0")
        elif done and v1 is not None:
            _freeze(v1, "THAWED")


def kill_checked(pid: int, check: Callable[[int], bool]) -> bool:
    """SIGKILL ``pid`` through a pidfd, if ``check(pid)`` holds once the pidfd
    pins it: a pid that ended and was reused by a process elsewhere on the
    host is never signalled."""
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        return False  # gone
    try:
        if not check(pid):
            return False
        signal.pidfd_send_signal(fd, signal.SIGKILL)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def kill_member(pid: int, leaf: str) -> bool:
    """SIGKILL ``pid`` if it is (still) in the svirt cgroup ``leaf``."""
    return kill_checked(pid, lambda p: leaf_of(p) == leaf)


def _freeze(freezer: Path, state: str) -> bool:
    """Write a v1 freezer state and wait (briefly) until the cgroup is in it."""
    try:
        write_value(freezer / "freezer.state", state)
    except OSError:
        return False
    deadline = time.monotonic() + FREEZE_TIMEOUT
    while True:
        try:
            if read_value(freezer / "freezer.state") == state:
                return True
        except OSError:
            return False
        if time.monotonic() >= deadline:
            return state == "FROZEN"  # partly frozen: kill what is there anyway
        time.sleep(0.002)


def _wait_empty(paths: list[Path], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while tasks_of(paths) and time.monotonic() < deadline:
        time.sleep(0.005)

