"""The security framework: Label, the Driver protocol and the driver stack.

A driver turns a slot into a :class:`Label` (process label, image label,
content label) and applies that label to one host object at a time, given as
an fd opened by :mod:`svirt.security.files` (never a path).  Drivers stack:
the launcher calls each in turn; a failure rolls back what earlier ones did.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

from svirt.backends.base import Access, Resource
from svirt.errors import SecurityError
from svirt.host import HostInfo, SELinuxMode
from svirt.procfs import (
    LiveProcesses as LiveProcesses,  # moved: svirt.procfs (re-export removed at merge)
)
from svirt.spec import GuestSpec, SecurityModel


@dataclass(frozen=True)
class Label:
    """One driver's labels for one guest."""

    driver: str
    process: str  # SELinux context, "uid:gid", SMACK label
    image: str  # private writable objects
    content: str  # read-only objects (kernel, initrd, backing files)
    shared: str  # writable objects shared between guests

    def for_access(self, access: Access) -> str:
        return {Access.RW: self.image, Access.RO: self.content, Access.SHARED: self.shared}[
            access
        ]

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
        the slot gives none (see :mod:`svirt.launcher.claims`)."""
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


def choose_models(spec: GuestSpec, host: HostInfo) -> list[SecurityModel]:
    """Which drivers to stack: SELinux + DAC where SELinux is on, AppArmor +
    DAC where AppArmor is, SMACK + DAC where SMACK is, else DAC."""
    model = spec.security.model
    if model is SecurityModel.NONE:
        return []
    if model is SecurityModel.AUTO:
        if host.selinux is not SELinuxMode.DISABLED:
            return [SecurityModel.SELINUX, SecurityModel.DAC]
        if host.apparmor:
            return [SecurityModel.APPARMOR, SecurityModel.DAC]
        if host.smack:
            return [SecurityModel.SMACK, SecurityModel.DAC]
        return [SecurityModel.DAC]
    if model is SecurityModel.DAC:
        return [SecurityModel.DAC]
    return [model, SecurityModel.DAC]


def make_driver(model: SecurityModel, **options: Any) -> Driver:
    if model is SecurityModel.SELINUX:
        from svirt.security.selinux import SELinuxDriver

        return SELinuxDriver(**options.get("selinux", {}))
    if model is SecurityModel.SMACK:
        from svirt.security.smack import SmackDriver

        return SmackDriver()
    if model is SecurityModel.APPARMOR:
        from svirt.security.apparmor import AppArmorDriver

        return AppArmorDriver(**options.get("apparmor", {}))
    if model is SecurityModel.DAC:
        from svirt.security.dac import DacDriver

        return DacDriver(**options.get("dac", {}))
    raise SecurityError(f"no driver for security model {model}")


def build_stack(spec: GuestSpec, host: HostInfo, **options: Any) -> list[Driver]:
    drivers = [make_driver(m, **options) for m in choose_models(spec, host)]
    for driver in drivers:
        driver.check_available(host)
    return drivers
