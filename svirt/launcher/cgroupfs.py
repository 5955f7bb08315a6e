"""The host's cgroup hierarchies: where they are mounted, svirt's leaves in
them, and what a leaf holds (its tasks, its usage).

Two layouts, detected at run time (:func:`detect`):

- **cgroup v2**: ``/sys/fs/cgroup`` is a cgroup2 mount whose
  ``cgroup.controllers`` has ``memory`` and ``pids``.  One directory per
  guest, ``/sys/fs/cgroup/svirt/LEAF``.
- **cgroup v1**: otherwise, the per-controller hierarchies named in
  ``/proc/mounts`` (``memory``, ``pids``, ``cpu``, ``cpuacct``, ``cpuset``):
  ``MOUNT/svirt/LEAF`` in each; also ``freezer`` and, on a hybrid host, the
  cgroup2 hierarchy mounted beside the v1 ones (``/sys/fs/cgroup/unified``:
  no controllers, but ``cgroup.kill``) when they are mounted.

``LEAF`` is ``NAME.SLOT.TAG``: ``TAG`` is 8 hex digits of the registry's
state directory, so several registries (tests run private ones) share the
host's tree and each sweeps only its own leftovers.  A process's cgroup is
what tells registries and guests apart (:func:`leaf_of`): the kernel reports
it and only root can move a process, so a guest cannot claim another's.

What a guest's cgroup is and how it is made and removed:
:mod:`svirt.launcher.cgroups`; how its leftovers are killed:
:mod:`svirt.launcher.cgroupkill`.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
PARENT = "svirt"
#: v1 hierarchies a guest gets a directory in (cpuset only with pinned cpus)
V1_CONTROLLERS = ("memory", "pids", "cpu", "cpuacct")
V1_REQUIRED = ("memory", "pids")
#: v1 extras a guest gets a directory in when mounted: cgroupkill uses them
#: ("unified": a cgroup2 hierarchy beside the v1 ones, for its cgroup.kill)
V1_KILLERS = ("freezer", "unified")
LEAF_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}\.[0-9]{1,5}\.[0-9a-f]{8}")


@dataclass(frozen=True)
class Layout:
    """Where the cgroup controllers are: v2 (one root) or v1 (one per controller)."""

    version: int
    mounts: dict[str, Path] = field(default_factory=dict)  # controller -> hierarchy root

    def base(self, controller: str) -> Path | None:
        root = self.mounts.get(controller)
        return root / PARENT if root is not None else None

    def bases(self) -> list[Path]:
        """Every distinct ``.../svirt`` directory of this layout."""
        return sorted({root / PARENT for root in self.mounts.values()})


def _unescape(field_: str) -> str:
    """A /proc/mounts field: octal escapes (\\040 for a space) decoded."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field_)


def _mounts() -> list[tuple[str, str, list[str]]]:
    """(mount point, fs type, options) of every cgroup mount."""
    out = []
    try:
        with open("/proc/mounts", encoding="utf-8", errors="surrogateescape") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 4 and parts[2] in ("cgroup", "cgroup2"):
                    out.append((_unescape(parts[1]), parts[2], parts[3].split(",")))
    except OSError:
        pass
    return out


def read_value(path: Path) -> str:
    """A cgroup file's value (stripped)."""
    with open(path, encoding="ascii") as f:
        return f.read().strip()


def write_value(path: Path, value: str) -> None:
    """Write a cgroup file (never through a symlink)."""
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def detect() -> Layout | None:
    """v2 when /sys/fs/cgroup is cgroup2 with memory and pids; else v1 from
    /proc/mounts (a hierarchy below /sys/fs/cgroup preferred); None when
    neither has memory and pids."""
    mounts = _mounts()
    here = [fstype for point, fstype, _ in mounts if point == str(CGROUP_ROOT)]
    if here and here[-1] == "cgroup2":  # the last mount on a point is the visible one
        try:
            controllers = set(read_value(CGROUP_ROOT / "cgroup.controllers").split())
        except OSError:
            controllers = set()
        if {"memory", "pids"} <= controllers:
            return Layout(2, {c: CGROUP_ROOT for c in controllers})
    found: dict[str, Path] = {}
    for point, fstype, options in mounts:
        if fstype != "cgroup":
            continue
        for controller in (*V1_CONTROLLERS, "cpuset", "freezer"):
            if controller in options:
                preferred = Path(point).parent == CGROUP_ROOT
                if controller not in found or (
                        preferred and found[controller].parent != CGROUP_ROOT):
                    found[controller] = Path(point)
    if all(c in found for c in V1_REQUIRED):
        # a freezer mounted elsewhere (a chroot's /sys, a container's) comes and
        # goes with it: a guest's cgroup recorded there could not be removed
        if "freezer" in found and found["freezer"].parent != CGROUP_ROOT:
            del found["freezer"]
        for point, fstype, _ in mounts:
            # a hybrid host: cgroup2 (no controllers) beside v1; its cgroup.kill
            # kills a whole cgroup at once, forks included
            if fstype == "cgroup2" and Path(point).parent == CGROUP_ROOT:
                found["unified"] = Path(point)
                break
        return Layout(1, found)
    return None


