"""DAC driver: POSIX ACL xattr helpers, the uid range check and slot -> uid."""

from __future__ import annotations

import errno
import os
import struct
import uuid as uuidlib
from pathlib import Path

import pytest

from svirt.errors import SecurityError
from svirt.procfs import LiveProcesses
from svirt.security.dac import (
    DEFAULT_UID_BASE,
    DEFAULT_UID_COUNT,
    DacDriver,
    acl_with_user,
    acl_without_user,
    format_acl,
    parse_acl,
)
from svirt.spec import GuestSpec

# the kernel's POSIX ACL xattr ABI (include/uapi/linux/posix_acl.h)
USER_OBJ, USER, GROUP_OBJ, GROUP, MASK, OTHER = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20
UNDEF = 0xFFFFFFFF
ACL_XATTR = "system.posix_acl_access"


class FakeLive(LiveProcesses):
    def __init__(self, uids: set[int]) -> None:
        super().__init__()
        self._fixed = uids

    @property
    def uids(self) -> set[int]:
        return self._fixed


# ------------------------------------------------------------------ ACL helpers


def test_acl_with_user_from_mode() -> None:
    raw = acl_with_user(None, 0o640, 1500001, 4)
    assert raw[:4] == struct.pack("<I", 2)  # version 2
    assert len(raw) == 4 + 5 * 8
    assert parse_acl(raw) == [
        (USER_OBJ, 6, UNDEF),
        (USER, 4, 1500001),
        (GROUP_OBJ, 4, UNDEF),
        (MASK, 4, UNDEF),
        (OTHER, 0, UNDEF),
    ]


def test_acl_mask_is_union_of_group_class() -> None:
    # group 0 and user rw: mask rw
    assert (MASK, 6, UNDEF) in parse_acl(acl_with_user(None, 0o604, 1500001, 6))
    # group r-x and user r--: mask r-x
    assert (MASK, 5, UNDEF) in parse_acl(acl_with_user(None, 0o750, 1500001, 4))


def test_acl_two_users_then_remove_one() -> None:
    raw = acl_with_user(None, 0o600, 1500001, 4)
    raw = acl_with_user(raw, 0o600, 1500002, 6)
    entries = parse_acl(raw)
    assert set(entries) == {
        (USER_OBJ, 6, UNDEF), (USER, 4, 1500001), (USER, 6, 1500002),
        (GROUP_OBJ, 0, UNDEF), (MASK, 6, UNDEF), (OTHER, 0, UNDEF),
    }
    assert len(entries) == 6
    left = acl_without_user(raw, 1500002)
    assert left is not None
    assert parse_acl(left) == [
        (USER_OBJ, 6, UNDEF), (USER, 4, 1500001), (GROUP_OBJ, 0, UNDEF),
        (MASK, 4, UNDEF),  # recomputed: only r is left in the group class
        (OTHER, 0, UNDEF),
    ]


def test_acl_with_user_replaces_the_same_user() -> None:
    raw = acl_with_user(None, 0o600, 1500001, 4)
    raw = acl_with_user(raw, 0o600, 1500001, 6)
    users = [e for e in parse_acl(raw) if e[0] == USER]
    assert users == [(USER, 6, 1500001)]
    assert [e for e in parse_acl(raw) if e[0] == MASK] == [(MASK, 6, UNDEF)]


def test_acl_without_last_user_is_none() -> None:
    raw = acl_with_user(None, 0o644, 1500001, 4)
    assert acl_without_user(raw, 1500001) is None


def test_acl_without_unknown_user_keeps_everything() -> None:
    raw = acl_with_user(None, 0o644, 1500001, 4)
    assert acl_without_user(raw, 1500099) == raw


