"""Review-a findings on the bounds of what a guest makes the host store.

- io_uring: the jail's seccomp filter refuses ``fallocate(FALLOC_FL_KEEP_SIZE)``
  (blocks past a file's end, which ``RLIMIT_FSIZE`` does not bound), but an
  ``IORING_OP_FALLOCATE`` is made by an io-wq worker, out of seccomp's sight:
  a jailed stand-in allocates as much as it asks past the end of its own
  writable disk, on the image root's file system (often the state disk).
  Fixed: the jail refuses io_uring.
- The kernel keyring: the next guest given a uid read the key the last one
  left in the user keyring.  Fixed: the jail refuses the keyring calls.
- Regression of the merge: release refused every object key with a birth
  time (ext4, tmpfs), so every guest ended restore-failed.  Fixed.
- The inode generation in an object's key was the owner's to set (ext4
  ``FS_IOC_SETVERSION``): a guest that changed its disk's escaped restore
  and kept the file.  Fixed: keys are DEV-INO and birth time; a file at a
  held path that still carries the guest's uid is restore-failed.
- A qcow2 header rewritten by the guest lifted the next run's
  ``RLIMIT_FSIZE``.  Fixed: the size remembered at first sight
  (``trusted.svirt.virtual_size``, root's) bounds it.
- An ephemeral layer's tmpfs cap (and the memory limit) followed its
  base's virtual size past the host's RAM + swap.  Fixed: a host-wide
  budget (``guest_storage_budget_percent``) refuses the launch.
- A ``jail = false`` guest's SysV shared memory and keyring keys (the
  uid's, not its processes') outlived its release.  Fixed: the jail's
  seccomp filter for jail = false too, and release removes the uid's SysV
  IPC objects and clears its keyrings.
"""

from __future__ import annotations

import errno
import json
import os
import re
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from svirt.host import HostInfo
from svirt.images.build import TinyGuest
from svirt.launcher.bounds import file_size_limit
from svirt.launcher.launch import Guest, launch
from svirt.launcher.registry import Registry
from svirt.launcher.supervisor import OutcomeKind, Step
from svirt.spec import Backend, Disk, DiskFormat, GuestSpec
from svirt.testing import tiny_spec

from . import review_a_standin
from .helpers import UID_BASE, build_spec, read_info, run_as, spec_dict

MIB = 1 << 20
NOTSUP = errno.errorcode[errno.EOPNOTSUPP]  # Python names 95 ENOTSUP
URING_LINE = re.compile(rb"URING (\{[^\n]*\})\r?\n")


def _report(guest: Guest, timeout: float = 30.0) -> dict[str, object]:
    line = guest.console.expect(URING_LINE, timeout)
    m = URING_LINE.search(line)
    assert m is not None
    report: dict[str, object] = json.loads(m.group(1))
    return report


def test_review_a_io_uring_fallocate_keep_size_cannot_pass_the_disk_end(
    hostile_registry: Registry, image_dir: Path, host: HostInfo, guest_uids: set[int],
) -> None:
    """A jailed guest asks io_uring for 64 MiB of blocks past its 4 MiB disk's end."""
    kernel = review_a_standin.install(image_dir)
    disk = image_dir / "uring.img"
    disk.write_bytes(b"\0" * (4 * MIB))
    d = spec_dict(kernel, "uring", "grow", 100, disks=[disk])
    d["cmdline"] += " uringmib=64"
    spec = build_spec(d)
    assert spec.jail
    with launch(spec, registry=hostile_registry, host=host) as guest:
        report = _report(guest)
        guest_uids.add(read_info(guest)["uid"])
        guest.stop()
    assert report["direct"] == NOTSUP, report  # the seccomp rule holds for the syscall
    st = disk.stat()
    assert st.st_size == 4 * MIB
    assert st.st_blocks * 512 <= 5 * MIB, (
        f"io_uring allocated {st.st_blocks * 512 // MIB} MiB past a 4 MiB disk's end: {report}")


def test_review_a_a_guest_that_changes_its_disks_generation_is_still_restored(
    hostile_registry: Registry, image_dir: Path, host: HostInfo, guest_uids: set[int],
) -> None:
    kernel = review_a_standin.install(image_dir)
    disk = image_dir / "regen.img"
    disk.write_bytes(b"\0" * MIB)
    disk.chmod(0o640)
    before = disk.stat()
    spec = build_spec(spec_dict(kernel, "regen", "grow", 101, disks=[disk]))
    with launch(spec, registry=hostile_registry, host=host) as guest:
        report = _report(guest)
        uid = read_info(guest)["uid"]
        guest_uids.add(uid)
        if "error" in report:
            pytest.skip(f"this file system refuses FS_IOC_SETVERSION: {report}")
        assert report["uid"] == uid, report  # the guest owns its disk while it runs
        assert report["generation"] != report["generation0"], report
        guest.stop()
    after = disk.stat()
    assert (after.st_uid, after.st_gid, after.st_mode) == (
        before.st_uid, before.st_gid, before.st_mode), (
        f"the disk was left with uid {after.st_uid}, mode {oct(after.st_mode)}: {report}")
    assert not hostile_registry.records()


