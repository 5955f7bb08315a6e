"""The plan `svirt check` shows: computed by each driver from a slot's labels,
never fixed text (no root, no hypervisor: files in tmp_path, fake contexts)."""

from __future__ import annotations

import os
import re
import stat
import uuid as uuidlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from svirt.claims.host import HostClaims
from svirt.host import Binary, HostInfo, KvmStatus, SELinuxMode
from svirt.launcher.launch import confinement_warnings
from svirt.launcher.registry import Registry
from svirt.procfs import LiveProcesses
from svirt.resources import Access, Resource, ResourceKind
from svirt.security.apparmor import AppArmorDriver, plan_profile
from svirt.security.base import Driver, PlannedObject
from svirt.security.dac import DacDriver
from svirt.security.selinux import SELinuxDriver
from svirt.security.smack import SmackDriver
from svirt.spec import Accel, Backend, GuestSpec

LAUNCHER = "system_u:system_r:unconfined_t:s0-s0:c0.c1023"
BASE = 1_760_000


class NoProcesses(LiveProcesses):
    @property
    def uids(self) -> set[int]:
        return set()

    @property
    def contexts(self) -> set[str]:
        return set()


def selinux(enforcing: bool | None = False) -> SELinuxDriver:
    return SELinuxDriver(launcher_context=LAUNCHER,
                         domain_context="system_u:system_r:svirt_t:s0",
                         image_context="system_u:object_r:svirt_image_t:s0",
                         content_context="system_u:object_r:virt_content_t:s0",
                         enforcing=enforcing)


def host(mode: SELinuxMode) -> HostInfo:
    return HostInfo(binaries={"linux": Binary("/usr/bin/linux", "6.1")},
                    kvm=KvmStatus(False, "none"), selinux=mode, selinux_mls=True,
                    selinux_policy="default", smack=False, lsms=("selinux",),
                    lguest_device=False, cpus=2)


@pytest.fixture
def spec(tmp_path: Path) -> GuestSpec:
    kernel = tmp_path / "linux"
    kernel.write_bytes(b"k")
    return GuestSpec(name="p", backend=Backend.UML, kernel=kernel, accel=Accel.TCG,
                     uuid=uuidlib.UUID(int=5))


@pytest.fixture
def opened() -> Iterator[list[int]]:
    fds: list[int] = []
    yield fds
    for fd in fds:
        os.close(fd)


def obj(path: Path, access: Access, fds: list[int], *, mode: int | None = None,
        kind: ResourceKind = ResourceKind.DISK, relabel: bool = True) -> PlannedObject:
    """``path`` as the launch's root walk would hand it over: an O_PATH fd."""
    if mode is not None:
        path.write_bytes(b"x")
        path.chmod(mode)
    fd = os.open(path, os.O_PATH | os.O_NOFOLLOW)
    fds.append(fd)
    return PlannedObject(Resource(path, access, kind, relabel), fd, os.fstat(fd).st_mode)


def test_dac_plan_is_the_slots_uid_not_text(spec: GuestSpec, tmp_path: Path,
                                            opened: list[int]) -> None:
    dac = DacDriver(uid_base=BASE)
    disk = obj(tmp_path / "d.img", Access.RW, opened, mode=0o644)
    plans = [dac.plan(spec, dac.label_for(spec, slot, [], NoProcesses()), [disk])
             for slot in (3, 4)]
    assert plans[0].process.startswith(f"uid {BASE + 3} gid {BASE + 3} groups ")
    assert plans[1].process.startswith(f"uid {BASE + 4} gid {BASE + 4} groups ")
    assert plans[0].objects[0].setting == f"owner {BASE + 3}:{BASE + 3} mode 0600"
    assert plans[1].objects[0].setting == f"owner {BASE + 4}:{BASE + 4} mode 0600"
    assert plans[0].process.endswith("groups none")  # TCG: not even kvm


def test_dac_read_only_objects_others_can_read_are_unchanged(
        spec: GuestSpec, tmp_path: Path, opened: list[int]) -> None:
    dac = DacDriver(uid_base=BASE)
    label = dac.label_for(spec, 9, [], NoProcesses())
    public = obj(tmp_path / "pub", Access.RO, opened, mode=0o644)
    private = obj(tmp_path / "priv", Access.RO, opened, mode=0o600)
    shared = obj(tmp_path / "shared", Access.SHARED, opened, mode=0o644)
    (tmp_path / "dir").mkdir(mode=0o750)
    directory = obj(tmp_path / "dir", Access.RO, opened)
    fixed = obj(tmp_path / "fixed", Access.RW, opened, mode=0o644, relabel=False)
    plan = dac.plan(spec, label, [public, private, shared, directory, fixed])
    got = [(o.change, o.setting) for o in plan.objects]
    assert got == [(False, "unchanged"), (True, f"ACL user:{BASE + 9}:r--"),
                   (True, f"ACL user:{BASE + 9}:rw-"), (True, f"ACL user:{BASE + 9}:r-x"),
                   (False, "unchanged")]
    assert "0644" in plan.objects[0].note and "relabel = false" in plan.objects[4].note
    # the plan is wants_change's answer
    for o, p in zip([public, private], plan.objects[:2], strict=True):
        assert o.fd is not None and o.st_mode is not None
        assert dac.wants_change(o.fd, o.st_mode, o.resource.access, label) is p.change


