"""SMACK: a per-guest label ``svirt-<slot>``.

The hypervisor's label is written to ``/proc/self/attr/smack/current`` in
the child (``attr/current`` on kernels before the per-LSM files), before DAC
drops CAP_MAC_ADMIN; it is inherited by tini and the hypervisor across exec.
Private objects carry the same label in ``security.SMACK64``; read-only
objects get the floor label ``_`` (every label may read and execute it) and
shared writable ones ``svirt-shared``, which a guest may write only through
a rule loaded for it at launch and removed at release (journalled, so ``gc``
removes it after a crash): ``policy/smack/svirt.rules`` explains them.

A spec's own label (``security.label`` under model ``smack``) may be any
SMACK label but the shared ones and ``svirt-*``: those are the labels slots
give, and a static one would equal another guest's.

SMACK grants nothing between distinct labels unless a rule says so: across
guests, files, /proc, signals, ptrace and sockets are refused with no rule
at all.  Sockets take the label of the task that creates them, so the
launcher creates a guest's sockets under the guest's label
(:meth:`SmackDriver.creating_sockets`); the jail's tmpfs mounts are labelled
with the ``smackfsroot``/``smackfsdef`` options (:func:`tmpfs_options`).

Proven under an enforcing SMACK kernel in the lab's SMACK pass (Debian's
User-Mode-Linux kernel, ``tests/lab/test_lab_smack.py``).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from svirt.errors import SecurityError
from svirt.host import HostInfo
from svirt.procfs import LiveProcesses
from svirt.resources import Access
from svirt.security.base import (
    NOT_RELABELLED,
    DriverPlan,
    Label,
    LaunchObjects,
    ObjectPlan,
    Original,
    PlannedObject,
    PlannedStep,
)
from svirt.security.files import get_xattr, set_xattr
from svirt.spec import GuestSpec, SecurityModel, smack_label_valid

XATTR = "security.SMACK64"
PREFIX = "svirt-"
SHARED = "svirt-shared"
FLOOR = "_"
STAR = "*"
SMACKFS = "/sys/fs/smackfs"
DEV = "/dev"
#: the access a guest has to its shared objects: read, write, append
SHARED_ACCESS = "rwa"
def attr_path(pid: str = "self") -> str:
    """SMACK's own process attribute (``attr/smack/current`` since Linux
    5.1; ``attr/current`` before)."""
    own = f"/proc/{pid}/attr/smack/current"
    return own if os.path.exists(own) else f"/proc/{pid}/attr/current"


def _read_label(path: str) -> str:
    with open(path, "rb") as f:
        return f.read().rstrip(b"\0\n").decode(errors="replace")


def _write_label(path: str, label: str) -> None:
    with open(path, "wb", buffering=0) as f:
        f.write(label.encode())


def tmpfs_options(label: Label) -> str:
    """Mount options giving a jail tmpfs (its root, /tmp, /dev/shm) and every
    file made in it the guest's label."""
    return f"smackfsroot={label.image},smackfsdef={label.image}"


def load_rule(subject: str, obj: str, access: str) -> None:
    """One rule through ``load2`` (``-`` as access removes it)."""
    try:
        with open(f"{SMACKFS}/load2", "wb", buffering=0) as f:
            f.write(f"{subject} {obj} {access}".encode())
    except OSError as err:
        raise SecurityError(f"SMACK rule {subject} {obj} {access}: {err.strerror}",
                            hint=f"is smackfs mounted on {SMACKFS}?") from err


