"""DAC: every guest runs as a uid and gid of its own.

A slot maps to ``uid_base + slot`` (and the same gid).  Private writable
objects are chowned to that uid with mode 0600 (0700 for directories), so no
other guest uid can open them.  Read-only objects that others can already
read are left alone; otherwise the guest gets a POSIX ACL entry of its own
(``user:UID:r``), so ownership is never handed over and several guests can
share a kernel.  Shared writable objects get ``user:UID:rw`` entries.
Private read-only objects (a seed: root's, 0400) get ``user:UID:r`` and
nothing else: any other uid is refused by the mode, a write by the ACL.

In the child, after fork: setgroups([]) (or only the kvm group when KVM is
used: /dev/kvm is root:kvm 0660 and QEMU opens it by path), setresgid,
every capability dropped from the bounding set, setresuid.  After that the
process cannot regain root.  /dev/net/tun is 0666 and tap fds are passed.
"""

from __future__ import annotations

import grp
import os
import pwd
import stat
import struct
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from svirt.errors import SecurityError
from svirt.host import HostInfo
from svirt.procfs import LiveProcesses
from svirt.resources import Access, Resource
from svirt.security.base import (
    NOT_RELABELLED,
    DriverPlan,
    Label,
    ObjectPlan,
    Original,
    PlannedObject,
)
from svirt.security.files import get_xattr, set_xattr
from svirt.security.inodes import proc_fd
from svirt.spec import Accel, Backend, GuestSpec

DEFAULT_UID_BASE = 1_500_000  # above any account uid; 65536 slots fit below 2^31
DEFAULT_UID_COUNT = 65_536

ACL_XATTR = "system.posix_acl_access"
_ACL_VERSION = 2
_ACL_USER_OBJ, _ACL_USER, _ACL_GROUP_OBJ, _ACL_GROUP, _ACL_MASK, _ACL_OTHER = (
    0x01, 0x02, 0x04, 0x08, 0x10, 0x20)
_ENTRY = struct.Struct("<HHI")
_UNDEFINED_ID = 0xFFFFFFFF


def parse_acl(raw: bytes) -> list[tuple[int, int, int]]:
    (version,) = struct.unpack_from("<I", raw)
    if version != _ACL_VERSION:
        raise SecurityError(f"unknown POSIX ACL version {version}")
    return [_ENTRY.unpack_from(raw, off) for off in range(4, len(raw), _ENTRY.size)]


def format_acl(entries: Sequence[tuple[int, int, int]]) -> bytes:
    return struct.pack("<I", _ACL_VERSION) + b"".join(
        _ENTRY.pack(*e) for e in sorted(entries, key=lambda e: (e[0], e[2])))


def acl_with_user(raw: bytes | None, mode: int, uid: int, perm: int) -> bytes:
    """The ACL ``raw`` (or the one the mode implies) plus ``user:uid:perm``."""
    if raw is None:
        entries = [
            (_ACL_USER_OBJ, (mode >> 6) & 7, _UNDEFINED_ID),
            (_ACL_GROUP_OBJ, (mode >> 3) & 7, _UNDEFINED_ID),
            (_ACL_OTHER, mode & 7, _UNDEFINED_ID),
        ]
    else:
        entries = [e for e in parse_acl(raw) if not (e[0] == _ACL_USER and e[2] == uid)]
    entries = [e for e in entries if e[0] != _ACL_MASK]
    entries.append((_ACL_USER, perm, uid))
    mask = 0
    for tag, p, _ in entries:
        if tag in (_ACL_USER, _ACL_GROUP_OBJ, _ACL_GROUP):
            mask |= p
    entries.append((_ACL_MASK, mask, _UNDEFINED_ID))
    return format_acl(entries)


def acl_without_user(raw: bytes, uid: int) -> bytes | None:
    """``raw`` minus ``user:uid``; None when only the mode's entries are left."""
    entries = [e for e in parse_acl(raw) if not (e[0] == _ACL_USER and e[2] == uid)]
    extended = [e for e in entries if e[0] in (_ACL_USER, _ACL_GROUP)]
    if not extended:
        return None
    entries = [e for e in entries if e[0] != _ACL_MASK]
    mask = 0
    for tag, p, _ in entries:
        if tag in (_ACL_USER, _ACL_GROUP_OBJ, _ACL_GROUP):
            mask |= p
    entries.append((_ACL_MASK, mask, _UNDEFINED_ID))
    return format_acl(entries)


def _ids_in_use(path: str, index: int) -> set[int]:
    ids: set[int] = set()
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                parts = line.split(":")
                if len(parts) > index and parts[index].isdigit():
                    ids.add(int(parts[index]))
    except OSError:
        pass
    return ids


