"""Each guest's writable storage on a mount of its own, with a size and an inode cap.

Everything a guest's uid can write below the registry's run directory sits
in its run directory ``RUN/guests/NAME.d``: its home (UML's ``uml_dir``: the
umid directory, the COW files of ephemeral disks), QEMU's ephemeral overlays
(``layers/``), and root's own files for the guest (console FIFOs, the QMP
socket of a detached guest, the AppArmor profile, the jail's mount point).
Before anything is made there, that directory becomes a tmpfs of its own::

    tmpfs  RUN/guests/NAME.d  size=S,nr_inodes=I,mode=0755  nosuid,nodev,noexec
    source "svirt-storage.TAG" (TAG: the registry's, as in cgroups.py)

so a guest that writes without end (a file, its disk's layer, many small
files) gets ENOSPC inside its own cap, never on ``/run`` (here often the root
disk) or the state disk, and never at another guest's expense.

Sizes (:func:`plan`): ``S`` is the host config's ``guest_storage_mib``
(default 16 MiB: the home and root's few files) plus, per ephemeral disk,
its layer's bound: the base's virtual size, 1/256 of it and 1 MiB for the
layer's metadata (a qcow2 overlay's L1/L2 and refcount tables, UML's COW
header and bitmap: both well under that).  ``I`` is ``guest_storage_inodes``
(default 4096).  Both may be set in ``/etc/svirt/svirt.toml``.

Why tmpfs and not a disk directory with a quota: a quota needs a file
system mounted with project quotas, which svirt cannot assume, and a loop
file system costs a mkfs per launch; a tmpfs is one mount(2), its caps are
the kernel's, and release is one umount(2), never a walk of a tree the guest
built (deep trees, many files: nothing to recurse into).

Budget: a tmpfs lives in RAM and swap, and each guest's memory limit is
raised by its cap, so caps past the host's memory would be paid by a
global OOM.  A launch is refused (HostError, with a hint) when its storage
cap plus the caps of every svirt storage mount already on the host (the
mount table: every registry's, ``svirt-storage.*``) would exceed
``guest_storage_budget_percent`` (host config, default 50) of MemTotal +
SwapTotal (:func:`check_budget`, under the host claims lock).  The caps are
promises, not use: a host running guests that write little may be refused
a guest it could carry; the budget is what a guest may write without
taking the host down.

Memory: tmpfs pages are charged to the memory cgroup of the task that
faults them, so the guest's writes count against its own cgroup (never
against the launcher or the host's services).  The launch therefore adds
``S`` to the guest's memory limit (RAM + backend overhead + storage): the
cap, not the OOM killer, is what a writing guest meets.  The host pays for
that in RAM (or swap): an ephemeral disk that the guest fills costs its
virtual size in memory.  Pages written by root (the qcow2 header, the
profile) are charged to the launcher.

The mount is a planned step (:func:`plan` computes, the journal entry is
written, :meth:`GuestStorage.create` mounts; :func:`remove` undoes it, from
``Registry.release`` and so from ``svirt gc`` after a killed launcher;
:func:`sweep` unmounts this registry's mounts whose record is gone).  Every
path here is root's: the run directory's parent is root's alone, so the
guest can neither rename the mount point nor plant one.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from svirt.errors import HostError, StateError

MIB = 1024 * 1024
SOURCE = "svirt-storage"
#: the guest's home, made inside the mount (root's until the stack labels it)
HOME = "home"
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MNT_DETACH = 0x2
UMOUNT_NOFOLLOW = 0x8
MOUNT_FLAGS = MS_NOSUID | MS_NODEV | MS_NOEXEC
#: a layer's metadata allowance beyond the disk's virtual size
LAYER_SLACK_DIVISOR = 256
LAYER_SLACK_BYTES = 1 * MIB
#: the most inodes a host config may give (a tmpfs inode is ~1 KiB of kernel memory)
MAX_INODES = 1 << 20


def layer_bound(virtual_size: int) -> int:
    """The most bytes an ephemeral layer over a base of ``virtual_size`` may need."""
    return virtual_size + virtual_size // LAYER_SLACK_DIVISOR + LAYER_SLACK_BYTES


def source_name(tag: str) -> str:
    """The tmpfs's source field: names svirt's mounts, and the registry."""
    return f"{SOURCE}.{tag}"


@dataclass(frozen=True)
class GuestStorage:
    """One guest's storage mount, computed but not made (journal it, then create)."""

    path: Path  # the guest's run directory: the mount point
    size: int  # bytes
    inodes: int
    tag: str  # the registry's (cgroupfs.registry_tag)

    @property
    def size_mib(self) -> int:
        return -(-self.size // MIB)

    @property
    def source(self) -> str:
        return source_name(self.tag)

    def options(self) -> str:
        return f"size={self.size_mib}m,nr_inodes={self.inodes},mode=0755,uid=0,gid=0"

    def journal_entry(self) -> dict[str, object]:
        return {"op": "storage", "path": str(self.path), "source": self.source,
                "size": self.size, "inodes": self.inodes}

    def create(self) -> None:
        """Mount the tmpfs over the (new, root's) run directory and make the
        home in it (0700, root's: the security stack hands it to the guest).
        What reserve made there (an empty home) is removed first, so nothing
        lies hidden under the mount."""
        parent = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
                         | os.O_CLOEXEC)
        try:
            st = os.stat(self.path.name, dir_fd=parent, follow_symlinks=False)
            if st.st_dev != os.fstat(parent).st_dev:
                raise StateError(f"{self.path} is a mount point already",
                                 hint="svirt gc unmounts what no record holds")
            run_fd = os.open(self.path.name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
                             | os.O_CLOEXEC, dir_fd=parent)
            try:
                try:
                    os.rmdir(HOME, dir_fd=run_fd)
                except FileNotFoundError:
                    pass
            finally:
                os.close(run_fd)
        finally:
            os.close(parent)
        _mount(self.source, self.path, self.options() + _rootcontext(self.path))
        try:
            os.mkdir(self.path / HOME, 0o700)
        except OSError as err:
            raise HostError(f"{self.path / HOME}: {err.strerror}") from err

    def usage(self) -> dict[str, int]:
        """bytes and inodes used and allowed (empty when it is not mounted)."""
        try:
            st = os.statvfs(self.path)
        except OSError:
            return {}
        return {"bytes": (st.f_blocks - st.f_bfree) * st.f_frsize,
                "bytes_max": st.f_blocks * st.f_frsize,
                "inodes": st.f_files - st.f_ffree, "inodes_max": st.f_files}