class SmackDriver:
    name = "smack"

    def check_available(self, host: HostInfo) -> None:
        if not host.smack:
            raise SecurityError("security model smack asked for, but SMACK is not active here")

    def slot_usable(self, slot: int, live: LiveProcesses) -> bool:
        return f"{PREFIX}{slot}" not in live.contexts

    def label_for(
        self, spec: GuestSpec, slot: int, taken: Sequence[Label], live: LiveProcesses
    ) -> Label:
        # a spec's own label only under model smack (under auto it is an SELinux context)
        own = spec.security.label if spec.security.model is SecurityModel.SMACK else None
        label = own or f"{PREFIX}{slot}"
        if not smack_label_valid(label):
            raise SecurityError(f"{label!r} is not a SMACK label", label=label,
                                hint="1-255 characters, no white space, slash or quote")
        if label in (FLOOR, SHARED, "*", "^", "@"):
            raise SecurityError(f"{label!r} is a label every guest may use, not a guest's own",
                                label=label)
        if own is not None and own.startswith(PREFIX):
            # svirt-N is the label of slot N: another guest's, now or later
            raise SecurityError(
                f"security.label {own!r}: labels named {PREFIX}* are the ones svirt gives "
                "its guests (svirt-N is slot N's); a static one would equal another guest's",
                label=own, hint=f"name the guest's label without the {PREFIX} prefix")
        return Label(self.name, label, label, FLOOR, SHARED)

    def slot_claim(self, slot: int) -> str | None:
        return f"smack-{PREFIX}{slot}"  # the label a slot gives (a spec's own label aside)

    def label_claim(self, spec: GuestSpec, label: Label) -> str | None:
        return None  # a static label is the user's choice, and may be shared

    def wants_change(self, fd: int, st_mode: int, access: Access, label: Label) -> bool:
        return True

    def held_by_other(self, fd: int, label: Label, live: LiveProcesses) -> str | None:
        raw = get_xattr(fd, XATTR)
        current = raw.rstrip(b"\0").decode(errors="replace") if raw is not None else ""
        if current in ("", label.image, FLOOR, SHARED) or current not in live.contexts:
            return None
        return f"it is labelled {current}, the label of a running process"

    def snapshot(self, fd: int) -> Original:
        raw = get_xattr(fd, XATTR)
        return {"label": raw.rstrip(b"\0").decode() if raw is not None else None}

    def apply(self, fd: int, st_mode: int, access: Access, label: Label) -> None:
        want = label.for_access(access)
        try:
            set_xattr(fd, XATTR, want.encode())
        except OSError as err:
            raise SecurityError(f"setting SMACK label {want}: {err.strerror}",
                                label=want) from err

    def restore(self, fd: int, original: Original, label: Label, *, last: bool) -> None:
        if last:
            old = original.get("label")
            want = old.encode() if old else None
            if get_xattr(fd, XATTR) != want:
                set_xattr(fd, XATTR, want)

    def child_setup(self, label: Label, spec: GuestSpec) -> Callable[[], None]:
        process = label.process
        path = attr_path()

        def setup() -> None:
            # still root: CAP_MAC_ADMIN lets it take any label; DAC drops it next
            _write_label(path, process)

        return setup

    @contextmanager
    def creating_sockets(self, label: Label) -> Iterator[None]:
        """The calling thread runs with the guest's label while the block makes
        sockets (their in/out labels) and socket files (their inode label), then
        goes back to its own; root keeps CAP_MAC_OVERRIDE meanwhile."""
        path = attr_path("thread-self")
        own = _read_label(path)
        _write_label(path, label.process)
        try:
            yield
        finally:
            _write_label(path, own)

    def plan(self, spec: GuestSpec, label: Label, objects: Sequence[PlannedObject]
             ) -> DriverPlan:
        """The process label and each object's SMACK64 label, as apply() sets them."""
        return DriverPlan(
            self.name, label.process,
            f"written to {attr_path()} before exec",
            tuple(ObjectPlan(True, f"{XATTR}={label.for_access(o.resource.access)}")
                  if o.resource.relabel else NOT_RELABELLED for o in objects))

    # ------------------------------------------------------- launch hooks
    def launch_steps(self, objects: LaunchObjects, label: Label) -> list[PlannedStep]:
        """The device nodes the hypervisor opens labelled for every guest, and
        the SMACK rules this guest needs: journalled, then loaded; release
        removes the rules."""
        # QEMU's tap fds are the host's /dev/net/tun opened by the launcher: the
        # hypervisor's ioctls on them are checked against that node's label
        tun = ["net/tun"] if objects.spec.nics else []
        devices = list(dict.fromkeys([*objects.devices, *tun]))
        rules = self.rules_for(label, [r.access for r in objects.resources if r.relabel])
        return [RulesStep(self, tuple(devices), tuple(rules))]

    def tmpfs_options(self, label: Label) -> str:
        return tmpfs_options(label)

    # ------------------------------------------------------------ rules
    def rules_for(self, label: Label, accesses: Sequence[Access]) -> list[tuple[str, str, str]]:
        """The rules a guest needs: write access to ``svirt-shared`` when it
        holds a shared writable object; nothing else (its own label needs no
        rule, and the floor is readable by all)."""
        if Access.SHARED in accesses:
            return [(label.process, label.shared, SHARED_ACCESS)]
        return []

    def load_rules(self, rules: Sequence[tuple[str, str, str]]) -> None:
        for subject, obj, access in rules:
            load_rule(subject, obj, access)

    def label_devices(self, names: Sequence[str]) -> list[str]:
        """Give the device nodes a hypervisor uses (``null``, ``kvm``,
        ``net/tun``...) the star label ``*`` when they have none or the floor
        label ``_``, which no guest may write: ``*`` is SMACK's label for
        objects every process may use (DAC still decides who opens them), the
        label SMACK distributions' udev rules give device nodes.  The jail
        binds the host's nodes, so this is a host-wide change, the one svirt
        makes and leaves in place (host setup, like a policy's device types).
        A node the administrator labelled otherwise is left as it is.  The
        nodes changed are returned."""
        changed = []
        for name in names:
            path = f"{DEV}/{name}"
            try:
                fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
            except FileNotFoundError:
                continue  # launch refuses a missing /dev/kvm with its own error
            except OSError as err:
                raise SecurityError(f"{path}: {err.strerror}") from err
            try:
                if not stat.S_ISCHR(os.fstat(fd).st_mode):
                    raise SecurityError(f"{path} is not a character device")
                if get_xattr(fd, XATTR) in (None, FLOOR.encode()):
                    set_xattr(fd, XATTR, STAR.encode())
                    changed.append(path)
            finally:
                os.close(fd)
        return changed


@dataclass(frozen=True)
class RulesStep:
    """The devices' labels and a guest's rules as a planned step of its launch."""

    driver: SmackDriver
    devices: tuple[str, ...]
    rules: tuple[tuple[str, str, str], ...]

    def journal_entry(self) -> dict[str, Any] | None:
        if not self.rules:
            return None
        return {"op": "smack-rules", "rules": [list(r) for r in self.rules]}

    def create(self) -> None:
        self.driver.label_devices(list(self.devices))
        if self.rules:
            self.driver.load_rules(self.rules)


def unload_rules(rules: Sequence[Sequence[str]]) -> list[str]:
    """Remove the journalled rules (release, gc); what was removed."""
    done = []
    for subject, obj, _access in rules:
        if os.path.exists(f"{SMACKFS}/load2"):
            load_rule(subject, obj, "-")
            done.append(f"{subject} {obj}")
    return done
