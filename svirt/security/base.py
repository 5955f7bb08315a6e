"""The security framework: Label, the Driver protocol and its optional hooks.

A driver turns a slot into a :class:`Label` (process label, image label,
content label) and applies that label to one host object at a time, given as
an fd opened by :mod:`svirt.security.files` (never a path).  Drivers stack:
:class:`svirt.security.stack.SecurityStack` calls each in turn, and a failure
rolls back what earlier ones did.  This module names no driver: the lookup
(model -> driver) lives in :mod:`svirt.security.stack`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from svirt.errors import SecurityError
from svirt.host import HostInfo
from svirt.procfs import LiveProcesses
from svirt.resources import Access, Resource
from svirt.spec import GuestSpec

#: a DAC label's process: "uid:gid"
DAC_IDS = re.compile(r"[0-9]{1,10}:[0-9]{1,10}")
_MCS_PAIR = re.compile(r"s\d+:c(\d+),c(\d+)")


def level_pair(level: str) -> tuple[int, int] | None:
    """The category pair (a <= b) of an MCS level like ``s0:c1,c2`` (of a
    range, its low level), else None: the one parser of a guest's pair."""
    m = _MCS_PAIR.fullmatch(level.split("-", 1)[0])
    if not m:
        return None
    a, b = int(m.group(1)), int(m.group(2))
    return (a, b) if a <= b else (b, a)


def mcs_pair(context: str) -> tuple[int, int] | None:
    """The category pair of an SELinux context's level (``u:r:t:s0:c1,c2``),
    else None (no level, or not a pair)."""
    parts = context.strip().rstrip("\0").split(":", 3)
    return level_pair(parts[3]) if len(parts) == 4 else None


@dataclass(frozen=True)
class Label:
    """One driver's labels for one guest."""

    driver: str
    process: str  # SELinux context, "uid:gid", SMACK label
    image: str  # private objects (writable, and private read-only: a seed)
    content: str  # read-only objects (kernel, initrd, backing files)
    shared: str  # writable objects shared between guests

    def for_access(self, access: Access) -> str:
        return {Access.RW: self.image, Access.RO: self.content, Access.SHARED: self.shared,
                Access.PRIVATE_RO: self.image}[access]

    def to_dict(self) -> dict[str, str]:
        return {
            "driver": self.driver,
            "process": self.process,
            "image": self.image,
            "content": self.content,
            "shared": self.shared,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, str]) -> Label:
        return cls(data["driver"], data["process"], data["image"], data["content"],
                   data["shared"])

    def ids(self) -> tuple[int, int]:
        """The uid and gid of a DAC label (its process is ``uid:gid``)."""
        if not DAC_IDS.fullmatch(self.process):
            raise SecurityError(f"the {self.driver} label {self.process!r} is not uid:gid",
                                label=self.process)
        uid, gid = self.process.split(":")
        return int(uid), int(gid)

    def mcs_pair(self) -> tuple[int, int] | None:
        """The category pair of an SELinux label's process context, else None."""
        return mcs_pair(self.process)


def guest_ids(labels: Mapping[str, Label]) -> tuple[int, int] | None:
    """The guest's uid and gid under DAC (None: no DAC label)."""
    dac = labels.get("dac")
    return dac.ids() if dac is not None else None


Original = dict[str, Any]  # what a driver saved of an object before changing it


class ConfinementWarning(UserWarning):
    """A launch goes ahead with less confinement than its labels say: SELinux
    permissive, a label the kernel did not take, an AppArmor profile in
    complain mode.  Issued with :func:`warnings.warn` on every launch (the
    CLI prints it, the service returns it in its answer)."""


@dataclass(frozen=True)
class PlannedObject:
    """One of a guest's objects as :meth:`Driver.plan` sees it: the resource,
    and when it exists, an ``O_PATH`` fd from the launch's own root walk and
    its mode (both None when the launch creates it, or the walk refused it)."""

    resource: Resource
    fd: int | None = None
    st_mode: int | None = None


@dataclass(frozen=True)
class ObjectPlan:
    """What one driver will do to one object: ``change`` False when it leaves
    the object alone; ``setting`` the exact label, owner and mode, ACL entry
    or profile rule; ``note`` why (left alone, or depends on the object)."""

    change: bool
    setting: str
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"change": self.change, "setting": self.setting, "note": self.note}


#: what every driver that labels objects does with a ``relabel = false`` object
NOT_RELABELLED = ObjectPlan(False, "unchanged", "relabel = false: left as it is")


@dataclass(frozen=True)
class DriverPlan:
    """One driver's plan for one guest: the process's identity, one
    :class:`ObjectPlan` per object (in order), and what it cannot enforce."""

    driver: str
    process: str
    process_note: str = ""
    objects: tuple[ObjectPlan, ...] = ()
    warnings: tuple[str, ...] = ()


