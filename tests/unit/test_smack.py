"""The SMACK driver's own logic, on this host (no SMACK kernel: labels are
real ``security.SMACK64`` xattrs, nothing enforces them).  Enforcement is
tested for real in the lab's SMACK pass (``tests/lab/test_lab_smack.py``)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from svirt.errors import SecurityError, SpecError
from svirt.procfs import LiveProcesses
from svirt.resources import Access
from svirt.security import smack
from svirt.security.base import Label
from svirt.spec import Backend, GuestSpec, Security, SecurityModel, smack_label_valid
from svirt.testing import require_root

LABEL = Label("smack", "svirt-7", "svirt-7", "_", "svirt-shared")


class Live(LiveProcesses):
    """A process table with the given labels (the live one has no SMACK here)."""

    def __init__(self, labels: set[str]) -> None:
        super().__init__()
        self._contexts = labels
        self._uids = set()


def _spec(tmp_path: Path, label: str | None = None) -> GuestSpec:
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"k")
    return GuestSpec(name="sm", backend=Backend.UML, kernel=kernel,
                     security=Security(model=SecurityModel.SMACK, label=label))


@pytest.mark.parametrize("label, ok", [
    ("svirt-3", True), ("web.guest_1", True), ("x" * 255, True), ("ok:lab", True),
    ("", False), ("a b", False), ("a\tb", False), ("-x", False), ("a/b", False),
    ('a"b', False), ("a'b", False), ("a\\b", False), ("x" * 256, False), ("é", False),
])
def test_label_format_is_smack_s(label: str, ok: bool) -> None:
    assert smack_label_valid(label) is ok


def test_a_static_smack_label_is_checked_as_smack_not_selinux(tmp_path: Path) -> None:
    assert _spec(tmp_path, "webguest").security.label == "webguest"  # no user:role:type:level
    with pytest.raises(SpecError, match="is not a SMACK label"):
        _spec(tmp_path, "web guest")


@pytest.mark.parametrize("label", ["_", "*", "^", "svirt-shared"])
def test_a_label_every_guest_uses_is_refused_as_a_guest_s_own(tmp_path: Path,
                                                               label: str) -> None:
    with pytest.raises(SecurityError, match="every guest may use"):
        smack.SmackDriver().label_for(_spec(tmp_path, label), 0, [], Live(set()))


@pytest.mark.parametrize("label", ["svirt-0", "svirt-3", "svirt-999", "svirt-x"])
def test_a_static_label_named_like_a_slot_s_is_refused(tmp_path: Path, label: str) -> None:
    """svirt-N is what slot N gets: a spec naming it would share another
    guest's label (now, or when that slot is next handed out)."""
    with pytest.raises(SecurityError, match="labels named svirt-"):
        smack.SmackDriver().label_for(_spec(tmp_path, label), 5, [], Live(set()))
    assert smack.SmackDriver().label_for(_spec(tmp_path, "webguest"), 5, [],
                                         Live(set())).process == "webguest"


def test_a_registry_refuses_a_static_label_equal_to_a_running_guest_s(tmp_path: Path) -> None:
    """Through a real registry: guest a gets svirt-0 from its slot; guest b
    asking for svirt-0 as its own label is refused, nothing is reserved."""
    from svirt.claims.host import HostClaims
    from svirt.launcher.registry import Registry

    registry = Registry(tmp_path / "run", tmp_path / "state",
                        claims=HostClaims(tmp_path / "claims"))
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"k")
    a = registry.reserve(GuestSpec(name="a", backend=Backend.UML, kernel=kernel,
                                   security=Security(model=SecurityModel.SMACK)),
                         [smack.SmackDriver()])
    taken = a.labels["smack"].process
    assert taken.startswith("svirt-")
    with pytest.raises(SecurityError, match="labels named svirt-"):
        registry.reserve(GuestSpec(name="b", backend=Backend.UML, kernel=kernel,
                                   security=Security(model=SecurityModel.SMACK, label=taken)),
                         [smack.SmackDriver()])
    assert [r.name for r in registry.records()] == ["a"]
    registry.release(a)


def test_labels_of_a_slot(tmp_path: Path) -> None:
    label = smack.SmackDriver().label_for(_spec(tmp_path), 4, [], Live(set()))
    assert (label.process, label.image, label.content, label.shared) == (
        "svirt-4", "svirt-4", "_", "svirt-shared")


def test_a_slot_whose_label_a_live_process_has_is_not_usable() -> None:
    driver = smack.SmackDriver()
    assert driver.slot_usable(3, Live({"_", "svirt-4"}))
    assert not driver.slot_usable(4, Live({"_", "svirt-4"}))


