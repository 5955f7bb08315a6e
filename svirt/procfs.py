"""What /proc says about processes: read by root, never trusted further.

The ground floor's one job is to read the kernel's process table: the boot
id, a process's ``stat`` fields and start time (a pid plus its start time
is one process, never a reused pid: :class:`ProcessId`), its uids, the live
table as a set of uids and SELinux contexts (:class:`LiveProcesses`, which
the security drivers check a slot against), and the one way svirt kills a
process it named (through a pidfd, after checking it is still that
process).  Nothing here imports svirt above :mod:`svirt.errors`; nothing
here reads what a process carries about itself (environment, argv, comm).
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass

from svirt.errors import StateError

_BOOT_ID: list[str] = []  # read once: a process does not outlive its boot


def boot_id() -> str:
    if not _BOOT_ID:
        try:
            with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
                _BOOT_ID.append(f.read().strip())
        except OSError:  # pragma: no cover - every Linux has it
            return ""
    return _BOOT_ID[0]


def read_bytes(path: str) -> bytes:
    """The whole file, through a bare fd (no file object: a registry of
    thousands of records is read on every reserve)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        data = os.read(fd, 65536)
        # a short read of a regular file (or of /proc/PID/stat) is its end
        while len(data) % 65536 == 0 and data:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            data += chunk
        return data
    finally:
        os.close(fd)


def stat_fields(pid: int | str) -> list[bytes] | None:
    """/proc/PID/stat after the command name: state, ppid, pgrp, session, ...
    (None when the process is gone)."""
    try:
        data = read_bytes(f"/proc/{pid}/stat")
    except OSError:
        return None
    return data[data.rindex(b")") + 2 :].split()


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (None if gone)."""
    fields = stat_fields(pid)
    return int(fields[19]) if fields else None


def is_zombie(pid: int | str) -> bool:
    """True for an exited process nobody reaped yet (it holds nothing but its pid)."""
    fields = stat_fields(pid)
    return fields is None or fields[0] in (b"Z", b"X")


@dataclass(frozen=True)
class ProcessId:
    pid: int
    start: int

    def alive(self) -> bool:
        """The same process (pid and start time), and not a zombie: a dead
        supervisor whose parent (PID 1, after setsid -f) has not reaped it yet
        is dead to svirt."""
        fields = stat_fields(self.pid)
        return fields is not None and int(fields[19]) == self.start and fields[0] != b"Z"

    @classmethod
    def of(cls, pid: int) -> ProcessId:
        st = start_time(pid)
        if st is None:
            raise StateError(f"process {pid} is gone")
        return cls(pid, st)


def kill_process(proc: ProcessId) -> None:
    """SIGKILL ``proc`` (if it is still that process) and wait briefly for it."""
    try:
        fd = os.pidfd_open(proc.pid)
    except OSError:
        return
    try:
        if proc.alive():
            signal.pidfd_send_signal(fd, signal.SIGKILL)
            for _ in range(100):
                if not proc.alive():
                    break
                time.sleep(0.01)
    finally:
        os.close(fd)


def pid_exists(pid: int) -> bool:
    """Some process (maybe a zombie) has ``pid`` now (signal 0 reaches it)."""
    try:
        os.kill(pid, 0)
        return True
    except OSError:
        return False


def owner_uid(pid: int) -> int | None:
    """The owner of /proc/PID (its effective uid; root for a non-dumpable
    process), None when it is gone."""
    try:
        return os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return None


def uids_of(pid: int) -> tuple[int, ...]:
    """The real, effective, saved and file-system uids of ``pid`` (empty when
    gone), from /proc/PID/status."""
    try:
        data = read_bytes(f"/proc/{pid}/status")
    except OSError:
        return ()
    for line in data.splitlines():
        if line.startswith(b"Uid:"):
            return tuple(int(x) for x in line.split()[1:5])
    return ()


def has_uid(pid: int, uid: int) -> bool:
    """``pid`` has ``uid`` as its real, effective, saved or file-system uid."""
    return uid in uids_of(pid)


def processes_by_uid(wanted: Callable[[int], bool]) -> list[tuple[int, int]]:
    """(pid, uid) of live processes (zombies are not) whose real, effective or
    saved uid is wanted (the first of them that is).
    psutil here (gc, release, orphans: off the launch path, whose own process
    checks read /proc/PID/stat through a bare fd: importing psutil costs
    ~11 ms, measured)."""
    import psutil

    out = []
    for proc in psutil.process_iter(["uids", "status"]):
        try:
            ids = proc.info["uids"]
            # any of its uids: a process with another real uid and the guest's
            # effective and saved one (a set-uid file of the guest's, run by
            # another user) may become the guest's uid whenever it likes
            uid = next((u for u in (ids.real, ids.effective, ids.saved) if wanted(u)), None)
        except (AttributeError, TypeError):
            continue  # gone while it was read
        if uid is not None and proc.info["status"] not in (psutil.STATUS_ZOMBIE,
                                                           psutil.STATUS_DEAD):
            out.append((proc.pid, uid))
    return out


class LiveProcesses:
    """A lazy snapshot of the live process table: uids and SELinux contexts."""

    def __init__(self) -> None:
        self._uids: set[int] | None = None
        self._contexts: set[str] | None = None

    def _scan(self) -> None:
        uids: set[int] = set()
        contexts: set[str] = set()
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                with open(f"/proc/{entry.name}/stat", "rb") as f:
                    stat = f.read()
                if stat[stat.rindex(b")") + 2 :][:1] in (b"Z", b"X"):
                    continue  # exited, not reaped: it runs as nobody any more
                uids.add(entry.stat().st_uid)
            except OSError:
                continue
            try:
                with open(f"/proc/{entry.name}/attr/current", "rb") as f:
                    ctx = f.read().rstrip(b"\0\n").decode(errors="replace")
                if ctx:
                    contexts.add(ctx)
            except OSError:
                pass
        self._uids, self._contexts = uids, contexts

    @property
    def uids(self) -> set[int]:
        if self._uids is None:
            self._scan()
        assert self._uids is not None  # noqa: S101 - set by _scan
        return self._uids

    @property
    def contexts(self) -> set[str]:
        if self._contexts is None:
            self._scan()
        assert self._contexts is not None  # noqa: S101 - set by _scan
        return self._contexts
