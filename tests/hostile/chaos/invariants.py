"""What must hold after every chaos step, whatever the guests did.

Each check returns a list of violations (strings with the evidence); an
empty list is a pass.  Names (``inv:NAME`` in catalogue.KNOWN_OPEN) let a
check whose fix is on another branch be left out of the default run.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import stat
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.hostile.chaos.world import World
from tests.hostile.helpers import Canaries

#: free space /run and the state disk must keep (bytes; or 5 % if smaller)
FREE_FLOOR = 1 << 30
LOCK_SECONDS = 15.0  # the registry lock is never held longer than this
#: what a supervisor may hold open (readlink of /proc/PID/fd/N), besides the
#: run's own paths (see check_supervisor_fds)
FD_KINDS = (re.compile(r"^socket:\[\d+\]$"), re.compile(r"^pipe:\[\d+\]$"),
            re.compile(r"^anon_inode:\[(pidfd|eventpoll|eventfd|signalfd|timerfd)\]$"),
            re.compile(r"^anon_inode:pidfd$"), re.compile(r"^/dev/(null|urandom)$"))
ESCAPE_BYTES = re.compile(rb"[\x1b\x9b\x9d\x90\x9c\x07]")


@dataclass
class Snapshot:
    """What the checks read once per step."""

    records: list[dict[str, Any]] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)
    tables: dict[str, dict[str, Any]] = field(default_factory=dict)


def read_registry(world: World) -> tuple[Snapshot, list[str]]:
    """Records and object tables, read under the registry's own lock (so the
    view is consistent); a lock held past LOCK_SECONDS is a violation."""
    snap = Snapshot()
    problems: list[str] = []
    lock = world.state / "lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600) if world.state.exists() \
        else -1
    try:
        if fd >= 0:
            deadline = time.monotonic() + LOCK_SECONDS
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        problems.append(f"registry: its lock was held for more than "
                                        f"{LOCK_SECONDS:g} s ({_lock_holders(lock)})")
                        break
                    time.sleep(0.02)
        for path in sorted((world.state / "guests").glob("*.json")):
            try:
                data = json.loads(path.read_bytes())
                from svirt.launcher.record import Record

                Record.from_json(data)
                snap.records.append(data)
            except FileNotFoundError:
                continue
            except Exception as err:  # noqa: BLE001 - evidence
                snap.unreadable.append(f"{path}: {type(err).__name__}: {err}")
        for path in sorted((world.state / "objects").glob("*.json")):
            try:
                snap.tables[str(path)] = json.loads(path.read_bytes())
            except FileNotFoundError:
                continue
            except Exception as err:  # noqa: BLE001 - evidence
                snap.unreadable.append(f"{path}: {type(err).__name__}: {err}")
    finally:
        if fd >= 0:
            os.close(fd)
    return snap, problems


def _lock_holders(lock: Path) -> str:
    try:
        ino = os.stat(lock).st_ino
        with open("/proc/locks", encoding="ascii") as f:
            pids = [line.split()[4] for line in f if f":{ino} " in line]
    except (OSError, IndexError):
        return "holder unknown"
    return "held by pid " + ", ".join(f"{p} ({_cmd(int(p))})" for p in pids if p.isdigit())


def _cmd(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")[:160].strip()
    except OSError:
        return "gone"


def record_uid(rec: dict[str, Any]) -> int | None:
    dac = (rec.get("labels") or {}).get("dac")
    if not isinstance(dac, dict):
        return None
    try:
        return int(str(dac.get("process", "")).split(":")[0])
    except ValueError:
        return None


def _alive(pid_start: Any) -> bool:
    from svirt.procfs import ProcessId

    if not isinstance(pid_start, dict):
        return False
    try:
        return ProcessId(int(pid_start["pid"]), int(pid_start["start"])).alive()
    except (KeyError, TypeError, ValueError):
        return False


# ------------------------------------------------------------------ checks
def check_registry(snap: Snapshot, after_gc: bool) -> list[str]:
    out = [f"registry: unreadable {u}" for u in snap.unreadable]
    names = {r["name"] for r in snap.records}
    for rec in snap.records:
        status = str(rec.get("status", ""))
        if status.startswith("restore-failed"):
            out.append(f"registry: guest {rec['name']} is {status[:300]}")
        if after_gc and not (_alive(rec.get("supervisor")) or _alive(rec.get("hypervisor"))):
            out.append(f"registry: after gc, a record for a dead guest: {rec['name']} "
                       f"(status {status[:120]})")
    if after_gc:
        for path, table in snap.tables.items():
            holders = table.get("holders") if isinstance(table, dict) else None
            if not isinstance(holders, dict):
                out.append(f"registry: object table {path} is not a table")
                continue
            for holder in holders:
                if holder not in names:
                    out.append(f"registry: object table {path} ({table.get('path')}) leaks "
                               f"holder {holder}, which has no record")
    return out


def live_uids(uid_range: range) -> dict[int, list[int]]:
    """uid -> pids of live (not zombie) processes in this run's uid range."""
    out: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            st = entry.stat()
            if st.st_uid not in uid_range:
                continue
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                data = f.read()
        except OSError:
            continue
        if data[data.rindex(b")") + 2:][:1] in (b"Z", b"X"):
            continue
        out.setdefault(st.st_uid, []).append(int(entry.name))
    return out


