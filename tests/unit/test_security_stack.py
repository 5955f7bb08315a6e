"""The security stack with fake drivers: order, rollback in reverse, hooks, label picks."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from svirt.errors import SecurityError, SlotsExhausted
from svirt.procfs import LiveProcesses
from svirt.resources import Access, Resource, ResourceKind
from svirt.security.base import (
    DriverPlan,
    ExecFinding,
    Label,
    LaunchObjects,
    Original,
    PlannedObject,
    PlannedStep,
    guest_ids,
    level_pair,
    mcs_pair,
)
from svirt.security.stack import LABEL_PICKS, SecurityStack, refuse
from svirt.spec import GuestSpec


class Fake:
    """A driver that writes what it does to a shared log."""

    def __init__(self, name: str, log: list[str], *, fail_apply: bool = False,
                 claim: Callable[[int], str | None] = lambda _i: None) -> None:
        self.name = name
        self.log = log
        self.fail_apply = fail_apply
        self.picks = 0
        self._claim = claim

    def check_available(self, host: Any) -> None: ...

    def slot_usable(self, slot: int, live: LiveProcesses) -> bool:
        return slot != 0

    def label_for(self, spec: GuestSpec, slot: int, taken: Sequence[Label],
                  live: LiveProcesses) -> Label:
        self.picks += 1
        value = f"{self.name}-{slot}-{self.picks}"
        return Label(self.name, value, value, value, value)

    def slot_claim(self, slot: int) -> str | None:
        return f"{self.name}-slot-{slot}"

    def label_claim(self, spec: GuestSpec, label: Label) -> str | None:
        return self._claim(self.picks)

    def wants_change(self, fd: int, st_mode: int, access: Access, label: Label) -> bool:
        return True

    def held_by_other(self, fd: int, label: Label, live: LiveProcesses) -> str | None:
        return None

    def snapshot(self, fd: int) -> Original:
        return {"was": self.name}

    def apply(self, fd: int, st_mode: int, access: Access, label: Label) -> None:
        if self.fail_apply:
            raise OSError(95, "Operation not supported")
        self.log.append(f"apply {self.name}")

    def restore(self, fd: int, original: Original, label: Label, *, last: bool) -> None:
        self.log.append(f"restore {self.name} last={last} {original['was']}")

    def child_setup(self, label: Label, spec: GuestSpec) -> Callable[[], None]:
        return lambda: self.log.append(f"child {self.name}")

    @contextmanager
    def creating_sockets(self, label: Label) -> Iterator[None]:
        self.log.append(f"enter {self.name}")
        yield
        self.log.append(f"leave {self.name}")

    def plan(self, spec: GuestSpec, label: Label, objects: Sequence[PlannedObject]
             ) -> DriverPlan:
        return DriverPlan(self.name, label.process, warnings=(f"{self.name} warns",))


class Step:
    def __init__(self, log: list[str], name: str) -> None:
        self.log, self.name = log, name

    def journal_entry(self) -> dict[str, Any] | None:
        return {"op": self.name}

    def create(self) -> None:
        self.log.append(f"create {self.name}")


class Hooked(Fake):
    """A driver with every optional hook."""

    def check_label(self, spec: GuestSpec, label: Label) -> None:
        self.log.append(f"check {self.name}")

    def launch_steps(self, objects: LaunchObjects, label: Label) -> list[PlannedStep]:
        return [Step(self.log, self.name)]

    def tmpfs_options(self, label: Label) -> str:
        return f"opts={label.image}"

    def after_exec(self, spec: GuestSpec, label: Label, pid: int) -> ExecFinding | None:
        return ExecFinding(f"{self.name} not taken", refuse=True, label=label.process)


SPEC = GuestSpec(name="s", kernel=Path("/boot/vmlinuz"))


def labels_of(*names: str) -> dict[str, Label]:
    return {n: Label(n, f"{n}-p", f"{n}-i", f"{n}-c", f"{n}-s") for n in names}


def test_apply_rolls_back_the_applied_drivers_in_reverse() -> None:
    log: list[str] = []
    stack = SecurityStack([Fake("a", log), Fake("b", log), Fake("c", log, fail_apply=True)])
    originals = stack.snapshot(7)
    with pytest.raises(SecurityError, match=r"^/img: the c driver cannot label it: ") as err:
        stack.apply(7, 0o100600, Access.RW, labels_of("a", "b", "c"), originals,
                    path=Path("/img"), last=True)
    assert err.value.hint == "the filesystem does not support this (ACLs or xattrs)"
    assert log == ["apply a", "apply b", "restore b last=True b", "restore a last=True a"]


def test_apply_in_order_when_all_succeed() -> None:
    log: list[str] = []
    stack = SecurityStack([Fake("a", log), Fake("b", log)])
    stack.apply(7, 0o100600, Access.RO, labels_of("a", "b"), stack.snapshot(7),
                path=Path("/img"), last=False)
    assert log == ["apply a", "apply b"]


def test_snapshot_keeps_earlier_originals() -> None:
    stack = SecurityStack([Fake("a", []), Fake("b", [])])
    assert stack.snapshot(3, {"a": {"was": "first"}}) == {"a": {"was": "first"},
                                                          "b": {"was": "b"}}


def test_steps_run_over_every_driver_in_order() -> None:
    log: list[str] = []
    stack = SecurityStack([Hooked("mac", log), Fake("dac", log)])
    labels = labels_of("mac", "dac")
    with stack.creating_sockets(labels):
        log.append("sockets")
    for setup in stack.child_setups(SPEC, labels):
        setup()
    stack.check_labels(SPEC, labels)
    assert log == ["enter mac", "enter dac", "sockets", "leave dac", "leave mac",
                   "child mac", "child dac", "check mac"]
    assert stack.warnings(SPEC, labels) == ["mac warns", "dac warns"]
    assert stack.tmpfs_options(labels) == "opts=mac-i"
    assert SecurityStack([Fake("dac", log)]).tmpfs_options(labels) == ""
    objects = LaunchObjects(SPEC, (), "qemu", None, False, (), Path("/run"))
    steps = stack.launch_steps(objects, labels)
    assert [s.journal_entry() for s in steps] == [{"op": "mac"}]
    findings = stack.after_exec(SPEC, labels, 1)
    with pytest.raises(SecurityError, match="mac not taken"):
        refuse(findings)
    refuse([ExecFinding("only a warning")])


def test_slot_claims_and_labels() -> None:
    stack = SecurityStack([Fake("a", []), Fake("b", [])])
    assert stack.slot_space() == "a-slot-0_b-slot-0"
    assert stack.slot_claims(4) == ["a-slot-4", "b-slot-4"]
    assert not stack.slot_usable(0, LiveProcesses()) and stack.slot_usable(1, LiveProcesses())
    labels, keys = stack.pick_labels(SPEC, 3, {}, LiveProcesses(), lambda _k: True)
    assert [lab.process for lab in labels.values()] == ["a-3-1", "b-3-1"] and keys == []


def test_pick_labels_picks_again_while_claimed_elsewhere() -> None:
    driver = Fake("mcs", [], claim=lambda pick: f"mcs-{pick}")
    stack = SecurityStack([driver])
    labels, keys = stack.pick_labels(SPEC, 1, {}, LiveProcesses(), lambda k: k == "mcs-3")
    assert labels["mcs"].process == "mcs-1-3" and keys == ["mcs-3"]
    with pytest.raises(SlotsExhausted, match=f"in {LABEL_PICKS} picks"):
        stack.pick_labels(SPEC, 1, {}, LiveProcesses(), lambda _k: False)


def test_restore_goes_in_reverse_and_skips_drivers_the_holder_never_used(
        monkeypatch: pytest.MonkeyPatch) -> None:
    log: list[str] = []
    monkeypatch.setattr("svirt.security.stack.make_driver", lambda model: Fake(str(model), log))
    originals = {"selinux": {"was": "s"}, "dac": {"was": "d"}}
    SecurityStack.restore(5, originals, {"dac": labels_of("dac")["dac"].to_dict()},
                          last=False, path=Path("/x"))
    assert log == ["restore dac last=False d"]
    SecurityStack.restore(5, originals, {}, last=True, path=Path("/x"))
    assert log[1:] == ["restore dac last=True d", "restore selinux last=True s"]


def test_one_parser_for_ids_and_pairs() -> None:
    dac = Label("dac", "3300004:3300004", "", "", "")
    assert dac.ids() == (3300004, 3300004)
    assert guest_ids({"dac": dac}) == (3300004, 3300004) and guest_ids({}) is None
    with pytest.raises(SecurityError, match="is not uid:gid"):
        Label("dac", "x:1", "", "", "").ids()
    sel = Label("selinux", "system_u:system_r:svirt_t:s0:c9,c3", "", "", "")
    assert sel.mcs_pair() == (3, 9)
    assert mcs_pair("system_u:system_r:svirt_t:s0") is None
    assert mcs_pair("u:r:t:s0:c1,c2-s0:c0.c1023") == (1, 2)
    assert level_pair("s0:c1,c2") == (1, 2) and level_pair("s0-s0:c1,c2") is None


def test_a_stack_is_a_sequence_of_its_drivers() -> None:
    a, b = Fake("a", []), Fake("b", [])
    stack = SecurityStack([a, b])
    assert list(stack) == [a, b] and stack[1] is b and len(stack) == 2
    assert stack.names == ["a", "b"] and stack.uses("b") and not stack.uses("c")
    assert SecurityStack.of(stack) is stack and list(SecurityStack.of([a])) == [a]
    assert not SecurityStack.of(None)


def test_hooks_need_no_unused_resource_kinds() -> None:
    # the vocabulary every floor shares: a Resource is plain data
    res = Resource(Path("/img"), Access.SHARED, ResourceKind.DISK)
    assert (res.relabel, str(res.access), str(res.kind)) == (True, "shared", "disk")


def test_dac_refuses_an_object_its_uid_cannot_reach(tmp_path: Path) -> None:
    from svirt.security.dac import DacDriver

    closed = tmp_path / "closed"
    closed.mkdir(mode=0o700)
    tmp_path.chmod(0o755)
    image = Resource(closed / "disk.img", Access.RW, ResourceKind.DISK)
    with pytest.raises(SecurityError, match="is not searchable by other users") as err:
        SecurityStack([DacDriver()]).check_objects([image])
    assert err.value.hint == f"keep images in a directory others may traverse (chmod o+x {closed})"
    SecurityStack([Fake("mac", [])]).check_objects([image])  # no DAC: no walk to check