def _forge_virtual_size(path: str, size: int) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, struct.pack(">Q", size), 24)  # QCowHeader.size
    finally:
        os.close(fd)
    # and what svirt remembers of it (trusted.*: CAP_SYS_ADMIN only)
    for value in (None, str(size).encode()):
        try:
            if value is None:
                os.removexattr(path, "trusted.svirt.virtual_size")
            else:
                os.setxattr(path, "trusted.svirt.virtual_size", value)
        except OSError as err:
            if err.errno not in (errno.EPERM, errno.ENODATA):
                raise


def test_review_a_a_forged_qcow2_size_does_not_lift_the_file_size_limit(
    image_dir: Path,
) -> None:
    """The hypervisor owns its writable qcow2 while it runs (DAC) and may
    write any byte of it, its header included.  Played here by a process of
    a guest uid on the file chowned to it (as DAC does), then the file given
    back to root (as release does): what the next launch computes is read
    from the forged header.  Function level: the bound is computed by the
    launch path's own bounds.file_size_limit (a QEMU stand-in is not needed
    to show what the next child's RLIMIT_FSIZE would be)."""
    disk = image_dir / "forged.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "16M"], check=True)
    spec = GuestSpec(name="forged", backend=Backend.QEMU, kernel=disk, memory=32,
                     disks=(Disk(disk, format=DiskFormat.QCOW2),))
    before = file_size_limit(spec, (), {})
    uid = UID_BASE + 49_999
    os.chown(disk, uid, uid)
    assert run_as(uid, uid, _forge_virtual_size, str(disk), 1 << 40) == ""
    os.chown(disk, 0, 0)
    after = file_size_limit(spec, (), {})
    assert after <= before, (
        f"the guest's own header lifted its file size limit from {before >> 20} MiB "
        f"to {after >> 20} MiB")


def test_review_a_a_plain_guest_with_a_disk_is_released_cleanly(
    hostile_registry: Registry, image_dir: Path, host: HostInfo, guest_uids: set[int],
) -> None:
    """Regression (the merge of issue 22): an object's key carries its birth
    time as SEC.NSEC where the file system has one (ext4, tmpfs), and
    release refused every such key as "no object's key": every guest with a
    disk (and every UML home) ended restore-failed, its uid kept."""
    kernel = review_a_standin.install(image_dir)
    disk = image_dir / "plain.img"
    disk.write_bytes(b"\0" * MIB)
    disk.chmod(0o640)
    before = disk.stat()
    spec = build_spec(spec_dict(kernel, "plain", disks=[disk]))
    with launch(spec, registry=hostile_registry, host=host) as guest:
        guest_uids.add(read_info(guest)["uid"])
        assert guest.stop().ok
    after = disk.stat()
    assert (after.st_uid, after.st_mode) == (before.st_uid, before.st_mode)
    assert not hostile_registry.records()
    assert not list((hostile_registry.state / "objects").glob("*.json"))


def _host_memory() -> int:
    """MemTotal + SwapTotal in bytes (/proc/meminfo)."""
    total = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("MemTotal", "SwapTotal"):
            total += int(value.split()[0]) * 1024
    return total


def test_review_a_an_ephemeral_layer_cap_never_exceeds_the_hosts_memory(
    hostile_registry: Registry, image_dir: Path, host: HostInfo, guest_uids: set[int],
) -> None:
    """Nothing is written here (that would take the machine down): the test
    only shows that a launch gives a guest a storage cap, and a memory limit,
    that the host cannot pay for.  A common cloud image (virtual size 2-100
    GiB) as the base of an ephemeral disk is enough on a small host; several
    guests add up (no host-wide budget either)."""
    kernel = review_a_standin.install(image_dir)
    memory = _host_memory()
    base = image_dir / "huge-base.img"
    with open(base, "wb") as f:
        f.truncate(2 * memory)  # sparse: no block is written
    base.chmod(0o644)
    spec = build_spec(spec_dict(kernel, "bigbase"))
    spec = spec.with_changes(disks=(Disk(base, ephemeral=True),))
    try:
        guest_cm = launch(spec, registry=hostile_registry, host=host)
        guest = guest_cm.__enter__()
    except Exception:  # noqa: BLE001 - a refusal is what a fix may do
        return
    try:
        guest_uids.add(read_info(guest)["uid"])
        assert guest.storage is not None
        cap = guest.storage.size
        limit = guest.cgroup.memory_max if guest.cgroup is not None else 0
    finally:
        guest.stop()
        guest_cm.__exit__(None, None, None)
    assert cap < memory, (f"the guest's storage (tmpfs) cap is {cap >> 30} GiB on a host "
                          f"with {memory >> 30} GiB of RAM + swap (memory limit "
                          f"{limit >> 30} GiB)")