def check_processes(world: World, snap_records: Callable[[], Iterable[dict[str, Any]]],
                    foreground_uids: Callable[[], set[int]]) -> list[str]:
    """No process of a released guest lives.  A process whose uid no record
    holds is looked at again a second later (a launch racing the check
    records its uid before it execs; a release kills before it unrecords)."""
    def held() -> set[int]:
        return {u for r in snap_records() if (u := record_uid(r)) is not None} \
            | foreground_uids()

    first = {u: p for u, p in live_uids(world.uid_range).items() if u not in held()}
    if not first:
        return []
    time.sleep(1.0)
    still = {u: p for u, p in live_uids(world.uid_range).items() if u in first and u not in held()}
    return [f"processes: uid {uid} has no record but still runs: "
            + "; ".join(f"{pid} {_cmd(pid)}" for pid in pids[:5])
            for uid, pids in still.items()]


def check_canaries(canaries: Canaries) -> list[str]:
    return [f"canary: {c}" for c in canaries.changes(trees=False)]


def check_registry_files(world: World, snap: Snapshot, ctl_leftovers: bool = True,
                         after_gc: bool = False) -> list[str]:
    """The registry's files are root's and writable by root alone; below a
    live guest's run directory an entry may also be that guest's own (its
    home, layers), never another uid's; nothing anywhere is a released
    guest's.  (An explicit stack, and guest-owned directories are not
    entered: a guest's deep tree must not make the check recurse.)"""
    out: list[str] = []
    owner_of: dict[Path, int] = {}
    for rec in snap.records:
        uid = record_uid(rec)
        if uid is not None:
            owner_of[world.run_root / "guests" / f"{rec['name']}.d"] = uid
    stack: list[tuple[Path, int | None]] = [(world.state, None), (world.run_root, None)]
    while stack and len(out) < 20:
        top, allowed = stack.pop()
        try:
            entries = list(os.scandir(top))
        except OSError:
            continue
        for entry in entries:
            p = Path(entry.path)
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            own = owner_of.get(p, allowed)
            if p.parent == world.run_root / "ctl" and p.name.startswith("mc."):
                # a launcher's mconsole reply socket, the guest's for one
                # exchange: a live launcher's is fine; a dead one's is a
                # leftover gc must have swept (inv:ctl_leftovers)
                if _launcher_alive(p.name) or not (ctl_leftovers and after_gc):
                    continue
                out.append(f"registry files: {p} (uid {st.st_uid}) is the mconsole reply "
                           "socket of a launcher that is gone, left after gc")
                continue
            if st.st_uid != 0:
                if st.st_uid != own:
                    out.append(f"registry files: {p} is owned by uid {st.st_uid}"
                               + ("" if own is None else f" (its guest is {own})"))
                continue  # the guest's own: not entered
            if (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)) and \
                    st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
                out.append(f"registry files: {p} is writable by others "
                           f"({stat.filemode(st.st_mode)})")
            if stat.S_ISDIR(st.st_mode):
                stack.append((p, own))
    return out