def test_dac_objects_the_launch_makes(spec: GuestSpec, tmp_path: Path) -> None:
    dac = DacDriver(uid_base=BASE)
    label = dac.label_for(spec, 1, [], NoProcesses())
    home = PlannedObject(Resource(tmp_path / "home", Access.RW, ResourceKind.RUN_DIR),
                         None, stat.S_IFDIR | 0o700)
    layer = PlannedObject(Resource(tmp_path / "layer", Access.RW, ResourceKind.LAYER))
    plan = dac.plan(spec, label, [home, layer])
    assert plan.objects[0].setting == f"owner {BASE + 1}:{BASE + 1} mode 0700"
    assert plan.objects[1].setting.startswith(f"owner {BASE + 1}:{BASE + 1} mode 0600")


def test_selinux_plan_is_the_labels_own_contexts(spec: GuestSpec, tmp_path: Path,
                                                 opened: list[int]) -> None:
    se = selinux()
    first = se.label_for(spec, 0, [], NoProcesses())
    second = se.label_for(spec, 1, [first], NoProcesses())  # another pair: first is taken
    objs = [obj(tmp_path / "rw", Access.RW, opened, mode=0o600),
            obj(tmp_path / "ro", Access.RO, opened, mode=0o644),
            obj(tmp_path / "sh", Access.SHARED, opened, mode=0o600),
            obj(tmp_path / "keep", Access.RW, opened, mode=0o600, relabel=False)]
    plans = [se.plan(spec, lab, objs) for lab in (first, second)]
    levels = []
    for plan, lab in zip(plans, (first, second), strict=True):
        m = re.fullmatch(r"system_u:system_r:svirt_t:(s0:c(\d+),c(\d+))", plan.process)
        assert m and int(m.group(2)) < int(m.group(3)), plan.process
        levels.append(m.group(1))
        assert plan.process == lab.process
        assert [o.setting for o in plan.objects[:3]] == [
            f"system_u:object_r:svirt_image_t:{m.group(1)}",
            "system_u:object_r:virt_content_t:s0", "system_u:object_r:svirt_image_t:s0"]
        assert not plan.objects[3].change and plan.objects[3].setting == "unchanged"
    assert levels[0] != levels[1]


def test_permissive_selinux_warns_on_every_launch(spec: GuestSpec) -> None:
    for mode, warned in ((SELinuxMode.PERMISSIVE, True), (SELinuxMode.ENFORCING, False)):
        se = selinux(enforcing=None)  # from the host probe, as build_stack does
        se.check_available(host(mode))
        label = se.label_for(spec, 0, [], NoProcesses())
        problems = confinement_warnings(spec, [se], {"selinux": label})
        assert any("permissive" in p and label.process in p for p in problems) is warned
        assert bool(problems) is warned


def test_apparmor_plan_is_the_profiles_own_rule(spec: GuestSpec, tmp_path: Path,
                                                opened: list[int]) -> None:
    aa = AppArmorDriver()
    label = aa.label_for(spec, 0, [], NoProcesses())
    disk = obj(tmp_path / "d.img", Access.RW, opened, mode=0o600, relabel=False)
    (tmp_path / "home").mkdir()
    home = obj(tmp_path / "home", Access.RW, opened, kind=ResourceKind.RUN_DIR)
    log = PlannedObject(Resource(tmp_path / "c.log", Access.RW, ResourceKind.CONSOLE_LOG))
    plan = aa.plan(spec, label, [disk, home, log])
    assert plan.process == f"svirt-{spec.uuid}" and not plan.warnings
    profile = plan_profile(spec, [(tmp_path / "d.img", Access.RW, ResourceKind.DISK, False),
                                  (tmp_path / "home", Access.RW, ResourceKind.RUN_DIR, True)],
                           hypervisor="/usr/bin/linux", init=None, kvm=False)
    rules = [r.line().strip() for r in profile.rules]
    assert plan.objects[0].setting == rules[0]  # a path rule even with relabel = false
    assert plan.objects[1].setting.splitlines() == rules[1:3]
    assert not plan.objects[2].change
    assert "complain" in AppArmorDriver(complain=True).plan(spec, label, []).warnings[0]


def test_smack_plan_is_the_labels_own(spec: GuestSpec, tmp_path: Path,
                                      opened: list[int]) -> None:
    sm = SmackDriver()
    objs = [obj(tmp_path / "rw", Access.RW, opened, mode=0o600),
            obj(tmp_path / "ro", Access.RO, opened, mode=0o644)]
    plan = sm.plan(spec, sm.label_for(spec, 12, [], NoProcesses()), objs)
    assert plan.process == "svirt-12"
    assert [o.setting for o in plan.objects] == ["security.SMACK64=svirt-12",
                                                 "security.SMACK64=_"]


def test_peek_is_the_slot_reserve_gives_and_reserves_nothing(
        spec: GuestSpec, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SVIRT_STATE_DIR", raising=False)
    registry = Registry(tmp_path / "run", claims=HostClaims(tmp_path / "claims"),
                        cluster=False)
    drivers: list[Driver] = [DacDriver(uid_base=BASE)]
    slot, labels = registry.peek(spec, drivers)
    assert registry.peek(spec, drivers) == (slot, labels)  # nothing was taken
    assert registry.records() == [] and not list((tmp_path / "claims").glob("uid-*"))
    record = registry.reserve(spec, drivers)
    try:
        assert (record.slot, record.labels) == (slot, labels)
        other = spec.with_changes(name="q", uuid=uuidlib.UUID(int=6))
        next_slot, next_labels = registry.peek(other, drivers)
        assert next_slot != slot
        assert next_labels["dac"].process == f"{BASE + next_slot}:{BASE + next_slot}"
    finally:
        registry.release(record)
