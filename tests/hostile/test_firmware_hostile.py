"""Attacks on a firmware-booted QEMU guest's NVRAM and cdrom, through the real launch.

While the guest runs, its persistent NVRAM is its uid's (DAC): after exec it
may truncate it, extend it, chmod it or hard-link it into a directory it can
write (``/var/tmp``, on the image root's file system).  It cannot rename or
replace it (the directory is root's); whoever can write there between runs
(an admin's slip, another tool) may plant a symlink, a FIFO or a hard link
to another guest's store at its name, or a symlink where the cdrom was.
Each test plays that, then checks the next run refuses (or the release put
back what it changed), that nothing of root's was followed, and that the
store's owner and mode come back.  The guests are real QEMU under TCG with
OVMF, stopped as soon as the attack is done (no boot needed: the store is
held from before exec).
"""

from __future__ import annotations

import hashlib
import os
import signal
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from svirt.errors import SvirtError
from svirt.images import firmware as fw
from svirt.images.bootdisk import boot_disk
from svirt.images.build import TinyGuest, guest_cmdline, tiny_qemu_guest
from svirt.launcher.launch import Guest, launch
from svirt.launcher.registry import Registry
from svirt.spec import Accel, BootFrom, Cdrom, Disk, Firmware, GuestSpec

from .helpers import run_as

pytestmark = pytest.mark.skipif(not fw.OVMF_VARS.exists(), reason=fw.PACKAGE_HINT)


@pytest.fixture(scope="module")
def tiny() -> TinyGuest:
    return tiny_qemu_guest()


@pytest.fixture(scope="module")
def disk(tiny: TinyGuest) -> Path:
    return boot_disk(tiny, guest_cmdline("shell"))  # the same image as the boot tests


@pytest.fixture
def alarm() -> Iterator[None]:
    """A FIFO opened by mistake would block forever: fail in 60 s instead."""
    def expired(signum: int, frame: object) -> None:
        raise TimeoutError("blocked: something opened a FIFO")

    old = signal.signal(signal.SIGALRM, expired)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def spec(name: str, disk: Path, nvram: Path, **kw: object) -> GuestSpec:
    return GuestSpec(name=name, accel=Accel.TCG, memory=256, shutdown_timeout=5,
                     disks=(Disk(disk, readonly=True),), firmware=Firmware.UEFI, nvram=nvram,
                     **kw)  # type: ignore[arg-type]


def ids(guest: Guest) -> tuple[int, int]:
    uid, gid = guest.labels["dac"].split(":")
    return int(uid), int(gid)


def meta(path: Path) -> tuple[str, int, int, int, int]:
    st = path.lstat()
    return (hashlib.sha256(path.read_bytes()).hexdigest(), st.st_uid, st.st_gid,
            stat.S_IMODE(st.st_mode), st.st_nlink)


def run_and(s: GuestSpec, registry: Registry, attack: Callable[[Guest], None]) -> None:
    with launch(s, registry=registry) as guest:
        attack(guest)
        guest.stop(0)


def _as_guest(guest: Guest, fn: Callable[..., None], *args: object) -> None:
    problem = run_as(*ids(guest), fn, *args)
    assert problem == "", problem  # the guest's own file while it runs: allowed


def _truncate(path: Path) -> None:
    os.truncate(path, 4096)


def _extend(path: Path) -> None:
    os.truncate(path, 1 << 30)  # a sparse GiB


def _chmod(path: Path) -> None:
    os.chmod(path, 0o4777)  # noqa: S103 - setuid, world-writable: root's if kept


def _link(path: Path) -> None:
    os.link(path, path.parent.parent / f"{path.parent.name}-stolen.fd")


