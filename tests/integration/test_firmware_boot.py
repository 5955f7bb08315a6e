"""Guests without a kernel: firmware boots a disk (or a cdrom) under TCG.

The image is the tiny QEMU guest behind GRUB (svirt/images/bootdisk.py), one
file that boots as a disk through SeaBIOS and through OVMF, and as a cdrom;
its ``/init`` prints the usual marker.  Each test boots its own guest (a
few seconds each under TCG): what they check differs per run (the NVRAM's
life), so no two can share one.
"""

from __future__ import annotations

import filecmp
import json
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from svirt.images import firmware as fw
from svirt.images.bootdisk import boot_disk
from svirt.images.build import TinyGuest, guest_cmdline
from svirt.launcher.launch import Guest, launch
from svirt.launcher.registry import Registry
from svirt.spec import Accel, Cdrom, Disk, Firmware, GuestSpec

from .helpers import pids_of_uid, svirt_cli, wait_for

ROOT = Path(__file__).resolve().parents[2]
MARKER = "SVIRT-READY"
BOOT_SECONDS = 120


@pytest.fixture(scope="module")
def disk(tiny_qemu: TinyGuest) -> Path:
    if not (fw.SEABIOS.exists() and fw.OVMF_CODE.exists()):
        pytest.skip(fw.PACKAGE_HINT)
    return boot_disk(tiny_qemu, guest_cmdline("shell"))


def fw_spec(name: str, disk: Path, **kw: object) -> GuestSpec:
    media: dict[str, object] = {"disks": (Disk(disk, readonly=True),)}
    if kw.pop("cdrom", False):  # the same image, as an ISO on a cd drive
        media = {"cdroms": (Cdrom(disk),), "boot": "cdrom"}
    return GuestSpec(name=name, accel=Accel.TCG, memory=256, shutdown_timeout=20,
                     **media, **kw)  # type: ignore[arg-type]


def uid_of(guest: Guest) -> int:
    return int(guest.labels["dac"].split(":")[0])


def boot(spec: GuestSpec, registry: Registry, check: object = None) -> None:
    with launch(spec, registry=registry) as guest:
        guest.console.expect_line(MARKER, timeout=BOOT_SECONDS)
        if callable(check):
            check(guest)
        guest.stop()


def test_uefi_transient_nvram_is_the_guests_then_gone(disk: Path, registry: Registry) -> None:
    store = registry.run_dir("fw-uefi") / fw.TRANSIENT_NVRAM
    owners: list[tuple[int, int, int]] = []

    def check(guest: Guest) -> None:
        st = store.stat()
        owners.append((st.st_uid, uid_of(guest), stat.S_IMODE(st.st_mode)))
        assert "BdsDxe" in guest.console.text()  # OVMF's boot manager

    # from a cdrom: the one UEFI cdrom boot (the persistent and gc tests boot the disk)
    boot(fw_spec("fw-uefi", disk, firmware="uefi", cdrom=True), registry, check)
    (uid, guest_uid, _mode), = owners
    assert uid == guest_uid
    assert not store.exists() and not registry.run_dir("fw-uefi").exists()


def test_bios_boots_a_cdrom(disk: Path, registry: Registry) -> None:
    seen: list[str] = []
    boot(fw_spec("fw-cd-bios", disk, cdrom=True), registry,
         lambda g: seen.append(g.console.text()))
    assert "GRUB" in seen[0]  # SeaBIOS ran the ISO's loader (El Torito), then the kernel
    assert filecmp.cmp(disk, disk)  # read-only: still the cached image
    assert stat.S_IMODE(disk.stat().st_mode) == 0o644 and disk.stat().st_uid == 0


def test_uefi_boots_a_kernel(tiny_qemu: TinyGuest, registry: Registry) -> None:
    spec = GuestSpec(name="fw-kernel", accel=Accel.TCG, memory=256, shutdown_timeout=20,
                     kernel=tiny_qemu.kernel, initrd=tiny_qemu.initrd,
                     cmdline=guest_cmdline("stay"), firmware=Firmware.UEFI)
    seen: list[str] = []
    boot(spec, registry, lambda g: seen.append(g.console.text()))
    assert "BdsDxe" in seen[0] or "EFI v" in seen[0]  # OVMF loaded the kernel


