"""Firmware boot in the spec and QEMU's argv: kernel optional for qemu only,
``firmware``, ``nvram``, ``boot``, ``[[cdrom]]``; every bad combination a
SpecError keyed by its field; golden argv for the new shapes (the existing
golden files stay as they were)."""

from __future__ import annotations

import tomllib
import uuid as uuidlib
from pathlib import Path
from typing import Any

import pytest

from svirt.backends.base import Prepared
from svirt.backends.qemu import QemuBackend
from svirt.errors import SpecError
from svirt.images import firmware as fw
from svirt.resources import Access, ResourceKind
from svirt.spec import (
    Backend,
    BootFrom,
    Cdrom,
    Disk,
    Firmware,
    GuestSpec,
    firmware_of,
    spec_from_mapping,
    spec_to_mapping,
)
from tests.unit.test_argv import after, check_golden, qemu_opts

UUID = uuidlib.UUID("3c9a7e52-8d41-4f06-b2e7-5a1d0c6f9b38")
DISK = Disk(Path("/img/boot.img"))
CD = Cdrom(Path("/img/boot.iso"))


def spec(**kw: Any) -> GuestSpec:
    return GuestSpec(name="fw", uuid=UUID, **kw)


@pytest.mark.parametrize(("kw", "key", "words"), [
    ({}, "kernel", "nothing for firmware to boot"),
    ({"backend": Backend.UML, "disks": (DISK,)}, "kernel", "needs the UML binary"),
    ({"backend": Backend.LGUEST, "disks": (DISK,)}, "kernel", "needs a kernel"),
    ({"backend": Backend.UML, "kernel": Path("/k"), "firmware": "bios"}, "firmware", "never"),
    ({"backend": Backend.LGUEST, "kernel": Path("/k"), "cdroms": (CD,)}, "cdrom", "never"),
    ({"backend": Backend.UML, "kernel": Path("/k"), "boot": "cdrom"}, "boot", "never"),
    ({"disks": (DISK,), "nvram": Path("/img/v.fd")}, "nvram", "only a UEFI guest"),
    ({"disks": (DISK,), "firmware": "bios", "nvram": Path("/img/v.fd")}, "nvram", "UEFI"),
    ({"disks": (DISK,), "boot": "cdrom"}, "boot", "needs a [[cdrom]]"),
    ({"cdroms": (CD,)}, "boot", "needs a [[disk]]"),
    ({"kernel": Path("/k"), "cdroms": (CD,), "boot": "cdrom"}, "boot", "boots that kernel"),
    ({"disks": (DISK,), "initrd": Path("/i")}, "initrd", "goes with a kernel"),
    ({"disks": (DISK,), "cmdline": "quiet"}, "cmdline", "goes with a kernel"),
    ({"disks": (DISK,), "cdroms": (Cdrom(DISK.path),)}, "cdrom[0].path", "also a disk"),
    ({"disks": (DISK,), "firmware": "uefi", "nvram": DISK.path}, "nvram", "also a disk"),
    ({"disks": (DISK,), "cdroms": (CD,) * 5}, "cdrom", "at most 4"),
    ({"disks": (DISK,), "firmware": "coreboot"}, "firmware", "coreboot"),
    ({"disks": (DISK,), "boot": "net"}, "boot", "net"),
])
def test_bad_combinations_are_refused_by_key(kw: dict[str, Any], key: str, words: str) -> None:
    with pytest.raises(SpecError) as err:
        spec(**kw)
    assert err.value.key == key
    assert words in str(err.value)


def test_defaults_bios_without_a_kernel_and_none_with_one() -> None:
    assert firmware_of(spec(disks=(DISK,))) is Firmware.BIOS
    assert firmware_of(spec(kernel=Path("/k"))) is None
    assert firmware_of(spec(kernel=Path("/k"), firmware="uefi")) is Firmware.UEFI
    assert spec(cdroms=(CD,), boot="cdrom").boot is BootFrom.CDROM


