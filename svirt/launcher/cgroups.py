"""Each guest in a cgroup of its own: memory, pids and cpu limits.

Two layouts, detected at run time (:func:`detect`):

- **cgroup v2**: ``/sys/fs/cgroup`` is a cgroup2 mount whose
  ``cgroup.controllers`` has ``memory`` and ``pids``.  One directory per
  guest, ``/sys/fs/cgroup/svirt/LEAF``, with ``memory.max``, ``pids.max``,
  ``cpu.weight`` and ``cpuset.cpus``; svirt enables the controllers it uses
  in the ``subtree_control`` of the root and of ``svirt``.
- **cgroup v1**: otherwise, the per-controller hierarchies named in
  ``/proc/mounts`` (``memory``, ``pids``, ``cpu``, ``cpuacct``, and
  ``cpuset`` only when the spec pins cpus): ``MOUNT/svirt/LEAF`` in each,
  with ``memory.limit_in_bytes``, ``pids.max``, ``cpu.shares``.

``LEAF`` is ``NAME.SLOT.TAG``: ``TAG`` is 8 hex digits of the registry's
state directory, so several registries (tests run private ones) share the
host's tree and each sweeps only its own leftovers.  A process's cgroup is
what tells registries and guests apart (:func:`leaf_of`): the kernel reports
it and only root can move a process, so a guest cannot claim another's.

On v1 a guest also gets a directory in the ``freezer`` hierarchy and, on a
hybrid host, in the cgroup2 hierarchy mounted beside the v1 ones
(``/sys/fs/cgroup/unified``: no controllers, but ``cgroup.kill``), when they
are mounted.  They are what :func:`kill_dirs` kills with.

The memory limit is the guest's RAM plus a per-backend overhead (below:
what the hypervisor itself needs beyond guest RAM, measured).  The pids
limit counts host tasks (threads included): UML runs one host process per
guest address space, so its default is higher.

The child joins the cgroup between fork and exec (:meth:`GuestCgroup.
enter_in_child`, before the uid switch: only root may write ``cgroup.procs``)
so the hypervisor and everything it forks are inside from their first
instruction.  :func:`remove_dirs` kills nothing: it waits briefly for a
cgroup to empty and fails when it does not (the registry keeps the record
as restore-failed); what kills a guest's leftovers is :func:`kill_dirs`
(the registry's release, fencing, ``svirt gc``).  Every path is a
root-owned directory below a cgroup
mount; no guest can write there (svirt never delegates a cgroup).
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import signal
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

from svirt.errors import HostError, StateError

CGROUP_ROOT = Path("/sys/fs/cgroup")
PARENT = "svirt"
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
#: v1 hierarchies a guest gets a directory in (cpuset only with pinned cpus)
V1_CONTROLLERS = ("memory", "pids", "cpu", "cpuacct")
V1_REQUIRED = ("memory", "pids")
#: v1 extras a guest gets a directory in when mounted: kill_dirs uses them
#: ("unified": a cgroup2 hierarchy beside the v1 ones, for its cgroup.kill)
V1_KILLERS = ("freezer", "unified")
LEAF_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}\.[0-9]{1,5}\.[0-9a-f]{8}")
REMOVE_TIMEOUT = 2.0
#: kill_dirs: how long it keeps killing until the cgroup is empty (a frozen or
#: cgroup.kill'ed guest empties in milliseconds; this bounds a stuck one)
KILL_TIMEOUT = 10.0
#: kill_dirs: how long one v1 freeze may take before it kills anyway (a task
#: in an uninterruptible sleep holds FREEZING); pids.max=0 still stops forks
FREEZE_TIMEOUT = 1.0


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


def _read(path: Path) -> str:
    with open(path, encoding="ascii") as f:
        return f.read().strip()


def _write(path: Path, value: str) -> None:
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
            controllers = set(_read(CGROUP_ROOT / "cgroup.controllers").split())
        except OSError:
            controllers = set()
        if {"memory", "pids"} <= controllers:
            return Layout(2, {c: CGROUP_ROOT for c in controllers})
    found: dict[str, Path] = {}
    for point, fstype, options in mounts:
        if fstype != "cgroup":
            continue
        for controller in (*V1_CONTROLLERS, "cpuset"):
            if controller in options:
                preferred = Path(point).parent == CGROUP_ROOT
                if controller not in found or (
                        preferred and found[controller].parent != CGROUP_ROOT):
                    found[controller] = Path(point)
    if all(c in found for c in V1_REQUIRED):
        if "freezer" not in found:
            for point, fstype, options in mounts:
                if fstype == "cgroup" and "freezer" in options:
                    found["freezer"] = Path(point)
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
    _write(leaf / "memory.max", str(cg.memory_max))
    _write(leaf / "pids.max", str(cg.pids_max))
    if cg.cpu_weight is not None:
        _write(leaf / "cpu.weight", str(cg.cpu_weight))
    if cg.cpus is not None:
        _write(leaf / "cpuset.cpus", cg.cpus)


def _enable(directory: Path, controllers: Iterable[str]) -> None:
    """Enable ``controllers`` for the children of a v2 directory (those not yet on)."""
    have = set(_read(directory / "cgroup.subtree_control").split())
    missing = [c for c in controllers if c not in have]
    if missing:
        _write(directory / "cgroup.subtree_control", " ".join(f"+{c}" for c in missing))


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
    _write(cg.dirs["memory"] / "memory.limit_in_bytes", str(cg.memory_max))
    _write(cg.dirs["pids"] / "pids.max", str(cg.pids_max))
    if cg.cpu_weight is not None:
        # systemd's mapping: weight 100 (the default) is 1024 shares
        _write(cg.dirs["cpu"] / "cpu.shares", str(max(2, cg.cpu_weight * 1024 // 100)))
    if cg.cpus is not None:
        leaf = cg.dirs["cpuset"]
        _write(leaf / "cpuset.cpus", cg.cpus)
        _write(leaf / "cpuset.mems", _read(leaf.parent / "cpuset.mems"))


def _inherit_cpuset(source: Path, target: Path) -> None:
    """A new v1 cpuset starts with no cpus and no mems: take its parent's."""
    for key in ("cpuset.cpus", "cpuset.mems"):
        if not _read(target / key):
            _write(target / key, _read(source / key))


