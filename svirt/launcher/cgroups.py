"""Each guest in a cgroup of its own: memory, pids and cpu limits, as a
planned step: :func:`plan` computes it, the launch journals it, then
:func:`create` makes it; :func:`remove_dirs` is its undo.

A guest's directories (:mod:`svirt.launcher.cgroupfs` finds the
hierarchies): on **cgroup v2** one, ``/sys/fs/cgroup/svirt/LEAF``, with
``memory.max``, ``pids.max``, ``cpu.weight`` and ``cpuset.cpus``; svirt
enables the controllers it uses in the ``subtree_control`` of the root and
of ``svirt``.  On **cgroup v1** one in each of the ``memory``, ``pids``,
``cpu``, ``cpuacct`` hierarchies (and ``cpuset`` only when the spec pins
cpus), with ``memory.limit_in_bytes``, ``pids.max``, ``cpu.shares``; also
one in the ``freezer`` hierarchy and, on a hybrid host, in the cgroup2
hierarchy beside the v1 ones, when they are mounted: they are what
:func:`svirt.launcher.cgroupkill.kill_dirs` kills with.

The memory limit is the guest's RAM plus a per-backend overhead (below:
what the hypervisor itself needs beyond guest RAM, measured).  The pids
limit counts host tasks (threads included): UML runs one host process per
guest address space, so its default is higher.

The child joins the cgroup between fork and exec (:meth:`GuestCgroup.
enter_in_child`, before the uid switch: only root may write ``cgroup.procs``)
so the hypervisor and everything it forks are inside from their first
instruction.  :func:`remove_dirs` kills nothing: it waits briefly for a
cgroup to empty and fails when it does not (the registry keeps the record
as restore-failed); what kills a guest's leftovers is
:func:`~svirt.launcher.cgroupkill.kill_dirs` (the registry's release,
fencing, ``svirt gc``).  Every path is a root-owned directory below a cgroup
mount; no guest can write there (svirt never delegates a cgroup).
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from svirt.errors import HostError, StateError
from svirt.launcher.cgroupfs import (
    CGROUP_ROOT,
    LEAF_RE,
    PARENT,
    V1_KILLERS,
    Layout,
    detect,
    leaf_name,
    ours,
    read_value,
    tasks_of,
    usage_of,
    write_value,
)

MIB = 1024 * 1024
#: memory beyond guest RAM the hypervisor may use (MiB), measured on Debian 12
#: (kernel 6.18 host, cgroup v1, tiny guests: peak = memory.max_usage_in_bytes;
#: "fill" = /init writes N MiB into the guest's ramfs, touching its RAM):
#:
#: - uml, 128M guest: booted, peak 48.3 MiB of which 39 MiB shmem (guest RAM
#:   is a tmpfs file, charged as shmem, at most mem=): 9 MiB beyond; filled
#:   80 MiB, peak 107.3 MiB with 105 MiB shmem: 2.3 MiB beyond.  What grows
#:   is host page tables, one host process per guest address space (pids.max
#:   bounds them).  64 MiB: 7x the worst measured.
#: - qemu (TCG), 256M guest: booted, peak 201.3 MiB while the guest RAM
#:   mapping had 166 MiB resident: 35 MiB beyond (QEMU, device emulation, the
#:   TCG translation cache as used so far); filled 220 MiB, peak 269.9 MiB.
#:   192 MiB: 5x.  TCG's translation cache may grow to 1 GiB on a guest that
#:   runs much distinct code (QEMU's default tb-size): bound it with
#:   ``-accel tcg,tb-size=`` before lowering this.
OVERHEAD_MIB = {"uml": 64, "qemu": 192, "lguest": 64}
#: default pids.max: UML forks a host process per guest process
DEFAULT_PIDS = {"uml": 256, "qemu": 128, "lguest": 128}
REMOVE_TIMEOUT = 2.0


@dataclass
class GuestCgroup:
    """One guest's cgroup: a directory per v1 hierarchy, or one v2 directory."""

    version: int
    leaf: str
    dirs: dict[str, Path]  # controller -> the guest's directory
    memory_max: int  # bytes
    pids_max: int
    cpu_weight: int | None = None
    cpus: str | None = None

    @property
    def paths(self) -> list[Path]:
        """The guest's distinct directories (co-mounted controllers share one)."""
        return sorted(set(self.dirs.values()))

    def enter_in_child(self) -> Callable[[], None]:
        """A step for the child between fork and exec: join every directory.

        Paths and flags are prepared here; the step only opens and writes
        (no import, no allocation worth naming after fork).  It must run as
        root, before the uid switch."""
        targets = tuple(os.fsencode(d / "cgroup.procs") for d in self.paths)
        flags = os.O_WRONLY | os.O_CLOEXEC | os.O_NOFOLLOW

        def enter() -> None:
            for target in targets:
                fd = os.open(target, flags)
                try:
                    os.write(fd, b"0")
                finally:
                    os.close(fd)

        return enter

    def usage(self) -> dict[str, int]:
        return usage_of(self.version, self.dirs)

    def tasks(self) -> set[int]:
        return tasks_of(self.paths)

    def remove(self, timeout: float = REMOVE_TIMEOUT) -> None:
        remove_dirs(self.paths, timeout)

    def journal_entry(self) -> dict[str, object]:
        return {"op": "cgroup", "path": f"{PARENT}/{self.leaf}", "version": self.version,
                "dirs": {c: str(d) for c, d in self.dirs.items()}}