def test_an_object_labelled_by_a_running_guest_is_held(tmp_path: Path) -> None:
    require_root()
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"d")
    driver = smack.SmackDriver()
    fd = os.open(disk, os.O_RDONLY)
    try:
        assert driver.held_by_other(fd, LABEL, Live({"svirt-2"})) is None  # unlabelled
        for free in ("svirt-7", "_", "svirt-shared", "svirt-9"):  # ours, shared, not running
            os.setxattr(disk, smack.XATTR, free.encode())
            assert driver.held_by_other(fd, LABEL, Live({"svirt-2"})) is None, free
        os.setxattr(disk, smack.XATTR, b"svirt-2")
        assert "svirt-2" in (driver.held_by_other(fd, LABEL, Live({"svirt-2"})) or "")
    finally:
        os.close(fd)


def test_only_a_guest_with_a_shared_object_gets_a_rule() -> None:
    driver = smack.SmackDriver()
    assert driver.rules_for(LABEL, [Access.RW, Access.RO]) == []
    assert driver.rules_for(LABEL, [Access.RW, Access.SHARED]) == [
        ("svirt-7", "svirt-shared", "rwa")]


def test_jail_tmpfs_options_carry_the_guest_s_label() -> None:
    assert smack.tmpfs_options(LABEL) == "smackfsroot=svirt-7,smackfsdef=svirt-7"


def test_rules_go_through_load2_and_unloading_writes_dash(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    """A stand-in smackfs (a directory: this kernel has none); each rule is one
    write of its own, as load2 wants."""
    monkeypatch.setattr(smack, "SMACKFS", str(tmp_path))
    (tmp_path / "load2").touch()
    smack.SmackDriver().load_rules([("svirt-7", "svirt-shared", "rwa")])
    assert (tmp_path / "load2").read_text() == "svirt-7 svirt-shared rwa"
    assert smack.unload_rules([["svirt-7", "svirt-shared", "rwa"]]) == ["svirt-7 svirt-shared"]
    assert (tmp_path / "load2").read_text() == "svirt-7 svirt-shared -"


def test_no_smackfs_no_rule_to_unload(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(smack, "SMACKFS", str(tmp_path / "absent"))
    assert smack.unload_rules([["svirt-7", "svirt-shared", "rwa"]]) == []
    with pytest.raises(SecurityError, match="SMACK rule svirt-7 svirt-shared rwa: No such file"):
        smack.load_rule("svirt-7", "svirt-shared", "rwa")


def test_devices_get_the_star_label_once(tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """/dev/null's label is really written here (an xattr on the host's node is
    not what this test may change): a stand-in /dev holding a char device."""
    require_root()
    dev = tmp_path / "dev"
    dev.mkdir()
    os.mknod(dev / "null", 0o666 | 0o020000, os.makedev(1, 3))
    (dev / "plain").write_bytes(b"")
    monkeypatch.setattr(smack, "DEV", str(dev))
    driver = smack.SmackDriver()
    assert driver.label_devices(["null", "kvm"]) == [f"{dev}/null"]  # kvm absent: skipped
    assert os.getxattr(dev / "null", smack.XATTR) == b"*"
    assert driver.label_devices(["null"]) == []  # already labelled
    os.mknod(dev / "kvm", 0o660 | 0o020000, os.makedev(10, 232))
    os.setxattr(dev / "kvm", smack.XATTR, b"kvm-users")  # the administrator's: left alone
    os.mknod(dev / "zero", 0o666 | 0o020000, os.makedev(1, 5))
    os.setxattr(dev / "zero", smack.XATTR, b"_")
    assert driver.label_devices(["kvm", "zero"]) == [f"{dev}/zero"]
    assert os.getxattr(dev / "kvm", smack.XATTR) == b"kvm-users"
    with pytest.raises(SecurityError, match="not a character device"):
        driver.label_devices(["plain"])


def test_attr_path_prefers_smack_s_own_file() -> None:
    assert smack.attr_path() in ("/proc/self/attr/smack/current", "/proc/self/attr/current")
    assert smack.attr_path("thread-self").startswith("/proc/thread-self/attr/")


def test_a_label_under_auto_is_an_selinux_context_not_a_smack_label(tmp_path: Path) -> None:
    """On a SMACK host, model auto with an SELinux label: the guest gets its
    slot's label, never the context string as a SMACK label."""
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"k")
    spec = GuestSpec(name="sm", backend=Backend.UML, kernel=kernel,
                     security=Security(label="system_u:system_r:svirt_t:s0:c1,c2"))
    label = smack.SmackDriver().label_for(spec, 4, [], Live(set()))
    assert label.process == "svirt-4"
