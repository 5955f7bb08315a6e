"""DAC isolation enforced by this host's kernel: per-guest uids, restores, slots."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from svirt.errors import SecurityError, StateError
from svirt.images.build import TinyGuest
from svirt.launcher.launch import Guest, launch
from svirt.launcher.registry import Registry
from svirt.launcher.supervisor import OutcomeKind
from svirt.security.dac import ACL_XATTR
from svirt.spec import Backend, Console, Disk
from svirt.testing import tiny_spec

from .helpers import open_as, pids_of_uid, status_field, svirt_cli, wait_for, write_spec

ROOT = Path(__file__).resolve().parents[2]


def _disk(path: Path, size: int = 1 << 20, mode: int = 0o644) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    path.chmod(mode)
    return path


def _state(path: Path) -> tuple[int, int, int, bytes | None]:
    st = path.stat()
    try:
        acl: bytes | None = os.getxattr(path, ACL_XATTR)
    except OSError:
        acl = None
    return st.st_uid, st.st_gid, st.st_mode, acl


def _uid(guest: Guest) -> tuple[int, int]:
    uid, gid = guest.labels["dac"].split(":")
    return int(uid), int(gid)


def _guest_with_disk(tiny: TinyGuest, name: str, disk: Path, log: Path) -> object:
    return tiny_spec(tiny, name, Backend.UML, disks=(Disk(disk),), console=Console(log=log))


def test_two_uml_guests_cannot_open_each_others_disk_or_log(
    tiny_uml: TinyGuest, image_dir: Path, launch_guest: Callable[..., Guest]
) -> None:
    disks = {n: _disk(image_dir / f"{n}.img") for n in "ab"}
    logs = {n: image_dir / f"{n}.log" for n in "ab"}
    guests = {n: launch_guest(_guest_with_disk(tiny_uml, f"dac-{n}", disks[n], logs[n]))
              for n in "ab"}
    for g in guests.values():
        g.console.expect_line("SVIRT-READY", timeout=60)
    uid_a, gid_a = _uid(guests["a"])
    uid_b, gid_b = _uid(guests["b"])
    assert uid_a != uid_b and gid_a != gid_b
    assert status_field(guests["a"].pid, "Uid").split() == [str(uid_a)] * 4
    # real kernel checks, as each guest's uid
    assert open_as(uid_a, gid_a, disks["b"], os.O_RDWR) == errno.EACCES
    assert open_as(uid_a, gid_a, disks["b"], os.O_RDONLY) == errno.EACCES
    assert open_as(uid_a, gid_a, logs["b"], os.O_RDONLY) == errno.EACCES
    assert open_as(uid_b, gid_b, disks["a"], os.O_RDWR) == errno.EACCES
    assert open_as(uid_b, gid_b, logs["a"], os.O_WRONLY) == errno.EACCES
    assert open_as(uid_a, gid_a, disks["a"], os.O_RDWR) == 0
    assert open_as(uid_a, gid_a, logs["a"], os.O_WRONLY) == 0
    assert open_as(uid_b, gid_b, disks["b"], os.O_RDWR) == 0


def test_hypervisor_has_no_capabilities_and_no_groups(
    tiny_uml: TinyGuest, tiny_qemu: TinyGuest, launch_guest: Callable[..., Guest]
) -> None:
    for guest in (launch_guest(tiny_spec(tiny_uml, "caps-uml", Backend.UML)),
                  launch_guest(tiny_spec(tiny_qemu, "caps-qemu", Backend.QEMU))):
        guest.console.expect_line("SVIRT-READY", timeout=90)
        for field in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
            assert int(status_field(guest.pid, field), 16) == 0, field
        assert status_field(guest.pid, "Groups") == ""
        uid, gid = _uid(guest)
        assert status_field(guest.pid, "Uid").split() == [str(uid)] * 4
        assert status_field(guest.pid, "Gid").split() == [str(gid)] * 4
        # and it cannot become root again: the bounding set is empty
        assert uid >= 1_000_000


@pytest.mark.parametrize("how", ["clean-stop", "hypervisor-sigkill"])
def test_owners_and_modes_restored(
    how: str, tiny_uml: TinyGuest, image_dir: Path, registry: Registry
) -> None:
    disk = _disk(image_dir / "d.img", mode=0o640)
    log = image_dir / "d.log"
    log.write_text("earlier run\n")
    log.chmod(0o644)
    before = {p: _state(p) for p in (disk, log)}
    spec = _guest_with_disk(tiny_uml, f"restore-{how}", disk, log)
    with launch(spec, registry=registry) as guest:  # type: ignore[arg-type]
        guest.console.expect_line("SVIRT-READY", timeout=60)
        uid, _ = _uid(guest)
        assert disk.stat().st_uid == uid and disk.stat().st_mode & 0o777 == 0o600
        assert log.stat().st_uid == uid
        if how == "hypervisor-sigkill":
            os.kill(guest.pid, signal.SIGKILL)
            outcome = guest.wait(10)
            assert outcome is not None and outcome.kind is OutcomeKind.CRASH
    assert {p: _state(p) for p in (disk, log)} == before
    assert log.read_text().startswith("earlier run\n")  # appended, never truncated
    assert registry.records() == []
    assert pids_of_uid(uid) == []


def test_restored_after_launcher_sigkill_and_svirt_gc(
    tiny_uml: TinyGuest, image_dir: Path, run_root: Path
) -> None:
    disk = _disk(image_dir / "k.img", mode=0o640)
    log = image_dir / "k.log"
    before = _state(disk)
    spec = write_spec(image_dir / "k.toml", "launcher-killed", "uml", tiny_uml,
                      extra=f'[console]\nlog = "{log}"\n[[disk]]\npath = "{disk}"\n')
    proc = subprocess.Popen([sys.executable, "-m", "tests.integration.launcher_proc", str(spec)],
                            cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    info = json.loads(proc.stdout.readline())
    uid = int(info["labels"]["dac"].split(":")[0])
    assert disk.stat().st_uid == uid
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    # PR_SET_PDEATHSIG: the hypervisor dies with its supervisor
    assert wait_for(lambda: not os.path.exists(f"/proc/{info['pid']}"), 5)
    assert len(Registry(run_root).records()) == 1  # the record is left for gc
    assert disk.stat().st_uid == uid
    gc = svirt_cli("gc")
    assert gc.returncode == 0, gc.stderr
    assert "released guest launcher-killed" in gc.stdout
    assert f"{disk}: restored" in gc.stdout
    assert _state(disk) == before
    assert not log.exists() or log.stat().st_uid == 0
    assert Registry(run_root).records() == []
    # (lines before it may name stale host claims of other registries)
    assert svirt_cli("gc").stdout.strip().splitlines()[-1] == "svirt gc: nothing to release"


def test_writable_image_in_use_by_another_guest_is_refused(
    tiny_uml: TinyGuest, image_dir: Path, launch_guest: Callable[..., Guest],
    registry: Registry,
) -> None:
    disk = _disk(image_dir / "shared.img")
    first = launch_guest(tiny_spec(tiny_uml, "holder", Backend.UML, disks=(Disk(disk),)))
    uid, _ = _uid(first)
    with pytest.raises(SecurityError, match="in use by guest holder"):
        with launch(tiny_spec(tiny_uml, "intruder", Backend.UML, disks=(Disk(disk),)),
                    registry=registry):
            pass
    assert [r.name for r in registry.records()] == ["holder"]
    assert disk.stat().st_uid == uid  # the failed launch restored nothing of holder's


def test_shared_disks_may_be_held_by_two_guests(
    tiny_uml: TinyGuest, image_dir: Path, launch_guest: Callable[..., Guest]
) -> None:
    disk = _disk(image_dir / "both.img", mode=0o600)
    before = _state(disk)
    a = launch_guest(tiny_spec(tiny_uml, "share-a", Backend.UML,
                               disks=(Disk(disk, shared=True),)))
    b = launch_guest(tiny_spec(tiny_uml, "share-b", Backend.UML,
                               disks=(Disk(disk, shared=True),)))
    for g in (a, b):
        g.console.expect_line("SVIRT-READY", timeout=60)
        uid, gid = _uid(g)
        assert open_as(uid, gid, disk, os.O_RDWR) == 0
    a.stop()
    b.stop()
    a.supervisor.wait()
    assert disk.stat().st_uid == before[0]


def test_guest_names_are_unique(
    tiny_uml: TinyGuest, launch_guest: Callable[..., Guest], registry: Registry
) -> None:
    launch_guest(tiny_spec(tiny_uml, "same", Backend.UML))
    with pytest.raises(StateError, match="already running"):
        with launch(tiny_spec(tiny_uml, "same", Backend.UML), registry=registry):
            pass


def test_svirt_list_Z_shows_distinct_labels(  # noqa: N802 - the flag is -Z
    tiny_uml: TinyGuest, launch_guest: Callable[..., Guest]
) -> None:
    guests = [launch_guest(tiny_spec(tiny_uml, f"list-{i}", Backend.UML)) for i in range(3)]
    for g in guests:  # booted: a stop sent before /init's trap would wait out the ladder
        g.console.expect_line("SVIRT-READY", timeout=60)
    out = svirt_cli("list", "-Z")
    assert out.returncode == 0, out.stderr
    lines = [line for line in out.stdout.splitlines()[1:] if line.strip()]
    assert len(lines) == 3
    ids = {line.split()[-1] for line in lines}
    assert ids == {g.labels["dac"] for g in guests}
    data = json.loads(svirt_cli("list", "--json").stdout)
    assert sorted(r["name"] for r in data) == ["list-0", "list-1", "list-2"]


def test_twenty_concurrent_launchers_get_distinct_slots(
    tiny_uml: TinyGuest, image_dir: Path, run_root: Path
) -> None:
    release = image_dir / "release"
    procs = []
    for i in range(20):
        spec = write_spec(image_dir / f"c{i}.toml", f"conc-{i}", "uml", tiny_uml)
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "tests.integration.launcher_proc", str(spec), str(release)],
            cwd=ROOT, stdout=subprocess.PIPE, text=True))
    infos = []
    try:
        for p in procs:
            assert p.stdout is not None
            line = p.stdout.readline()
            assert line, "a launcher died before its guest booted"
            infos.append(json.loads(line))
        assert len({i["slot"] for i in infos}) == 20
        assert len({i["labels"]["dac"] for i in infos}) == 20
        assert len({i["name"] for i in infos}) == 20
        assert len(Registry(run_root).records()) == 20
    finally:
        release.touch()
        for p in procs:
            p.wait(120)
    uids = [int(i["labels"]["dac"].split(":")[0]) for i in infos]
    assert all(pids_of_uid(u) == [] for u in uids)
    assert Registry(run_root).records() == []


def test_disk_owned_by_another_running_guest_outside_the_registry_is_refused(
    tiny_uml: TinyGuest, image_dir: Path, launch_guest: Callable[..., Guest], run_root: Path
) -> None:
    """A guest started by another tool (another registry here) still counts."""
    other = Registry(run_root / "other-tool")
    disk = _disk(image_dir / "theirs.img")
    with launch(tiny_spec(tiny_uml, "theirs", Backend.UML, disks=(Disk(disk),)),
                registry=other) as theirs:
        theirs.console.expect_line("SVIRT-READY", timeout=60)
        owner = disk.stat().st_uid
        with pytest.raises(SecurityError, match="another guest's"):
            launch_guest(tiny_spec(tiny_uml, "mine", Backend.UML, disks=(Disk(disk),)))
        assert disk.stat().st_uid == owner