def tasks_of(paths: Iterable[Path]) -> set[int]:
    """Processes in any of ``paths`` (a gone directory has none)."""
    out: set[int] = set()
    for path in paths:
        try:
            text = _read(path / "cgroup.procs")
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
            out[key] = parse(_read(path))
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


def _ours(path: Path, layout: Layout | None) -> bool:
    """``path`` is ``MOUNT/svirt/LEAF`` of a cgroup mount of this host."""
    if layout is None or not LEAF_RE.fullmatch(path.name):
        return False
    return path.parent in layout.bases()


def remove_dirs(paths: Iterable[Path | str], timeout: float = REMOVE_TIMEOUT) -> None:
    """Wait up to ``timeout`` for each directory to empty, then rmdir it.
    Kills nothing; a directory that keeps tasks raises StateError."""
    layout = detect()
    todo = [Path(p) for p in paths]
    for path in todo:
        if not _ours(path, layout):
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
        if not _ours(path, layout):
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
            _write(pids / "pids.max", "0")  # no fork succeeds from now on
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
                _write(killer / "cgroup.kill", "1")
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
    todo = [Path(p) for p in paths if _ours(Path(p), layout) and Path(p).is_dir()]
    v2 = next((p for p in todo if (p / "cgroup.freeze").exists()), None)
    v1 = next((p for p in todo if (p / "freezer.state").exists()), None)
    done = False
    if v2 is not None:
        try:
            _write(v2 / "cgroup.freeze", "1")
            done = True
            deadline = time.monotonic() + FREEZE_TIMEOUT
            while "frozen 1" not in _read(v2 / "cgroup.events").splitlines():
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
                _write(v2 / "cgroup.freeze", "0")
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
        _write(freezer / "freezer.state", state)
    except OSError:
        return False
    deadline = time.monotonic() + FREEZE_TIMEOUT
    while True:
        try:
            if _read(freezer / "freezer.state") == state:
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


__all__ = ["GuestCgroup", "Layout", "create", "detect", "plan", "remove_dirs", "sweep",
           "registry_tag", "leaf_name", "usage_of", "tasks_of", "OVERHEAD_MIB",
           "DEFAULT_PIDS", "kill_dirs", "frozen", "kill_member", "leaf_of", "leaves",
           "dirs_of_leaf", "tag_of", "journal_dirs"]


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