def test_toml_round_trip() -> None:
    text = """
name = "fw"
firmware = "uefi"
nvram = "vars/fw.fd"
boot = "cdrom"
[[disk]]
path = "boot.img"
[[cdrom]]
path = "boot.iso"
"""
    s = spec_from_mapping(tomllib.loads(text), Path("/img"))
    assert s.firmware is Firmware.UEFI and s.nvram == Path("/img/vars/fw.fd")
    assert s.cdroms == (CD,) and s.kernel is None
    back = spec_to_mapping(s)
    assert back["cdrom"] == [{"path": "/img/boot.iso"}] and "kernel" not in back
    assert spec_from_mapping(back) == s


def _argv(s: GuestSpec, tmp: Path) -> tuple[str, ...]:
    home = tmp / "run" / "guest.d" / "home"
    home.mkdir(parents=True, exist_ok=True)
    return QemuBackend().command(s, Prepared(run_dir=home)).argv


def test_golden_bios_disk(tmp_path: Path) -> None:
    argv = check_golden("qemu_bios_disk", _argv(spec(disks=(DISK,)), tmp_path), tmp_path)
    assert "-kernel" not in argv and "-append" not in argv
    assert after(argv, "-bios") == [str(fw.SEABIOS)]
    assert after(argv, "-device") == ["virtio-blk-pci,drive=disk0,bootindex=1"]


def test_golden_uefi_transient_cdrom_boot(tmp_path: Path) -> None:
    s = spec(disks=(DISK,), cdroms=(CD,), firmware="uefi", boot="cdrom")
    argv = check_golden("qemu_uefi_cdrom", _argv(s, tmp_path), tmp_path)
    assert after(argv, "-machine") == ["q35,pflash0=fw-code,pflash1=fw-vars"]
    nodes = [dict(qemu_opts(b)) for b in after(argv, "-blockdev")]
    assert nodes[0] == {"driver": "file", "filename": str(fw.OVMF_CODE),
                        "node-name": "fw-code-file", "read-only": "on"}
    assert nodes[2]["filename"] == "$TMP/run/guest.d/nvram.fd"
    assert "read-only" not in nodes[2] and "read-only" not in nodes[3]
    assert after(argv, "-device") == ["virtio-blk-pci,drive=disk0",
                                      "ide-cd,drive=cd0,bootindex=1"]
    assert dict(qemu_opts(after(argv, "-drive")[1]))["readonly"] == "on"


def test_golden_uefi_persistent_with_kernel(tmp_path: Path) -> None:
    s = spec(kernel=Path("/img/vmlinuz"), firmware="uefi", nvram=Path("/img/a,b.fd"))
    argv = check_golden("qemu_uefi_kernel", _argv(s, tmp_path), tmp_path)
    assert after(argv, "-kernel") == ["/img/vmlinuz"]
    assert "bootindex" not in " ".join(argv)
    store = dict(qemu_opts(after(argv, "-blockdev")[2]))
    assert store["filename"] == "/img/a,b.fd"  # the comma doubled, not an option


def test_resources(tmp_path: Path) -> None:
    home = tmp_path / "g.d" / "home"
    transient = QemuBackend().resources(spec(disks=(DISK,), cdroms=(CD,), firmware="uefi"),
                                        home)
    assert [(r.path, r.access, r.kind) for r in transient[1:]] == [
        (CD.path, Access.RO, ResourceKind.CDROM),
        (tmp_path / "g.d" / "nvram.fd", Access.RW, ResourceKind.LAYER)]
    persistent = QemuBackend().resources(
        spec(disks=(DISK,), firmware="uefi", nvram=Path("/img/v.fd")), home)
    assert (persistent[-1].path, persistent[-1].kind) == (Path("/img/v.fd"), ResourceKind.DISK)
    bios = QemuBackend().resources(spec(disks=(DISK,)), home)
    assert [r.kind for r in bios] == [ResourceKind.DISK]  # SeaBIOS: under /usr, not held