def test_acl_keeps_foreign_entries() -> None:
    # an ACL the admin set (user 1000 and group 100), then a guest's entry added and removed
    base = format_acl([(USER_OBJ, 6, UNDEF), (USER, 4, 1000), (GROUP_OBJ, 4, UNDEF),
                       (GROUP, 4, 100), (MASK, 4, UNDEF), (OTHER, 0, UNDEF)])
    raw = acl_with_user(base, 0o640, 1500001, 6)
    assert {(USER, 4, 1000), (GROUP, 4, 100), (USER, 6, 1500001), (MASK, 6, UNDEF)} <= set(
        parse_acl(raw))
    back = acl_without_user(raw, 1500001)
    assert back is not None
    assert set(parse_acl(back)) == set(parse_acl(base))


def test_parse_acl_rejects_other_versions() -> None:
    with pytest.raises(SecurityError) as info:
        parse_acl(struct.pack("<I", 1) + struct.pack("<HHI", USER_OBJ, 6, UNDEF))
    assert "version 1" in info.value.message


def test_acl_user_entries_are_in_uid_order() -> None:
    raw = acl_with_user(None, 0o600, 1500002, 4)
    raw = acl_with_user(raw, 0o600, 1500001, 6)
    users = [e[2] for e in parse_acl(raw) if e[0] == USER]
    assert users == [1500001, 1500002]


def test_acl_is_accepted_by_the_kernel(tmp_path: Path) -> None:
    """The bytes are a valid system.posix_acl_access value (skipped without ACL support)."""
    f = tmp_path / "disk.img"
    f.write_bytes(b"\0")
    f.chmod(0o640)
    raw = acl_with_user(None, 0o640, 1500001, 6)
    raw = acl_with_user(raw, 0o640, 1500002, 4)
    try:
        os.setxattr(f, ACL_XATTR, raw)
    except OSError as err:
        if err.errno in (errno.EOPNOTSUPP, errno.ENOTSUP):
            pytest.skip("no POSIX ACLs on this filesystem")
        raise
    assert set(parse_acl(os.getxattr(f, ACL_XATTR))) == set(parse_acl(raw))
    assert f.stat().st_mode & 0o777 == 0o660  # the group bits show the mask (rw)
    left = acl_without_user(os.getxattr(f, ACL_XATTR), 1500001)
    assert left is not None
    os.setxattr(f, ACL_XATTR, left)
    assert f.stat().st_mode & 0o777 == 0o640  # mask back to r


# ---------------------------------------------------------------- check_range


def write_db(tmp_path: Path, passwd_ids: list[int], group_ids: list[int]) -> tuple[str, str]:
    passwd = tmp_path / "passwd"
    passwd.write_text("root:x:0:0:root:/root:/bin/sh\n" + "".join(
        f"u{i}:x:{i}:{i}::/home/u{i}:/bin/sh\n" for i in passwd_ids) + "broken line\n#x:y\n")
    group = tmp_path / "group"
    group.write_text("root:x:0:\n" + "".join(f"g{i}:x:{i}:\n" for i in group_ids))
    return str(passwd), str(group)


def test_check_range_passes(tmp_path: Path) -> None:
    # 1999 is just below and 2100 just above [2000, 2100)
    passwd, group = write_db(tmp_path, [1000, 1999, 2100, 65534], [100, 2100])
    DacDriver(uid_base=2000, uid_count=100).check_range(passwd=passwd, group=group)


def test_check_range_user_overlap(tmp_path: Path) -> None:
    passwd, group = write_db(tmp_path, [1000, 2099, 2050], [])
    with pytest.raises(SecurityError) as info:
        DacDriver(uid_base=2000, uid_count=100).check_range(passwd=passwd, group=group)
    assert info.value.message == (
        f"DAC uid range 2000..2099 overlaps user id 2050 in {passwd}")
    assert info.value.hint is not None and "SVIRT_UID_BASE" in info.value.hint


def test_check_range_group_overlap(tmp_path: Path) -> None:
    passwd, group = write_db(tmp_path, [1000], [2000])
    with pytest.raises(SecurityError) as info:
        DacDriver(uid_base=2000, uid_count=100).check_range(passwd=passwd, group=group)
    assert info.value.message == f"DAC uid range 2000..2099 overlaps group id 2000 in {group}"