def plan(name: str, slot: int, memory_mib: int, backend: str, tag: str,
         pids_max: int | None = None, cpu_weight: int | None = None,
         cpus: str | None = None, layout: Layout | None = None) -> GuestCgroup:
    """The guest's cgroup, computed but not created (journal it, then :func:`create`)."""
    layout = layout or detect()
    if layout is None:
        raise HostError(
            "no cgroup hierarchy with the memory and pids controllers is mounted",
            hint="mount cgroup2 on /sys/fs/cgroup (or the v1 memory and pids hierarchies)")
    wanted = ["memory", "pids"]
    if layout.version == 2:
        wanted += ["cpu"] if "cpu" in layout.mounts else []
    else:
        wanted += [c for c in ("cpu", "cpuacct", *V1_KILLERS) if c in layout.mounts]
    if cpu_weight is not None and "cpu" not in layout.mounts:
        raise HostError("limits.cpu_weight: this host has no cpu cgroup controller")
    if cpus is not None:
        if "cpuset" not in layout.mounts:
            raise HostError("limits.cpus: this host has no cpuset cgroup controller")
        wanted.append("cpuset")
    leaf = leaf_name(name, slot, tag)
    dirs = {}
    for controller in wanted:
        base = layout.base(controller)
        assert base is not None  # noqa: S101 - wanted lists mounted controllers only
        dirs[controller] = base / leaf
    overhead = OVERHEAD_MIB.get(backend, max(OVERHEAD_MIB.values()))
    return GuestCgroup(
        version=layout.version, leaf=leaf, dirs=dirs,
        memory_max=(memory_mib + overhead) * MIB,
        pids_max=pids_max if pids_max is not None else DEFAULT_PIDS.get(backend, 128),
        cpu_weight=cpu_weight, cpus=cpus)


def create(name: str, slot: int, memory_mib: int, backend: str,
           pids_max: int | None = None, cpu_weight: int | None = None,
           cpus: str | None = None, *, tag: str = "00000000",
           cgroup: GuestCgroup | None = None) -> GuestCgroup:
    """Create the guest's cgroup and set its limits (``cgroup``: a :func:`plan`
    already journalled).  A failure leaves what was made for :func:`remove_dirs`."""
    cg = cgroup or plan(name, slot, memory_mib, backend, tag, pids_max, cpu_weight, cpus)
    try:
        if cg.version == 2:
            _create_v2(cg)
        else:
            _create_v1(cg)
    except OSError as err:
        raise HostError(
            f"cannot set up the cgroup {PARENT}/{cg.leaf}: {err.strerror or err}"
            + (f" ({err.filename})" if err.filename else ""),
            hint=_hint(err.errno)) from err
    return cg


def _hint(errno_value: int | None) -> str | None:
    return {
        errno.EROFS: "the cgroup file system is mounted read-only (a container?)",
        errno.EACCES: "svirt needs root to create cgroups",
        errno.EPERM: "svirt needs root to create cgroups",
        errno.EINVAL: "a limit the kernel refuses (limits.cpus outside the host's cpus?)",
        errno.EOPNOTSUPP: "the controller is not enabled for svirt's cgroup (subtree_control)",
    }.get(errno_value or 0)


def _create_v2(cg: GuestCgroup) -> None:
    parent = CGROUP_ROOT / PARENT
    controllers = [c for c in ("memory", "pids", "cpu", "cpuset") if c in cg.dirs]
    _enable(CGROUP_ROOT, controllers)
    os.makedirs(parent, 0o755, exist_ok=True)
    _enable(parent, controllers)
    leaf = parent / cg.leaf
    os.mkdir(leaf, 0o755)
    write_value(leaf / "memory.max", str(cg.memory_max))
    write_value(leaf / "pids.max", str(cg.pids_max))
    if cg.cpu_weight is not None:
        write_value(leaf / "cpu.weight", str(cg.cpu_weight))
    if cg.cpus is not None:
        write_value(leaf / "cpuset.cpus", cg.cpus)


def _enable(directory: Path, controllers: Iterable[str]) -> None:
    """Enable ``controllers`` for the children of a v2 directory (those not yet on)."""
    have = set(read_value(directory / "cgroup.subtree_control").split())
    missing = [c for c in controllers if c not in have]
    if missing:
        write_value(directory / "cgroup.subtree_control", " ".join(f"+{c}" for c in missing))