def test_svirt_run_a_command_in_a_firmware_booted_guest(disk: Path, image_dir: Path,
                                                       run_root: Path) -> None:
    spec = image_dir / "r.toml"
    # no kernel, no firmware named: SeaBIOS boots the disk
    spec.write_text(f'name = "fw-run"\naccel = "tcg"\nmemory = 256\n'
                    f'shutdown_timeout = 20\n[[disk]]\npath = "{disk}"\nreadonly = true\n')
    run = svirt_cli("run", str(spec), "--", "cat", "/proc/cmdline", timeout=BOOT_SECONDS)
    assert run.returncode == 0, run.stderr
    assert "BOOT_IMAGE=/boot/vmlinuz" in run.stdout  # GRUB's word: the disk's own loader
    assert Registry(run_root).records() == []


def test_persistent_nvram_keeps_what_firmware_wrote(disk: Path, image_dir: Path,
                                                    registry: Registry) -> None:
    store = image_dir / "vars.fd"
    spec = fw_spec("fw-keep", disk, firmware="uefi", nvram=store)
    during: list[tuple[int, int]] = []
    boot(spec, registry, lambda g: during.append((store.stat().st_uid, uid_of(g))))
    first = store.stat()
    assert (first.st_uid, first.st_gid, stat.S_IMODE(first.st_mode)) == (0, 0, 0o600)
    assert during[0][0] == during[0][1] != 0  # the guest's while it ran
    assert not filecmp.cmp(store, fw.OVMF_VARS, shallow=False)  # OVMF wrote to it
    written = store.read_bytes()
    store.chmod(0o640)  # an owner's own choice: kept, not reset to svirt's
    boot(spec, registry)
    second = store.stat()
    assert second.st_ino == first.st_ino  # the same store, not a fresh copy
    assert (second.st_uid, second.st_gid, stat.S_IMODE(second.st_mode)) == (0, 0, 0o640)
    assert store.read_bytes() != fw.OVMF_VARS.read_bytes()
    assert len(store.read_bytes()) == len(written)
    assert registry.records() == []


@pytest.mark.parametrize("persistent", [False, True], ids=["transient", "persistent"])
def test_nvram_after_sigkill_and_gc(persistent: bool, disk: Path, image_dir: Path,
                                    run_root: Path) -> None:
    name = f"fw-killed-{int(persistent)}"
    spec = image_dir / "k.toml"
    kept = image_dir / "kept.fd"
    nvram = f'nvram = "{kept}"\n' if persistent else ""
    spec.write_text(f'name = "{name}"\naccel = "tcg"\nfirmware = "uefi"\nmemory = 256\n'
                    f'{nvram}[[disk]]\npath = "{disk}"\nreadonly = true\n')
    proc = subprocess.Popen([sys.executable, "-m", "tests.integration.launcher_proc", str(spec)],
                            cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    info = json.loads(proc.stdout.readline())
    uid = int(info["labels"]["dac"].split(":")[0])
    store = kept if persistent else Registry(run_root).run_dir(name) / fw.TRANSIENT_NVRAM
    assert store.stat().st_uid == uid
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    assert wait_for(lambda: not os.path.exists(f"/proc/{info['pid']}"), 10)
    gc = svirt_cli("gc")
    assert gc.returncode == 0, gc.stderr
    assert not Registry(run_root).run_dir(name).exists()
    if persistent:  # given back: root's, 0600, as svirt made it
        st = store.stat()
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, 0, 0o600)
    else:
        assert not store.exists()
    assert pids_of_uid(uid) == []
    assert Registry(run_root).records() == []


def test_svirt_check_plans_a_store_it_will_make(disk: Path, image_dir: Path,
                                                run_root: Path) -> None:
    store = image_dir / "new-vars.fd"
    spec = image_dir / "c.toml"
    spec.write_text(f'name = "fw-check"\naccel = "tcg"\nfirmware = "uefi"\n'
                    f'nvram = "{store}"\n[[disk]]\npath = "{disk}"\nreadonly = true\n'
                    f'[[cdrom]]\npath = "{disk}.missing"\n')
    out = svirt_cli("check", "--json", str(spec))
    assert out.returncode == 2 and "cdrom[0].path" in out.stderr  # preflight: by its key
    spec.write_text(spec.read_text().split("[[cdrom]]")[0])
    out = svirt_cli("check", "--json", str(spec))
    assert out.returncode == 0, out.stderr
    plan = json.loads(out.stdout)
    assert "-kernel" not in plan["argv"] and "q35,pflash0=fw-code,pflash1=fw-vars" in plan["argv"]
    (nvram,) = [r for r in plan["resources"] if r["path"] == str(store)]
    assert nvram["made_by_launch"] and not nvram["refused"] and nvram["access"] == "rw"
    assert not store.exists()  # svirt check changes nothing