def plan(run_dir: Path, layer_sizes: list[int], tag: str, base_mib: int, inodes: int
         ) -> GuestStorage:
    """The guest's storage: ``base_mib`` plus each ephemeral layer's bound
    (``layer_sizes``: the bases' virtual sizes), ``inodes`` inodes."""
    size = base_mib * MIB + sum(layer_bound(s) for s in layer_sizes)
    return GuestStorage(run_dir, size, inodes, tag)


def host_memory() -> int:
    """MemTotal + SwapTotal in bytes (/proc/meminfo): what tmpfs pages can live in."""
    total = 0
    with open("/proc/meminfo", encoding="ascii", errors="replace") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("MemTotal", "SwapTotal") and value.split():
                total += int(value.split()[0]) * 1024
    return total


def _size_option(options: str) -> int | None:
    """The ``size=`` of a tmpfs's super options (the kernel writes it in k)."""
    for option in options.split(","):
        if option.startswith("size="):
            value = option[5:]
            scale = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}.get(value[-1:].lower(), 1)
            digits = value[:-1] if scale != 1 else value
            return int(digits) * scale if digits.isdigit() else None
    return None


def committed() -> int:
    """Bytes promised to guests' storage on this host: the ``size=`` of every
    svirt storage mount (source ``svirt-storage.*``, any registry's) in the
    mount table, each file system once (a mount seen at two points, through
    propagation, is one tmpfs)."""
    seen: dict[str, int] = {}
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
            for line in f:
                head, sep, tail = line.partition(" - ")
                fields, rest = head.split(), tail.split()
                if (not sep or len(fields) < 5 or len(rest) < 3 or rest[0] != "tmpfs"
                        or not _unescape(rest[1]).startswith(SOURCE + ".")):
                    continue
                size = _size_option(rest[2])
                if size is not None:
                    seen[fields[2]] = size  # major:minor: the file system's
    except OSError:
        pass
    return sum(seen.values())


def check_budget(planned: GuestStorage, percent: int) -> None:
    """Refuse ``planned`` when it and every storage mount already made on the
    host together would exceed ``percent`` of the host's RAM + swap: a tmpfs
    lives in memory, so caps past that are promises a global OOM keeps (the
    memory cgroup of each guest is raised by its cap, so no cgroup stops
    it).  Called under the host claims lock (launch serialises it)."""
    budget = host_memory() * percent // 100
    used = committed()
    if used + planned.size <= budget:
        return
    raise HostError(
        f"guest storage of {planned.size_mib} MiB (its ephemeral layers and home) does not "
        f"fit the host's storage budget: {used // MIB} MiB are promised to running guests, "
        f"of {budget // MIB} MiB ({percent}% of RAM + swap); a guest's storage is a tmpfs, "
        "so what it writes to an ephemeral disk is held in memory",
        hint="stop a guest, use a smaller base image for ephemeral disks (or a "
             "non-ephemeral disk), add swap, or raise guest_storage_budget_percent in the "
             "host config (/etc/svirt/svirt.toml)")