def _create_v1(cg: GuestCgroup) -> None:
    made: set[Path] = set()
    for controller, leaf in list(cg.dirs.items()):
        if leaf in made:
            continue  # co-mounted controllers (cpu,cpuacct) share one directory
        parent = leaf.parent
        try:
            os.makedirs(parent, 0o755, exist_ok=True)
            if controller == "cpuset":
                _inherit_cpuset(parent.parent, parent)
            os.mkdir(leaf, 0o755)
        except OSError:
            if controller not in V1_KILLERS:
                raise
            # a killer hierarchy is a better way to kill, not a limit: without
            # it kill_dirs falls back to pids.max=0 and SIGKILL rounds
            del cg.dirs[controller]
            continue
        made.add(leaf)
    write_value(cg.dirs["memory"] / "memory.limit_in_bytes", str(cg.memory_max))
    write_value(cg.dirs["pids"] / "pids.max", str(cg.pids_max))
    if cg.cpu_weight is not None:
        # systemd's mapping: weight 100 (the default) is 1024 shares
        write_value(cg.dirs["cpu"] / "cpu.shares", str(max(2, cg.cpu_weight * 1024 // 100)))
    if cg.cpus is not None:
        leaf = cg.dirs["cpuset"]
        write_value(leaf / "cpuset.cpus", cg.cpus)
        write_value(leaf / "cpuset.mems", read_value(leaf.parent / "cpuset.mems"))


def _inherit_cpuset(source: Path, target: Path) -> None:
    """A new v1 cpuset starts with no cpus and no mems: take its parent's."""
    for key in ("cpuset.cpus", "cpuset.mems"):
        if not read_value(target / key):
            write_value(target / key, read_value(source / key))


def remove_dirs(paths: Iterable[Path | str], timeout: float = REMOVE_TIMEOUT) -> None:
    """Wait up to ``timeout`` for each directory to empty, then rmdir it.
    Kills nothing; a directory that keeps tasks raises StateError."""
    layout = detect()
    todo = [Path(p) for p in paths]
    for path in todo:
        if not ours(path, layout):
            raise StateError(f"{path} is not a svirt cgroup of this host")
    deadline = time.monotonic() + timeout
    for path in sorted(set(todo)):
        while True:
            try:
                os.rmdir(path)
                break
            except FileNotFoundError:
                break  # never made, or removed already (a reboot)
            except OSError as err:
                if err.errno != errno.EBUSY:
                    raise StateError(f"cannot remove cgroup {path}: {err.strerror}") from err
                if time.monotonic() >= deadline:
                    left = sorted(tasks_of([path]))
                    raise StateError(
                        f"cgroup {path} still has processes {left[:8]} after the guest "
                        "ended", hint="find out what they are; svirt gc retries") from err
                time.sleep(0.02)


def sweep(live_leaves: Iterable[str], tag: str) -> list[str]:
    """Remove this registry's ``svirt/*`` cgroups (leaf ending in ``.tag``)
    that no live record names and that have no tasks; what was removed."""
    layout = detect()
    if layout is None:
        return []
    keep = set(live_leaves)
    report: list[str] = []
    for base in layout.bases():
        try:
            entries = list(os.scandir(base))
        except OSError:
            continue
        for entry in entries:
            name = entry.name
            if (not entry.is_dir(follow_symlinks=False) or not LEAF_RE.fullmatch(name)
                    or not name.endswith(f".{tag}") or name in keep):
                continue
            path = Path(entry.path)
            if tasks_of([path]):
                report.append(f"cgroup {path}: no record, but it has processes; left alone")
                continue
            try:
                os.rmdir(path)
                report.append(f"cgroup {path}: removed (no record)")
            except OSError as err:
                report.append(f"cgroup {path}: cannot remove: {err.strerror}")
    return report


def record_usage(journal: Iterable[dict[str, object]]) -> dict[str, int]:
    """A guest's cgroup usage (memory bytes, cpu ns), found through its record's
    journal (the cgroup entry names its directories)."""
    for entry in journal:
        dirs = entry.get("dirs")
        if entry.get("op") == "cgroup" and isinstance(dirs, dict):
            version = entry.get("version", 1)
            return usage_of(int(version) if isinstance(version, int) else 1,
                            {str(c): Path(str(d)) for c, d in dirs.items()})
    return {}


def journal_dirs(journal: Iterable[dict[str, object]]) -> list[Path]:
    """A guest's cgroup directories, from its record's journal (root's state)."""
    for entry in journal:
        dirs = entry.get("dirs")
        if entry.get("op") == "cgroup" and isinstance(dirs, dict):
            return [Path(str(d)) for d in dirs.values()]
    return []


__all__ = ["DEFAULT_PIDS", "OVERHEAD_MIB", "GuestCgroup", "create", "journal_dirs", "plan",
           "record_usage", "remove_dirs", "sweep"]