@pytest.mark.parametrize("attack", [_truncate, _extend, _chmod, _link])
def test_guest_damages_its_store_then_next_run(attack: Callable[[Path], None], disk: Path,
                                               image_dir: Path,
                                               hostile_registry: Registry) -> None:
    store = image_dir / "vars.fd"
    stolen = image_dir.parent / f"{image_dir.name}-stolen.fd"
    s = spec("fwh-damage", disk, store)
    try:
        run_and(s, hostile_registry, lambda g: _as_guest(g, attack, store))
        _digest, uid, gid, mode, _links = meta(store)
        assert (uid, gid, mode) == (0, 0, 0o600)  # owner and mode back, whatever it did
        if attack is _chmod:  # nothing left to refuse: the next run goes
            run_and(s, hostile_registry, lambda g: None)
            return
        with pytest.raises(SvirtError) as err:
            run_and(s, hostile_registry, lambda g: None)
        assert "NVRAM" in err.value.message
        assert hostile_registry.records() == []
    finally:
        stolen.unlink(missing_ok=True)


@pytest.mark.parametrize("plant", ["symlink", "fifo", "hardlink"])
def test_store_replaced_between_runs_is_refused(plant: str, disk: Path, image_dir: Path,
                                                hostile_registry: Registry,
                                                alarm: None) -> None:
    other = image_dir / "other.fd"
    run_and(spec("fwh-other", disk, other), hostile_registry, lambda g: None)
    before = meta(other)
    store = image_dir / "mine.fd"
    if plant == "symlink":
        store.symlink_to(other)
    elif plant == "fifo":
        os.mkfifo(store, 0o600)
    else:
        os.link(other, store)
    with pytest.raises(SvirtError) as err:
        run_and(spec("fwh-mine", disk, store), hostile_registry, lambda g: None)
    assert "NVRAM" in err.value.message or "link" in err.value.message
    after = meta(other)
    assert after[:4] == before[:4]  # never followed, opened for writing or relabelled
    assert hostile_registry.records() == []


def test_symlink_to_shadow_is_never_followed(disk: Path, image_dir: Path,
                                             hostile_registry: Registry) -> None:
    shadow = Path("/etc/shadow")
    before = meta(shadow)
    store = image_dir / "vars.fd"
    store.symlink_to(shadow)
    with pytest.raises(SvirtError):
        run_and(spec("fwh-shadow", disk, store), hostile_registry, lambda g: None)
    assert meta(shadow) == before


def test_cdrom_swapped_for_a_symlink(disk: Path, image_dir: Path,
                                     hostile_registry: Registry) -> None:
    canary = image_dir / "canary.iso"
    canary.write_bytes(b"root's own\n")
    canary.chmod(0o600)
    before = meta(canary)
    iso = image_dir / "boot.iso"
    iso.symlink_to(canary)
    s = GuestSpec(name="fwh-cd", accel=Accel.TCG, memory=256, cdroms=(Cdrom(iso),),
                  boot=BootFrom.CDROM)
    with pytest.raises(SvirtError) as err:
        run_and(s, hostile_registry, lambda g: None)
    assert "symbolic link" in err.value.message or "symlink" in err.value.message
    assert meta(canary) == before
    assert hostile_registry.records() == []


def test_one_store_for_two_guests_at_once_is_refused(disk: Path, image_dir: Path,
                                                     hostile_registry: Registry) -> None:
    store = image_dir / "shared.fd"
    with launch(spec("fwh-first", disk, store), registry=hostile_registry) as first:
        owner = store.stat().st_uid
        assert owner == ids(first)[0]
        with pytest.raises(SvirtError) as err:
            run_and(spec("fwh-second", disk, store), hostile_registry, lambda g: None)
        assert "in use by guest fwh-first" in err.value.message, err.value.message
        assert store.stat().st_uid == owner  # still the first guest's alone
        first.stop(0)
    assert meta(store)[1:4] == (0, 0, 0o600)
    assert hostile_registry.records() == []


def test_store_outside_the_image_roots_is_refused(disk: Path, tmp_path: Path,
                                                  hostile_registry: Registry) -> None:
    store = tmp_path / "vars.fd"  # pytest's tmp: no image root
    with pytest.raises(SvirtError) as err:
        run_and(spec("fwh-outside", disk, store), hostile_registry, lambda g: None)
    assert "outside the image roots" in err.value.message
    assert not store.exists()
    assert hostile_registry.records() == []