def _rootcontext(path: Path) -> str:
    """Under SELinux, the mount's root keeps the label the run directory had
    (a tmpfs root would otherwise be tmpfs_t: what an unjailed guest walks
    through changes type); "" without SELinux (the kernel refuses the option)."""
    if not os.path.exists("/sys/fs/selinux/enforce"):
        return ""
    try:
        label = os.getxattr(path, "security.selinux", follow_symlinks=False)
    except OSError:
        return ""
    text = label.rstrip(b"\0").decode("ascii", "replace")
    if not re.fullmatch(r"[A-Za-z0-9_.:,-]+", text):
        return ""
    return f',rootcontext="{text}"'


# ------------------------------------------------------------------ mounts
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _mount(source: str, target: Path, options: str) -> None:
    libc = _libc()
    if libc.mount(source.encode(), os.fsencode(target), b"tmpfs", MOUNT_FLAGS,
                  options.encode()) != 0:
        err = ctypes.get_errno()
        raise HostError(f"cannot mount the guest's storage (tmpfs) on {target}: "
                        f"{os.strerror(err)}",
                        hint="svirt needs root (CAP_SYS_ADMIN) in the host's mount namespace"
                        if err in (errno.EPERM, errno.EACCES) else None)


def _unescape(text: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), text)


def mounts() -> list[tuple[Path, str, str]]:
    """(mount point, fs type, source) of every mount of this mount namespace,
    in /proc/self/mountinfo's order (the last on a point is the visible one)."""
    out = []
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
            for line in f:
                head, sep, tail = line.partition(" - ")
                fields, rest = head.split(), tail.split()
                if sep and len(fields) >= 5 and len(rest) >= 2:
                    out.append((Path(_unescape(fields[4])), rest[0], _unescape(rest[1])))
    except OSError:
        pass
    return out


def _real(path: Path) -> Path:
    """``path`` as /proc/self/mountinfo names it: its parents' symlinks
    resolved (``/var/run`` is ``/run``; they are root's), not its last part."""
    return Path(os.path.realpath(path.parent)) / path.name


def mounted(path: Path, table: list[tuple[Path, str, str]] | None = None) -> str | None:
    """The source of the mount visible at ``path`` (None: no mount there)."""
    found = None
    real = _real(path)
    for point, _fstype, source in table if table is not None else mounts():
        if point == real:
            found = source
    return found


def remove(path: Path, source: str) -> bool:
    """Unmount the guest's storage at ``path`` (lazily when busy); whether
    there was one.  Every mount svirt stacked there goes; a mount of
    anything else there is left and raises StateError."""
    libc = _libc()
    removed = False
    for _ in range(8):  # a crash between two launches' mounts never stacks more
        visible = mounted(path)
        if visible is None:
            return removed
        if visible != source:
            raise StateError(f"{path}: a mount that is not the guest's storage ({visible}) "
                             "is there; left alone",
                             hint="unmount it by hand, then run svirt gc")
        target = os.fsencode(path)
        if libc.umount2(target, UMOUNT_NOFOLLOW) != 0:
            err = ctypes.get_errno()
            if err == errno.EBUSY:
                if libc.umount2(target, UMOUNT_NOFOLLOW | MNT_DETACH) == 0:
                    removed = True
                    continue
                err = ctypes.get_errno()
            if err in (errno.EINVAL, errno.ENOENT):
                return removed  # gone meanwhile
            raise StateError(f"cannot unmount the guest's storage at {path}: "
                             f"{os.strerror(err)}", hint="svirt gc retries")
        removed = True
    raise StateError(f"{path}: storage mounts keep appearing")


def sweep(run_dirs: Path, tag: str, has_record: Callable[[str], bool]) -> list[str]:
    """Unmount this registry's storage mounts (``RUN/guests/NAME.d``, source
    ``svirt-storage.TAG``) whose guest has no record; what was done."""
    report: list[str] = []
    source = source_name(tag)
    real = Path(os.path.realpath(run_dirs))
    points = sorted({p for p, fstype, src in mounts()
                     if fstype == "tmpfs" and src == source and p.parent == real
                     and p.name.endswith(".d")})
    for point in points:
        if has_record(point.name[:-2]):
            continue
        try:
            remove(run_dirs / point.name, source)
            report.append(f"storage {point}: unmounted (no record)")
        except StateError as err:
            report.append(f"storage {point}: {err.message}")
    return report


def undo(entry: dict[str, object], run_dirs: Path) -> str | None:
    """Release's step for a journal entry ``{"op": "storage"}``: unmount."""
    path = Path(str(entry["path"]))
    if path.parent != run_dirs:
        raise StateError(f"{path} is not a run directory of this registry")
    if remove(path, str(entry.get("source") or SOURCE)):
        return f"storage {path}: unmounted"
    return None


__all__ = ["GuestStorage", "plan", "remove", "sweep", "undo", "layer_bound", "mounts",
           "mounted", "check_budget", "committed", "host_memory"]