class Driver(Protocol):
    name: str

    def check_available(self, host: HostInfo) -> None:
        """Raise SecurityError when this driver cannot work on this host."""
        ...

    def slot_usable(self, slot: int, live: LiveProcesses) -> bool:
        """False when a live process already runs with this slot's identity."""
        ...

    def label_for(
        self, spec: GuestSpec, slot: int, taken: Sequence[Label], live: LiveProcesses
    ) -> Label: ...

    def slot_claim(self, slot: int) -> str | None:
        """The host-wide identity the slot alone gives a guest (DAC:
        ``uid-1500003``), which no two guests on the host may share; None when
        the slot gives none (see :mod:`svirt.claims.host`)."""
        ...

    def label_claim(self, spec: GuestSpec, label: Label) -> str | None:
        """The host-wide identity ``label_for`` picked apart from the slot
        (SELinux: ``mcs-c3-c9``); None when there is none or it may be shared
        (a static label is the user's choice)."""
        ...

    def wants_change(self, fd: int, st_mode: int, access: Access, label: Label) -> bool: ...

    def held_by_other(self, fd: int, label: Label, live: LiveProcesses) -> str | None:
        """Why the object already belongs to another live guest, else None
        (catches guests started by other tools, which the registry misses)."""
        ...

    def snapshot(self, fd: int) -> Original: ...

    def apply(self, fd: int, st_mode: int, access: Access, label: Label) -> None: ...

    def restore(self, fd: int, original: Original, label: Label, *, last: bool) -> None:
        """Put back what snapshot() saw (last holder) or drop this guest's part."""
        ...

    def child_setup(self, label: Label, spec: GuestSpec) -> Callable[[], None]:
        """A function run in the child after fork, before exec."""
        ...

    @contextmanager
    def creating_sockets(self, label: Label) -> Iterator[None]:
        """Sockets created inside this block carry the guest's label."""
        yield

    def plan(self, spec: GuestSpec, label: Label, objects: Sequence[PlannedObject]
             ) -> DriverPlan:
        """What this driver will give the process and each object for
        ``label`` (from :meth:`label_for`), computed as :meth:`apply` and
        :meth:`child_setup` would, changing nothing; and its warnings (what it
        cannot enforce on this host), which every launch issues."""
        ...


@runtime_checkable
class PlannedStep(Protocol):
    """A step a driver adds to a launch (a profile to load, rules to add):
    computed first, journalled (``journal_entry``, None: nothing to undo),
    then made (``create``); release undoes it from the journal entry."""

    def journal_entry(self) -> dict[str, Any] | None: ...

    def create(self) -> None: ...


@dataclass(frozen=True)
class LaunchObjects:
    """What a driver's launch steps are made from: the guest's resources,
    the hypervisor's real path, tini's path in the jail, whether KVM is used,
    the /dev nodes the hypervisor opens, the guest's run directory (root's)
    and the launcher's control directory when the guest writes to it."""

    spec: GuestSpec
    resources: tuple[Resource, ...]
    hypervisor: str
    init: str | None
    kvm: bool
    devices: tuple[str, ...]
    run_dir: Path
    control_dir: Path | None = None
    search_path: str = ""  # where a bare argv[0] is looked up (the child's PATH)


@dataclass(frozen=True)
class ExecFinding:
    """What a driver found on the exec'd hypervisor: a warning, or (``refuse``)
    a reason not to run it."""

    message: str
    refuse: bool = False
    label: str | None = None
    hint: str | None = None


# Optional driver hooks: a driver has them or not, and only the stack asks.
@runtime_checkable
class ChecksLabel(Protocol):
    def check_label(self, spec: GuestSpec, label: Label) -> None:
        """Refuse a label that cannot confine (before the launch warns)."""
        ...


@runtime_checkable
class ChecksObjects(Protocol):
    def check_objects(self, resources: Sequence[Resource]) -> None:
        """Refuse objects the guest could not reach with this driver's identity."""
        ...


@runtime_checkable
class HasLaunchSteps(Protocol):
    def launch_steps(self, objects: LaunchObjects, label: Label) -> list[PlannedStep]:
        """What this driver adds to the launch, before the spawn."""
        ...


@runtime_checkable
class HasTmpfsOptions(Protocol):
    def tmpfs_options(self, label: Label) -> str:
        """Mount options labelling the jail's tmpfs mounts as the guest's own."""
        ...


@runtime_checkable
class ChecksExec(Protocol):
    def after_exec(self, spec: GuestSpec, label: Label, pid: int) -> ExecFinding | None:
        """Read back the exec'd hypervisor's label: None when it is as planned."""
        ...