def registry_tag(state_dir: Path | str) -> str:
    """8 hex digits naming a registry (its state directory) in leaf names."""
    return hashlib.sha256(str(state_dir).encode()).hexdigest()[:8]


def leaf_name(name: str, slot: int, tag: str) -> str:
    return f"{name}.{slot}.{tag}"


def tasks_of(paths: Iterable[Path]) -> set[int]:
    """Processes in any of ``paths`` (a gone directory has none)."""
    out: set[int] = set()
    for path in paths:
        try:
            text = read_value(path / "cgroup.procs")
        except FileNotFoundError:
            continue
        out.update(int(p) for p in text.split())
    return out


def usage_of(version: int, dirs: dict[str, Path]) -> dict[str, int]:
    """memory (bytes now), memory_peak (bytes), cpu_ns, pids: what can be read."""
    out: dict[str, int] = {}
    mem, pids, cpu = dirs.get("memory"), dirs.get("pids"), dirs.get("cpu")
    acct = dirs.get("cpuacct")

    def get(key: str, path: Path | None, parse: Callable[[str], int] = int) -> None:
        if path is None:
            return
        try:
            out[key] = parse(read_value(path))
        except (OSError, ValueError):
            pass

    if version == 2:
        get("memory", mem and mem / "memory.current")
        get("memory_peak", mem and mem / "memory.peak")
        get("pids", pids and pids / "pids.current")
        get("cpu_ns", cpu and cpu / "cpu.stat", _usage_usec_as_ns)
    else:
        get("memory", mem and mem / "memory.usage_in_bytes")
        get("memory_peak", mem and mem / "memory.max_usage_in_bytes")
        get("pids", pids and pids / "pids.current")
        get("cpu_ns", acct and acct / "cpuacct.usage")
    return out


def _usage_usec_as_ns(text: str) -> int:
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if key == "usage_usec":
            return int(value) * 1000
    raise ValueError("no usage_usec")


def ours(path: Path, layout: Layout | None) -> bool:
    """``path`` is ``MOUNT/svirt/LEAF`` of a cgroup mount of this host."""
    if layout is None or not LEAF_RE.fullmatch(path.name):
        return False
    return path.parent in layout.bases()


def leaf_of(pid: int) -> str | None:
    """The svirt leaf (``NAME.SLOT.TAG``) process ``pid`` is in, from
    /proc/PID/cgroup: written by the kernel, relative to the reader's (root's)
    cgroup namespace; a process cannot move itself (only root writes
    ``cgroup.procs``).  None: in no svirt cgroup, or gone."""
    try:
        fd = os.open(f"/proc/{pid}/cgroup", os.O_RDONLY | os.O_CLOEXEC)
        try:
            text = os.read(fd, 65536).decode("ascii", "replace")
        finally:
            os.close(fd)
    except OSError:
        return None
    for line in text.splitlines():
        path = line.split(":", 2)[-1]
        parent, _, leaf = path.rpartition("/")
        if parent == f"/{PARENT}" and LEAF_RE.fullmatch(leaf):
            return leaf
    return None


def tag_of(leaf: str) -> str:
    """The registry tag of a leaf name (its last dot-separated field)."""
    return leaf.rsplit(".", 1)[-1]


def dirs_of_leaf(leaf: str, layout: Layout | None = None) -> list[Path]:
    """Every existing directory named ``leaf`` below this host's svirt bases."""
    layout = layout if layout is not None else detect()
    if layout is None or not LEAF_RE.fullmatch(leaf):
        return []
    return [base / leaf for base in layout.bases() if os.path.isdir(base / leaf)]


def leaves(tag: str, layout: Layout | None = None) -> dict[str, list[Path]]:
    """This registry's leaves (``*.tag``) on the host: leaf -> its directories."""
    layout = layout if layout is not None else detect()
    out: dict[str, list[Path]] = {}
    for base in layout.bases() if layout is not None else []:
        try:
            entries = list(os.scandir(base))
        except OSError:
            continue
        for entry in entries:
            if (entry.is_dir(follow_symlinks=False) and LEAF_RE.fullmatch(entry.name)
                    and tag_of(entry.name) == tag):
                out.setdefault(entry.name, []).append(Path(entry.path))
    return out