class DacDriver:
    name = "dac"

    def __init__(self, uid_base: int | None = None, uid_count: int | None = None) -> None:
        env_base = os.environ.get("SVIRT_UID_BASE")
        self.uid_base = uid_base if uid_base is not None else (
            int(env_base) if env_base else DEFAULT_UID_BASE)
        self.uid_count = uid_count if uid_count is not None else DEFAULT_UID_COUNT

    # ---------------------------------------------------------------- host
    def check_available(self, host: HostInfo) -> None:
        if os.geteuid() != 0:
            raise SecurityError(
                "the DAC driver needs root to run guests under their own uids",
                hint="run svirt as root, or set security.model = \"none\"",
            )
        self.check_range()

    def check_range(
        self, passwd: str = "/etc/passwd", group: str = "/etc/group"  # noqa: S107
    ) -> None:
        lo, hi = self.uid_base, self.uid_base + self.uid_count
        if lo < 1000 or hi > 2**31:
            raise SecurityError(f"DAC uid range {lo}..{hi - 1} is not allowed")
        for path, what in ((passwd, "user"), (group, "group")):
            clash = sorted(i for i in _ids_in_use(path, 2) if lo <= i < hi)
            if clash:
                raise SecurityError(
                    f"DAC uid range {lo}..{hi - 1} overlaps {what} id {clash[0]} in {path}",
                    hint="set SVIRT_UID_BASE to a range no account uses",
                )

    def uid(self, slot: int) -> int:
        if not 0 <= slot < self.uid_count:
            raise SecurityError(f"slot {slot} is outside the DAC range of {self.uid_count}")
        return self.uid_base + slot

    def slot_usable(self, slot: int, live: LiveProcesses) -> bool:
        return self.uid(slot) not in live.uids

    def label_for(
        self, spec: GuestSpec, slot: int, taken: Sequence[Label], live: LiveProcesses
    ) -> Label:
        uid = self.uid(slot)
        ids = f"{uid}:{uid}"
        return Label(self.name, ids, ids, ids, ids)

    def slot_claim(self, slot: int) -> str | None:
        return f"uid-{self.uid(slot)}"

    def label_claim(self, spec: GuestSpec, label: Label) -> str | None:
        return None  # the uid is the slot's: claimed by slot_claim

    # ------------------------------------------------------------- objects
    def wants_change(self, fd: int, st_mode: int, access: Access, label: Label) -> bool:
        if access is Access.RO:
            return not _others_can(st_mode, stat.S_ISDIR(st_mode))
        return True

    def held_by_other(self, fd: int, label: Label, live: LiveProcesses) -> str | None:
        owner = os.stat(proc_fd(fd)).st_uid
        ours, _ = _ids(label)
        if owner == ours or not self.uid_base <= owner < self.uid_base + self.uid_count:
            return None
        if owner in live.uids:
            return f"it is owned by uid {owner}, another guest's, and that guest still runs"
        return None

    def snapshot(self, fd: int) -> Original:
        st = os.stat(proc_fd(fd))
        acl = get_xattr(fd, ACL_XATTR)
        return {"uid": st.st_uid, "gid": st.st_gid, "mode": stat.S_IMODE(st.st_mode),
                "acl": acl.hex() if acl is not None else None}

    def apply(self, fd: int, st_mode: int, access: Access, label: Label) -> None:
        uid, gid = _ids(label)
        is_dir = stat.S_ISDIR(st_mode)
        if access is Access.RW:
            os.chown(proc_fd(fd), uid, gid)
            os.chmod(proc_fd(fd), _private_mode(is_dir))
            return
        if access is Access.RO and _others_can(st_mode, is_dir):
            return
        if access is Access.PRIVATE_RO and st_mode & 0o077:
            raise SecurityError(f"a private read-only object has mode "
                                f"{stat.S_IMODE(st_mode):04o}: others than its guest may "
                                "use it", hint="it must be its owner's alone (0400)")
        set_xattr(fd, ACL_XATTR, acl_with_user(get_xattr(fd, ACL_XATTR), st_mode, uid,
                                               _acl_perm(access, is_dir)))

    def restore(self, fd: int, original: Original, label: Label, *, last: bool) -> None:
        uid = _ids(label)[0] if label.process else -1
        # only what differs is written: a read-only object on read-only
        # media needs no change and must not fail at stop
        if last:
            st = os.stat(proc_fd(fd))
            if (st.st_uid, st.st_gid) != (original["uid"], original["gid"]):
                os.chown(proc_fd(fd), original["uid"], original["gid"])
            acl = bytes.fromhex(original["acl"]) if original["acl"] is not None else None
            if get_xattr(fd, ACL_XATTR) != acl:
                set_xattr(fd, ACL_XATTR, acl)
            st = os.stat(proc_fd(fd))
            if stat.S_IMODE(st.st_mode) != original["mode"]:
                os.chmod(proc_fd(fd), original["mode"])
            return
        if not label.process:
            return  # a holder without a DAC identity changed nothing
        current = get_xattr(fd, ACL_XATTR)
        if current is not None:
            stripped = acl_without_user(current, uid)
            if stripped != current:
                set_xattr(fd, ACL_XATTR, stripped)

    def check_objects(self, resources: Sequence[Resource]) -> None:
        """The guest's uid must be able to walk to each object."""
        for res in resources:
            for parent in res.path.parents:
                try:
                    st = parent.stat()
                except OSError as err:
                    raise SecurityError(f"{parent}: {err.strerror}", path=parent) from err
                if not st.st_mode & 0o001:
                    raise SecurityError(
                        f"{res.path}: directory {parent} is not searchable by other users, "
                        "so the guest's own uid cannot reach the file",
                        path=res.path,
                        hint="keep images in a directory others may traverse "
                             f"(chmod o+x {parent})",
                    )

    # --------------------------------------------------------------- child
    def child_setup(self, label: Label, spec: GuestSpec) -> Callable[[], None]:
        uid, gid = _ids(label)
        groups = _child_groups(spec)
        import prctl  # imported here, in the parent: an import after fork costs ~3 ms

        return lambda: drop_privileges(uid, gid, groups, prctl)

    @contextmanager
    def creating_sockets(self, label: Label) -> Iterator[None]:
        yield

    # ---------------------------------------------------------------- plan
    def plan(self, spec: GuestSpec, label: Label, objects: Sequence[PlannedObject]
             ) -> DriverPlan:
        uid, gid = _ids(label)
        groups = _child_groups(spec)
        names = ",".join(f"{_group_name(g)}({g})" for g in groups) or "none"
        process = f"uid {uid} gid {gid} groups {names}"
        return DriverPlan(self.name, process, "no capabilities: bounding set emptied",
                          tuple(self._plan_object(o, label) for o in objects))

    def _plan_object(self, obj: PlannedObject, label: Label) -> ObjectPlan:
        """What apply() does to the object, decided by wants_change() when it exists."""
        res = obj.resource
        if not res.relabel:
            return NOT_RELABELLED
        uid, gid = _ids(label)
        mode = obj.st_mode
        if mode is None:  # the launch creates it, or its walk refuses it
            if res.access is Access.RW:
                return ObjectPlan(True, f"owner {uid}:{gid} mode 0600 (directory 0700)",
                                  "when it exists")
            if res.access is Access.RO:
                return ObjectPlan(True, f"ACL user:{uid}:r (directory r-x)",
                                  "unchanged if others may read it by then")
            if res.access is Access.PRIVATE_RO:
                return ObjectPlan(True, f"ACL user:{uid}:r",
                                  "for this guest alone: root's, mode 0400")
            return ObjectPlan(True, f"ACL user:{uid}:rw (directory rwx)", "when it exists")
        is_dir = stat.S_ISDIR(mode)
        # apply() leaves a read-only object others may read as it is (as wants_change says)
        wanted = (self.wants_change(obj.fd, mode, res.access, label) if obj.fd is not None
                  else not (res.access is Access.RO and _others_can(mode, is_dir)))
        if not wanted or (res.access is Access.RO and _others_can(mode, is_dir)):
            return ObjectPlan(False, "unchanged",
                              f"others may read it already: mode {stat.S_IMODE(mode):04o}")
        if res.access is Access.RW:
            return ObjectPlan(True, f"owner {uid}:{gid} mode {_private_mode(is_dir):04o}")
        perm = _acl_perm(res.access, is_dir)
        text = "".join(c if perm & bit else "-" for c, bit in (("r", 4), ("w", 2), ("x", 1)))
        return ObjectPlan(True, f"ACL user:{uid}:{text}",
                          f"owner and mode stay: mode {stat.S_IMODE(mode):04o}")