def test_check_range_only_the_id_field_counts(tmp_path: Path) -> None:
    # a gid (field 4 of passwd) or a member list inside the range is not a clash
    passwd = tmp_path / "passwd"
    passwd.write_text("svc:x:1001:2050::/srv:/bin/sh\n")
    group = tmp_path / "group"
    group.write_text("g:x:1001:2050\n")
    DacDriver(uid_base=2000, uid_count=100).check_range(passwd=str(passwd), group=str(group))


@pytest.mark.parametrize(("base", "count"), [(999, 10), (0, 10), (2**31 - 5, 10)])
def test_check_range_refuses_bad_ranges(tmp_path: Path, base: int, count: int) -> None:
    passwd, group = write_db(tmp_path, [], [])
    with pytest.raises(SecurityError) as info:
        DacDriver(uid_base=base, uid_count=count).check_range(passwd=passwd, group=group)
    assert "is not allowed" in info.value.message


def test_default_range(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SVIRT_UID_BASE", raising=False)
    d = DacDriver()
    assert (d.uid_base, d.uid_count) == (DEFAULT_UID_BASE, DEFAULT_UID_COUNT)
    assert d.uid_base + d.uid_count <= 2**31
    monkeypatch.setenv("SVIRT_UID_BASE", "3000000")
    assert DacDriver().uid_base == 3_000_000
    assert DacDriver(uid_base=5000).uid_base == 5000


# ------------------------------------------------------------------ uid(slot)


def test_uid_of_slot() -> None:
    d = DacDriver(uid_base=2000, uid_count=100)
    assert d.uid(0) == 2000
    assert d.uid(99) == 2099


@pytest.mark.parametrize("slot", [-1, 100, 10**9])
def test_uid_out_of_range(slot: int) -> None:
    with pytest.raises(SecurityError) as info:
        DacDriver(uid_base=2000, uid_count=100).uid(slot)
    assert f"slot {slot} is outside the DAC range of 100" in info.value.message


def test_slot_usable_and_label(tmp_path: Path) -> None:
    d = DacDriver(uid_base=2000, uid_count=100)
    live = FakeLive({0, 2005})
    assert d.slot_usable(4, live) is True
    assert d.slot_usable(5, live) is False
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"k")
    spec = GuestSpec(name="g", kernel=kernel, uuid=uuidlib.UUID(int=1))
    label = d.label_for(spec, 7, [], live)
    assert (label.driver, label.process, label.image, label.content, label.shared) == (
        "dac", "2007:2007", "2007:2007", "2007:2007", "2007:2007")
    with pytest.raises(SecurityError):
        d.label_for(spec, 100, [], live)


def test_only_a_qemu_guest_that_may_use_kvm_gets_the_kvm_group() -> None:
    """The kvm group (when the host has one) is the hypervisor's only
    supplementary group, and only for QEMU not pinned to TCG: UML and lguest
    never open /dev/kvm, so they get no group at all (least privilege; this
    host gained a kvm group when libvirt was installed, and UML guests then
    ran with it)."""
    import grp

    from svirt.security import dac
    from svirt.spec import Accel, Backend, GuestSpec

    try:
        kvm = [grp.getgrnam("kvm").gr_gid]
    except KeyError:
        kvm = []
    kernel = Path("/usr/bin/linux")
    assert dac._child_groups(GuestSpec(name="u", kernel=kernel, backend=Backend.UML)) == []
    assert dac._child_groups(GuestSpec(name="q", kernel=kernel, backend=Backend.QEMU,
                                       accel=Accel.TCG)) == []
    assert dac._child_groups(GuestSpec(name="k", kernel=kernel, backend=Backend.QEMU,
                                       accel=Accel.KVM)) == kvm