def _launcher_alive(name: str) -> bool:
    """``mc.PID.START.HEX``: process PID runs and started at START (clock
    ticks since boot, /proc/PID/stat field 22)."""
    parts = name.split(".")
    if len(parts) != 4 or not parts[1].isdigit():
        return False
    try:
        data = Path(f"/proc/{parts[1]}/stat").read_bytes()
    except OSError:
        return False
    return data[data.rindex(b")") + 2:].split()[19] == parts[2].encode()


def check_free_space(world: World) -> list[str]:
    out = []
    for path in (world.run_root, world.state):
        try:
            vfs = os.statvfs(path)
        except OSError:
            continue
        free = vfs.f_bavail * vfs.f_frsize
        floor = min(FREE_FLOOR, vfs.f_blocks * vfs.f_frsize // 20)
        if free < floor:
            out.append(f"free space: {path} has {free >> 20} MiB free (floor {floor >> 20} MiB)")
        if vfs.f_files and vfs.f_favail < min(10_000, vfs.f_files // 20):
            out.append(f"free space: {path} has {vfs.f_favail} inodes free")
    return out


def check_storage_bounded(world: World, snap: Snapshot) -> list[str]:
    """A guest's writable storage (its home, its layers: owned by its uid) is
    not on /run's or the state's filesystem (a mount of its own, with caps)."""
    shared = {os.stat(world.run_root).st_dev, os.stat(world.state).st_dev}
    out = []
    for rec in snap.records:
        d = world.run_root / "guests" / f"{rec['name']}.d"
        uid = record_uid(rec)
        places = [d / "home", d / "layers"]
        with contextlib.suppress(OSError):
            places += [Path(e.path) for e in os.scandir(d / "layers")]
        for place in places:
            with contextlib.suppress(OSError):
                st = os.stat(place)
                if st.st_uid == uid and st.st_dev in shared:  # the guest's, on /run's fs
                    out.append(f"storage: {place} (guest {rec['name']}) is on the shared "
                               "filesystem of /run or the state directory, unbounded")
    return out


def supervisor_pids(world: World) -> list[int]:
    pids = []
    needle = f"svirt.service.daemon\0{world.run_root}\0".encode()
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                    if needle in f.read():
                        pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def check_supervisor_fds(world: World) -> list[str]:
    """Every fd of the supervisor is of a kind it opens on purpose; none is a
    file below a guest's home, none a deleted file; their number is bounded."""
    def unexpected(pid: int) -> dict[str, str]:
        bad = {}
        try:
            names = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            return {}
        if len(names) > 256:
            bad["count"] = f"{len(names)} fds"
        for n in names:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{n}")
            except OSError:
                continue
            if any(k.match(target) for k in FD_KINDS):
                continue
            p = Path(target)
            if _o_path(pid, n) and (p.is_relative_to(world.base)
                                    or p.is_relative_to(world.run_root / "guests")):
                continue  # the jail's bind sources: the guest's objects, O_PATH
            if target.endswith(" (deleted)") or "/home/" in target or "/home" == target[-5:]:
                bad[n] = target
                continue
            ok = (p.is_relative_to(world.state) or
                  (p.is_relative_to(world.run_root / "guests")
                   and p.name in ("console.in", "console.out", "qmp.sock"))
                  or p.is_relative_to(world.run_root / "ctl") or p == world.run_root / "svirtd.sock"
                  or target.startswith(("/sys/fs/cgroup/", "/proc/")) or "host-cache" in target
                  or target.startswith(str(Path(os.__file__).parent)) or target.endswith(".pyc"))
            if not ok:
                bad[n] = target
        return bad

    out = []
    for pid in supervisor_pids(world):
        bad = unexpected(pid)
        if bad:
            time.sleep(0.3)  # something opened for a moment: look again
            again = unexpected(pid)
            bad = {k: v for k, v in bad.items() if again.get(k) == v}
        if bad:
            out.append(f"supervisor fds: pid {pid} holds unexpected fds: "
                       + ", ".join(f"{k} -> {v}" for k, v in sorted(bad.items())[:10]))
    return out


def _o_path(pid: int, fd: str) -> bool:
    try:
        with open(f"/proc/{pid}/fdinfo/{fd}", encoding="ascii") as f:
            for line in f:
                if line.startswith("flags:"):
                    return bool(int(line.split()[1], 8) & 0o10000000)
    except (OSError, ValueError, IndexError):
        pass
    return False


def check_clean_env(snap: Snapshot) -> list[str]:
    """The hypervisor's environment carries nothing of svirt's."""
    out = []
    for rec in snap.records:
        hv: dict[str, Any] = rec.get("hypervisor") or {}
        if not _alive(hv):
            continue
        try:
            with open(f"/proc/{hv['pid']}/environ", "rb") as f:
                env = f.read().split(b"\0")
        except OSError:
            continue
        leaked = [e.decode(errors="replace")[:120] for e in env if e.startswith(b"SVIRT_")]
        if leaked:
            out.append(f"environment: guest {rec['name']} hypervisor {hv['pid']} carries "
                       + ", ".join(leaked[:3]))
    return out


def check_supervisor_log(world: World, seen: dict[str, int]) -> list[str]:
    """The supervisor's log has no traceback: its threads catch everything
    (a thread that dies leaves a guest nobody stops).  ``seen``: how far
    the log was read (kept by the caller)."""
    path = world.state / "logs" / "svirtd.log"
    try:
        with open(path, "rb") as f:
            f.seek(seen.get(str(path), 0))
            data = f.read()
    except OSError:
        return []
    seen[str(path)] = seen.get(str(path), 0) + len(data)
    out = []
    for m in re.finditer(rb"Traceback \(most recent call last\):\n(?:[ \t].*\n)*(.*)", data):
        last = m.group(1)[:300].decode(errors="replace")
        out.append(f"supervisor: a traceback in {path}: {last}")
    return out


def check_breaches(texts: Iterable[tuple[str, bytes]]) -> list[str]:
    """``BREACH`` lines the stand-ins printed (an attack that worked)."""
    out = []
    for where, data in texts:
        for m in re.finditer(rb"BREACH (\{[^\n]{0,400}\})", data):
            out.append(f"breach: {where}: {m.group(1).decode(errors='replace')}")
    return out


def check_terminal_safe(verb: str, stdout: bytes) -> list[str]:
    """svirt logs (without --raw) prints no escape or control sequences."""
    if verb != "logs":
        return []
    m = ESCAPE_BYTES.search(stdout)
    if m is None:
        return []
    return [f"terminal: svirt logs printed a raw control byte {m.group(0)!r} at "
            f"{m.start()}: {stdout[max(0, m.start() - 20):m.start() + 20]!r}"]


def check_explain(verb: str, stdout: bytes) -> list[str]:
    """svirt explain reports no denial made from a guest's forged text."""
    if verb != "explain" or b"chaos-forged" not in stdout:
        return []
    line = next((ln for ln in stdout.splitlines() if b"chaos-forged" in ln), b"")
    return [f"explain: a forged AVC counted as a denial: {line[:300]!r}"]


def check_nvram_restored(world: World) -> list[str]:
    """A QEMU guest with no record holds no NVRAM store: if its store
    exists, it is root's again with svirt's mode 0600 (no setuid bit, no
    write for others), whatever the guest chmodded while it owned it."""
    from tests.hostile.chaos.world import nvram

    found = []
    for g in world.guests:
        if g.shape != "qemu" or (world.state / "guests" / f"{g.name}.json").exists():
            continue
        try:
            st = nvram(g).lstat()
        except FileNotFoundError:
            continue
        if (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) != (0, 0, 0o600):
            found.append(f"nvram of {g.name} not restored: uid {st.st_uid} gid {st.st_gid} "
                         f"mode {stat.S_IMODE(st.st_mode):o}")
    return found