def _ids(label: Label) -> tuple[int, int]:
    return label.ids()


def _private_mode(is_dir: bool) -> int:
    """The mode of a guest's private writable object."""
    return 0o700 if is_dir else 0o600


def _acl_perm(access: Access, is_dir: bool) -> int:
    """The permission bits of the guest's ACL entry on a read-only or shared object."""
    return (4 if access.read_only else 6) | (1 if is_dir else 0)


def _child_groups(spec: GuestSpec) -> list[int]:
    """The hypervisor's only supplementary group: kvm, when KVM may be used
    (QEMU not pinned to TCG; UML and lguest never open /dev/kvm)."""
    if spec.backend is not Backend.QEMU or spec.accel is Accel.TCG:
        return []
    try:
        return [grp.getgrnam("kvm").gr_gid]
    except KeyError:
        return []


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def _others_can(mode: int, is_dir: bool) -> bool:
    need = stat.S_IROTH | (stat.S_IXOTH if is_dir else 0)
    return mode & need == need


def drop_privileges(uid: int, gid: int, groups: list[int], prctl: Any) -> None:
    """Run in the child: become uid/gid for good, with no capabilities."""
    os.setgroups(groups)
    os.setresgid(gid, gid, gid)
    prctl.capbset.limit()  # empty the bounding set (needs CAP_SETPCAP: still root)
    os.setresuid(uid, uid, uid)
    if os.getresuid() != (uid, uid, uid) or os.getresgid() != (gid, gid, gid):
        raise SecurityError(f"could not switch to uid {uid} gid {gid}")
    if prctl.cap_permitted.setuid or prctl.cap_effective.sys_admin:
        raise SecurityError("capabilities survived the uid switch")


def uid_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)