def test_review_a_guests_storage_caps_together_stay_in_the_hosts_budget(
    hostile_registry: Registry, image_dir: Path, host: HostInfo, guest_uids: set[int],
) -> None:
    """Several guests add up: two ephemeral disks, each of whose caps fits the
    host's storage budget (guest_storage_budget_percent of RAM + swap, every
    svirt storage mount on the host counted) but not both.  The first guest
    runs; the second launch, while it runs, is refused with a hint, and
    leaves no record.  Nothing is written to either layer (sparse bases)."""
    from svirt import config
    from svirt.errors import HostError
    from svirt.launcher import storage

    kernel = review_a_standin.install(image_dir)
    budget = storage.host_memory() * config.load().guest_storage_budget_percent // 100
    room = budget - storage.committed()
    if room < 256 * MIB:
        pytest.skip(f"the host's storage budget has {room >> 20} MiB left: nothing to split")
    base = image_dir / "budget-base.img"
    with open(base, "wb") as f:
        f.truncate(room * 6 // 10)  # sparse: no block is written
    base.chmod(0o644)
    first = build_spec(spec_dict(kernel, "budget-a")).with_changes(
        disks=(Disk(base, ephemeral=True),))
    second = build_spec(spec_dict(kernel, "budget-b")).with_changes(
        disks=(Disk(base, ephemeral=True),))
    with launch(first, registry=hostile_registry, host=host) as guest:
        guest_uids.add(read_info(guest)["uid"])
        assert guest.storage is not None and guest.storage.size >= room * 6 // 10
        with pytest.raises(HostError, match="storage budget") as refused:
            with launch(second, registry=hostile_registry, host=host):
                pass
        assert "guest_storage_budget_percent" in (refused.value.hint or "")
        assert [r.name for r in hostile_registry.records()] == ["budget-a"]
        guest.stop()
    assert not hostile_registry.records()


def _clear_user_keyring() -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall(ctypes.c_long(250), ctypes.c_long(7), ctypes.c_long(-4))  # KEYCTL_CLEAR @u


def test_review_a_the_next_guest_of_a_uid_reads_no_key_the_last_one_left(
    hostile_registry: Registry, image_dir: Path, host: HostInfo, guest_uids: set[int],
) -> None:
    """The kernel keyring is per uid and outlives the guest (the user keyring
    hangs off the user namespace): with add_key/keyctl open in the jail, the
    next guest given the uid read what the last one left (reproduced)."""
    kernel = review_a_standin.install(image_dir)
    reports, uids = [], []
    try:
        for name in ("keys-a", "keys-b"):
            spec = build_spec(spec_dict(kernel, name, "grow", 102))
            with launch(spec, registry=hostile_registry, host=host) as guest:
                reports.append(_report(guest))
                uids.append(read_info(guest)["uid"])
                guest_uids.add(uids[-1])
                guest.stop()
    finally:
        for uid in set(uids):
            run_as(uid, uid, _clear_user_keyring)
    if uids[0] != uids[1]:
        pytest.skip(f"the second guest got another uid ({uids}): nothing to compare")
    assert not str(reports[1]["found"]).startswith("left by"), (
        f"guest keys-b (uid {uids[1]}) read what keys-a left in the kernel keyring: "
        f"{reports[1]['found']!r}")
    assert reports[0]["added"] == "ENOSYS", reports[0]


def _shm_of(uid: int) -> list[int]:
    """SysV shared memory segments whose owner is ``uid`` (/proc/sysvipc/shm)."""
    out = []
    for line in Path("/proc/sysvipc/shm").read_text().splitlines()[1:]:
        fields = line.split()
        if len(fields) > 7 and int(fields[7]) == uid:
            out.append(int(fields[1]))
    return out


def _key_left() -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    found = libc.syscall(ctypes.c_long(250), ctypes.c_long(10), ctypes.c_long(-4), b"user",
                         review_a_standin.KEY_DESCRIPTION, ctypes.c_long(0))
    if found > 0:
        raise RuntimeError(f"key {found} is still in the uid's keyring")


def test_review_a_a_jail_false_guest_leaves_no_uid_owned_kernel_object(
    hostile_registry: Registry, image_dir: Path, host: HostInfo, guest_uids: set[int],
) -> None:
    """A jail = false stand-in tries to leave a 1 MiB SysV segment in the
    host's IPC namespace and a key in its uid's keyring.  Both are refused at
    the call by the jail's seccomp filter, which jail = false guests now get
    too (shmget EPERM: the ids are host-wide; keyring ENOSYS); were one there,
    release would remove it (the next tests)."""
    kernel = review_a_standin.install(image_dir)
    spec = build_spec(spec_dict(kernel, "uidstate", "grow", 103)).with_changes(jail=False)
    uid = -1
    try:
        with launch(spec, registry=hostile_registry, host=host) as guest:
            report = _report(guest)
            uid = read_info(guest)["uid"]
            guest_uids.add(uid)
            assert report["shmid"] == "EPERM", report  # the filter: no host-wide SysV ids
            assert report["key"] == "ENOSYS", report  # the filter: no keyring for any guest
            guest.stop()
        left = _shm_of(uid)
        key = run_as(uid, uid, _key_left)
    finally:
        if uid >= 0:
            for shmid in _shm_of(uid):
                subprocess.run(["ipcrm", "-m", str(shmid)], check=False)
            run_as(uid, uid, _clear_user_keyring)
    assert not left, f"SysV segments {left} of uid {uid} outlived the guest's release"
    assert key == "", key


def _add_segment() -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.shmget(0, 4096, 0o1600) < 0:  # IPC_PRIVATE, IPC_CREAT | 0600
        raise RuntimeError(f"shmget: errno {ctypes.get_errno()}")


def test_review_a_release_removes_a_guest_uids_sysv_objects() -> None:
    """Were a SysV segment of a guest's uid left (a kernel or filter that let
    one through), release's uid cleanup removes it: played by a process of
    a guest uid (no filter) making one; then the function release calls."""
    from svirt.launcher.uidstate import remove_sysv_ipc

    uid = 1_999_333
    try:
        assert run_as(uid, uid, _add_segment) == ""
        assert _shm_of(uid), "the segment was not made (test setup)"
        remove_sysv_ipc(uid)
        assert not _shm_of(uid)
    finally:
        for shmid in _shm_of(uid):
            subprocess.run(["ipcrm", "-m", str(shmid)], check=False)


def _add_key() -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    payload = b"left behind"
    if libc.syscall(ctypes.c_long(248), b"user", review_a_standin.KEY_DESCRIPTION, payload,
                    ctypes.c_size_t(len(payload)), ctypes.c_long(-4)) <= 0:
        raise RuntimeError(f"add_key: errno {ctypes.get_errno()}")


def test_review_a_release_clears_a_guest_uids_keyrings() -> None:
    """Were a key left in a guest uid's user keyring (a kernel or filter
    that let one through), release's uid cleanup clears it: played by a
    process of a guest uid (no filter) adding a key; then the function
    release calls."""
    from svirt.launcher import uidstate

    uid = UID_BASE + 49_998
    assert run_as(uid, uid, _add_key) == ""
    assert run_as(uid, uid, _key_left) != ""  # the key is there
    assert uidstate.clear_keyrings(uid)
    assert run_as(uid, uid, _key_left) == ""


@pytest.mark.parametrize("backend", [Backend.UML, Backend.QEMU])
def test_review_a_a_jail_false_guest_boots_under_the_jails_seccomp_filter(
    backend: Backend, tiny_uml: TinyGuest, tiny_qemu: TinyGuest,
    launch_guest: Callable[..., Guest],
) -> None:
    """What the filter could break for jail = false: a real UML and a real
    QEMU (TCG) boot to their marker and power off gracefully with it, and
    the hypervisor runs filtered (``Seccomp: 2``)."""
    tiny = tiny_uml if backend is Backend.UML else tiny_qemu
    guest = launch_guest(tiny_spec(tiny, f"nojail-{backend}", backend).with_changes(
        jail=False))
    guest.console.expect_line("SVIRT-READY", timeout=90)
    status = Path(f"/proc/{guest.supervisor.pid}/status").read_text()
    assert re.search(r"^Seccomp:\s+2$", status, re.M), status
    outcome = guest.stop()
    assert outcome.kind is OutcomeKind.POWEROFF, outcome
    assert outcome.step is Step.GRACEFUL
