"""The security stack: which drivers a guest gets, and every step run over all of them.

libvirt's ``security_stack.c`` is the model: one object owns the drivers,
runs each step over them in order and, when one driver fails to apply, undoes
the drivers already applied in reverse before the error goes up.  The
launcher and the registry call the stack, never a driver: what one driver
alone does (AppArmor's profile, SMACK's rules, the readback after exec, the
jail's tmpfs options) is an optional hook (:mod:`svirt.security.base`) the
stack asks each driver for.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, overload

from svirt.errors import SecurityError, SlotsExhausted, StateError
from svirt.host import HostInfo, SELinuxMode
from svirt.procfs import LiveProcesses
from svirt.resources import Access, Resource
from svirt.security.base import (
    ChecksExec,
    ChecksLabel,
    ChecksObjects,
    Driver,
    DriverPlan,
    ExecFinding,
    HasLaunchSteps,
    HasTmpfsOptions,
    Label,
    LaunchObjects,
    Original,
    PlannedObject,
    PlannedStep,
)
from svirt.spec import GuestSpec, SecurityModel

LABEL_PICKS = 64  # label_for calls per driver before its claims count as exhausted

#: hints for a label a file system refused, by errno
_RELABEL_HINTS = {
    30: "the file is on a read-only filesystem: use readonly = true, or copy it",
    1: "the file may be immutable (lsattr) or on a filesystem that refuses owners",
    95: "the filesystem does not support this (ACLs or xattrs)",
    28: "the disk is full",
}


def relabel_hint(errno_value: int | None) -> str | None:
    """What a person can do when a file system refused a label."""
    return _RELABEL_HINTS.get(errno_value or 0)


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


def build_stack(spec: GuestSpec, host: HostInfo, **options: Any) -> SecurityStack:
    drivers = [make_driver(m, **options) for m in choose_models(spec, host)]
    for driver in drivers:
        driver.check_available(host)
    return SecurityStack(drivers)


class SecurityStack(Sequence[Driver]):
    """A guest's drivers, in order (the MAC driver first, DAC last: its uid
    switch is the child's last step).  A sequence of drivers, so that code
    that loops over them still can; new code asks the stack."""

    def __init__(self, drivers: Iterable[Driver] = ()) -> None:
        self._drivers = tuple(drivers)

    @classmethod
    def of(cls, drivers: Sequence[Driver] | None) -> SecurityStack:
        """``drivers`` as a stack (a stack as it is)."""
        return drivers if isinstance(drivers, SecurityStack) else cls(drivers or ())

    @overload
    def __getitem__(self, index: int) -> Driver: ...

    @overload
    def __getitem__(self, index: slice) -> SecurityStack: ...

    def __getitem__(self, index: int | slice) -> Driver | SecurityStack:
        if isinstance(index, slice):
            return SecurityStack(self._drivers[index])
        return self._drivers[index]

    def __len__(self) -> int:
        return len(self._drivers)

    def __repr__(self) -> str:
        return f"SecurityStack({', '.join(self.names)})"

    @property
    def names(self) -> list[str]:
        return [d.name for d in self._drivers]

    def uses(self, name: str) -> bool:
        return any(d.name == name for d in self._drivers)

    # ---------------------------------------------------------- reserve
    def slot_space(self) -> str:
        """The name of the slot space the drivers share ("" when no driver
        gives a slot an identity): the registry's hint for its next slot."""
        return "_".join(k for d in self._drivers if (k := d.slot_claim(0)) is not None)

    def slot_claims(self, slot: int) -> list[str]:
        """The host-wide identities ``slot`` gives a guest (DAC's uid...)."""
        return [k for d in self._drivers if (k := d.slot_claim(slot)) is not None]

    def slot_usable(self, slot: int, live: LiveProcesses) -> bool:
        return all(d.slot_usable(slot, live) for d in self._drivers)

    def pick_labels(self, spec: GuestSpec, slot: int, taken: Mapping[str, Sequence[Label]],
                    live: LiveProcesses, free: Callable[[str], bool]
                    ) -> tuple[dict[str, Label], list[str]]:
        """Each driver's label for ``slot`` and the host-wide claims they make
        (SELinux's pair).  ``taken``: the labels other guests hold, by driver;
        ``free``: whether a claim is free on this host (and cluster).  A
        driver picks again while its pick is claimed elsewhere, at most
        :data:`LABEL_PICKS` times."""
        labels: dict[str, Label] = {}
        keys: list[str] = []
        for d in self._drivers:
            held = list(taken.get(d.name, ()))
            for _ in range(LABEL_PICKS):
                label = d.label_for(spec, slot, held, live)
                key = d.label_claim(spec, label)
                if key is None or (key not in keys and free(key)):
                    break
                if label in held:  # the spec's own label: no other to pick
                    raise SecurityError(
                        f"the {d.name} label {label.process} is held by another guest "
                        f"(claim {key})", label=label.process,
                        hint="give this guest a label of its own, or stop that guest")
                held.append(label)  # held by a guest of another registry
            else:
                raise SlotsExhausted(
                    f"the {d.name} driver found no label free on this host in "
                    f"{LABEL_PICKS} picks", hint="stop a guest, or run svirt gc")
            labels[d.name] = label
            if key is not None:
                keys.append(key)
        return labels, keys

    # ------------------------------------------------------------- hold
    def held_by_other(self, fd: int, labels: Mapping[str, Label], live: LiveProcesses
                      ) -> str | None:
        """Why the object already belongs to another live guest, else None."""
        for d in self._drivers:
            why = d.held_by_other(fd, labels[d.name], live)
            if why:
                return why
        return None

    def snapshot(self, fd: int, originals: dict[str, Original] | None = None
                 ) -> dict[str, Original]:
        """``originals`` completed with what each driver that has none sees now
        (a driver the earlier holders did not use)."""
        out = dict(originals or {})
        for d in self._drivers:
            if d.name not in out:
                out[d.name] = d.snapshot(fd)
        return out

    def apply(self, fd: int, st_mode: int, access: Access, labels: Mapping[str, Label],
              originals: Mapping[str, Original], *, path: Path, last: bool) -> None:
        """Label one object for the guest, driver by driver.  When one fails,
        the drivers already applied are restored in reverse (``last``: no
        other guest holds it, so the originals come back) and a
        SecurityError naming the driver goes up."""
        applied: list[Driver] = []
        for d in self._drivers:
            label = labels[d.name]
            if not d.wants_change(fd, st_mode, access, label):
                continue
            try:
                d.apply(fd, st_mode, access, label)
            except (OSError, SecurityError) as err:
                for done in reversed(applied):
                    try:
                        done.restore(fd, originals[done.name], labels[done.name], last=last)
                    except (OSError, SecurityError) as undo_err:
                        err.add_note(f"svirt: and the {done.name} driver could not undo "
                                     f"its label: {undo_err}")
                if isinstance(err, SecurityError):
                    raise
                raise SecurityError(
                    f"{path}: the {d.name} driver cannot label it: {err.strerror or err}",
                    path=path, hint=relabel_hint(err.errno)) from err
            applied.append(d)

    @staticmethod
    def restore(fd: int, originals: Mapping[str, Original], labels: Mapping[str, Any],
                *, last: bool, path: Path,
                driver_for: Callable[[str], Driver] | None = None) -> None:
        """Put back one object's originals (``last``) or drop this guest's
        part, the drivers in reverse: each named in ``originals`` (what was
        saved when the object was first held, maybe by another svirt
        process), ``labels`` the holder's (as its table keeps them: dicts);
        ``driver_for``: a driver by name (default: a new one of that model)."""
        for name, original in reversed(list(originals.items())):
            label = labels.get(name)
            if label is None and not last:
                continue  # this holder never changed anything for that driver
            driver = (driver_for(name) if driver_for is not None
                      else make_driver(SecurityModel(name)))
            held = (label if isinstance(label, Label) else Label.from_dict(label) if label
                    else Label(name, "", "", "", ""))
            try:
                driver.restore(fd, original, held, last=last)
            except OSError as err:  # the registry keeps the record restore-failed
                raise StateError(f"{path}: cannot restore its {name} state: "
                                 f"{err.strerror or err}", hint=relabel_hint(err.errno)) from err

    # ----------------------------------------------------------- launch
    def plans(self, spec: GuestSpec, labels: Mapping[str, Label],
              objects: Sequence[PlannedObject] = ()) -> list[DriverPlan]:
        return [d.plan(spec, labels[d.name], objects) for d in self._drivers]

    def warnings(self, spec: GuestSpec, labels: Mapping[str, Label]) -> list[str]:
        """What the drivers say they cannot enforce for these labels on this
        host (SELinux permissive, an AppArmor profile in complain mode)."""
        return [w for p in self.plans(spec, labels) for w in p.warnings]

    def check_labels(self, spec: GuestSpec, labels: Mapping[str, Label]) -> None:
        """Refuse labels that cannot confine (a spec's own AppArmor profile
        not loaded): before any warning, since it is refused, not warned."""
        for d in self._drivers:
            if isinstance(d, ChecksLabel):
                d.check_label(spec, labels[d.name])

    def check_objects(self, resources: Sequence[Resource]) -> None:
        """Refuse objects a driver's identity could not reach (DAC: a
        directory on the way others may not search)."""
        for d in self._drivers:
            if isinstance(d, ChecksObjects):
                d.check_objects(resources)

    def launch_steps(self, objects: LaunchObjects, labels: Mapping[str, Label]
                     ) -> list[PlannedStep]:
        """The steps the drivers add to a launch, in the drivers' order."""
        return [step for d in self._drivers if isinstance(d, HasLaunchSteps)
                for step in d.launch_steps(objects, labels[d.name])]

    def tmpfs_options(self, labels: Mapping[str, Label]) -> str:
        """The jail's tmpfs mount options: the first driver's that has any."""
        for d in self._drivers:
            if isinstance(d, HasTmpfsOptions) and (opts := d.tmpfs_options(labels[d.name])):
                return opts
        return ""

    def child_setups(self, spec: GuestSpec, labels: Mapping[str, Label]
                     ) -> list[Callable[[], None]]:
        """The drivers' steps in the child, in order (DAC's uid switch last)."""
        return [d.child_setup(labels[d.name], spec) for d in self._drivers]

    @contextmanager
    def creating_sockets(self, labels: Mapping[str, Label]) -> Iterator[None]:
        """Sockets made inside carry the guest's labels (left in reverse)."""
        with ExitStack() as stack:
            for d in self._drivers:
                stack.enter_context(d.creating_sockets(labels[d.name]))
            yield

    def after_exec(self, spec: GuestSpec, labels: Mapping[str, Label], pid: int
                   ) -> list[ExecFinding]:
        """What the drivers read back from the exec'd hypervisor ``pid``."""
        return [f for d in self._drivers if isinstance(d, ChecksExec)
                and (f := d.after_exec(spec, labels[d.name], pid)) is not None]


def refuse(findings: Sequence[ExecFinding]) -> None:
    """Raise the first finding that refuses the guest."""
    for f in findings:
        if f.refuse:
            raise SecurityError(f.message, label=f.label, hint=f.hint)
