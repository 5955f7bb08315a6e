"""SMACK: a per-guest label ``svirt-<slot>``.

The hypervisor writes its label to /proc/self/attr/current in the child
(before DAC drops CAP_MAC_ADMIN); private objects carry the same label in
``security.SMACK64``; read-only objects get the floor label ``_`` (readable
by every label) and shared writable ones ``svirt-shared``.  SMACK grants
nothing between distinct labels unless a rule says so, so no rule is needed
for isolation.  This host has no SMACK: the driver is exercised through its
xattrs only (``tests/unit``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from svirt.backends.base import Access
from svirt.errors import SecurityError
from svirt.host import HostInfo
from svirt.security.base import DriverPlan, Label, LiveProcesses, Original, PlannedObject
from svirt.security.files import get_xattr, set_xattr
from svirt.spec import GuestSpec

XATTR = "security.SMACK64"


class SmackDriver:
    name = "smack"

    def check_available(self, host: HostInfo) -> None:
        if not host.smack:
            raise SecurityError("security model smack asked for, but SMACK is not active here")

    def slot_usable(self, slot: int, live: LiveProcesses) -> bool:
        return True

    def label_for(
        self, spec: GuestSpec, slot: int, taken: Sequence[Label], live: LiveProcesses
    ) -> Label:
        label = spec.security.label or f"svirt-{slot}"
        return Label(self.name, label, label, "_", "svirt-shared")

    def slot_claim(self, slot: int) -> str | None:
        return f"smack-svirt-{slot}"  # the label a slot gives (a spec's own label aside)

    def label_claim(self, spec: GuestSpec, label: Label) -> str | None:
        return None

    def wants_change(self, fd: int, st_mode: int, access: Access, label: Label) -> bool:
        return True

    def held_by_other(self, fd: int, label: Label, live: LiveProcesses) -> str | None:
        return None  # the registry's object table is the check for SMACK

    def snapshot(self, fd: int) -> Original:
        raw = get_xattr(fd, XATTR)
        return {"label": raw.decode() if raw is not None else None}

    def apply(self, fd: int, st_mode: int, access: Access, label: Label) -> None:
        set_xattr(fd, XATTR, label.for_access(access).encode())

    def restore(self, fd: int, original: Original, label: Label, *, last: bool) -> None:
        if last:
            old = original.get("label")
            want = old.encode() if old else None
            if get_xattr(fd, XATTR) != want:
                set_xattr(fd, XATTR, want)

    def child_setup(self, label: Label, spec: GuestSpec) -> Callable[[], None]:
        process = label.process

        def setup() -> None:
            Path("/proc/self/attr/current").write_text(process)

        return setup

    @contextmanager
    def creating_sockets(self, label: Label) -> Iterator[None]:
        yield

    def plan(self, spec: GuestSpec, label: Label, objects: Sequence[PlannedObject]
             ) -> DriverPlan:
        """The process label and each object's SMACK64 label, as apply() sets them."""
        from svirt.security.base import NOT_RELABELLED, ObjectPlan

        return DriverPlan(
            self.name, label.process,
            "written to /proc/self/attr/current before exec",
            tuple(ObjectPlan(True, f"{XATTR}={label.for_access(o.resource.access)}")
                  if o.resource.relabel else NOT_RELABELLED for o in objects))
