"""Ephemeral disks without root: the spec key, its refusals, argv and resources."""

from __future__ import annotations

import os
import uuid as uuidlib
from pathlib import Path

import pytest

from svirt.backends.base import Prepared
from svirt.backends.qemu import QemuBackend
from svirt.backends.uml import UmlBackend
from svirt.errors import SpecError
from svirt.preflight import check_spec
from svirt.resources import Access, ResourceKind, layer_path
from svirt.spec import Backend, Disk, DiskFormat, GuestSpec, load_spec

UUID = uuidlib.UUID("3c9a7e52-8d41-4f06-b2e7-5a1d0c6f9b38")


@pytest.fixture
def img(tmp_path: Path) -> Path:
    d = tmp_path / "img"
    d.mkdir()
    for name in ("vmlinuz", "base.img", "base.qcow2", "data.img"):
        (d / name).write_bytes(b"\0" * 512)
    linux = d / "linux"
    linux.write_bytes(b"#!/bin/false\n")
    linux.chmod(0o755)
    return d


def _toml(img: Path, disk: str, backend: str = "qemu") -> Path:
    kernel = "linux" if backend == "uml" else "vmlinuz"
    path = img / "guest.toml"
    path.write_text(f'name = "eph"\nbackend = "{backend}"\nkernel = "{kernel}"\n'
                    f'[[disk]]\n{disk}\n')
    return path


def _error(img: Path, disk: str, backend: str = "qemu") -> SpecError:
    with pytest.raises(SpecError) as info:
        load_spec(_toml(img, disk, backend))
    return info.value


# ------------------------------------------------------------------ the key


def test_ephemeral_defaults_to_false(img: Path) -> None:
    spec = load_spec(_toml(img, 'path = "base.img"'))
    assert spec.disks[0].ephemeral is False


@pytest.mark.parametrize("backend", ["qemu", "uml"])
def test_ephemeral_true_is_read(img: Path, backend: str) -> None:
    spec = load_spec(_toml(img, 'path = "base.img"\nephemeral = true', backend))
    disk = spec.disks[0]
    assert disk.ephemeral is True and disk.path == img / "base.img"
    assert not disk.readonly and not disk.shared


def test_ephemeral_qcow2_base_with_a_declared_chain(img: Path) -> None:
    spec = load_spec(_toml(img, 'path = "base.qcow2"\nformat = "qcow2"\nephemeral = true\n'
                                'backing = [{path = "data.img", format = "raw"}]'))
    assert spec.disks[0].ephemeral and spec.disks[0].format is DiskFormat.QCOW2


@pytest.mark.parametrize("value, got", [('"yes"', "str"), ("1", "int")])
def test_ephemeral_must_be_a_boolean(img: Path, value: str, got: str) -> None:
    err = _error(img, f'path = "base.img"\nephemeral = {value}')
    assert err.key == "disk[0].ephemeral"
    assert f"expected true/false, got {got}" in err.message


def test_python_api_checks_the_type_too(img: Path) -> None:
    with pytest.raises(SpecError, match="disk.ephemeral: expected true/false"):
        Disk(img / "base.img", ephemeral="yes")  # type: ignore[arg-type]


# ----------------------------------------------------------------- refusals


def test_readonly_and_ephemeral_is_refused(img: Path) -> None:
    err = _error(img, 'path = "base.img"\nreadonly = true\nephemeral = true')
    assert err.key == "disk[0].ephemeral"
    assert "read-only disk has no writes to throw away" in err.message
    assert err.hint == "drop one of readonly and ephemeral"


def test_shared_and_ephemeral_is_refused(img: Path) -> None:
    err = _error(img, 'path = "base.img"\nshared = true\nephemeral = true')
    assert err.key == "disk[0].ephemeral"
    assert "shared" in err.message


def test_base_must_be_a_regular_file(img: Path) -> None:
    fifo = img / "fifo"
    os.mkfifo(fifo)
    spec = load_spec(_toml(img, 'path = "fifo"\nephemeral = true'))  # parsing does not look
    with pytest.raises(SpecError) as info:
        check_spec(spec)
    assert info.value.key == "disk[0].path"  # not a regular file or block device, already
    assert "is not a regular file or block device" in info.value.message


def test_block_device_base_is_refused(img: Path) -> None:
    if not os.path.exists("/dev/loop0"):
        pytest.skip("no /dev/loop0 to name")
    spec = GuestSpec(name="blk", kernel=img / "vmlinuz",
                     disks=(Disk(Path("/dev/loop0"), ephemeral=True),))
    with pytest.raises(SpecError, match="base of an ephemeral disk must be a regular file") \
            as info:
        check_spec(spec)
    assert info.value.key == "disk[0].path"
    assert info.value.hint == "copy the device into an image file first"


def test_qcow2_base_for_uml_is_refused_clearly(img: Path) -> None:
    err = _error(img, 'path = "base.qcow2"\nformat = "qcow2"\nephemeral = true', "uml")
    assert err.key == "disk.format"
    assert "an ephemeral uml disk needs a raw base" in err.message
    assert err.hint is not None and "qemu-img convert -O raw" in err.hint


def test_lguest_has_no_ephemeral_disks(img: Path) -> None:
    with pytest.raises(SpecError, match="lguest backend has no copy-on-write layer"):
        GuestSpec(name="lg", backend=Backend.LGUEST, kernel=img / "vmlinuz",
                  disks=(Disk(img / "base.img", ephemeral=True),))


# -------------------------------------------------------------- --ephemeral


def test_with_ephemeral_disks_leaves_read_only_disks_alone(img: Path) -> None:
    spec = GuestSpec(name="all", kernel=img / "vmlinuz", disks=(
        Disk(img / "base.img"), Disk(img / "data.img", readonly=True),
        Disk(img / "base.qcow2", shared=True)))
    eph = spec.with_ephemeral_disks()
    assert [d.ephemeral for d in eph.disks] == [True, False, True]
    assert [d.readonly for d in eph.disks] == [False, True, False]
    assert not any(d.shared for d in eph.disks)  # a layer is private by definition
    assert eph.with_ephemeral_disks() == eph


# ----------------------------------------------------- resources and argv


def _home(tmp: Path) -> Path:
    home = tmp / "run" / "guests" / "eph.d" / "home"
    home.mkdir(parents=True)
    return home


def test_qemu_overlay_is_private_and_base_read_only(tmp_path: Path, img: Path) -> None:
    spec = GuestSpec(name="eph", kernel=img / "vmlinuz", uuid=UUID,
                     disks=(Disk(img / "data.img"), Disk(img / "base.img", ephemeral=True)))
    home = _home(tmp_path)
    layer = home.parent / "layers" / "disk1.qcow2"
    assert layer_path(spec, 1, home) == layer
    res = [(r.path, r.access, r.kind) for r in QemuBackend().resources(spec, home)]
    assert (layer, Access.RW, ResourceKind.LAYER) in res
    assert (img / "base.img", Access.RO, ResourceKind.BACKING) in res
    assert (img / "data.img", Access.RW, ResourceKind.DISK) in res
    argv = QemuBackend().command(spec, Prepared(run_dir=home)).argv
    drives = [argv[i + 1] for i, a in enumerate(argv) if a == "-drive"]
    assert drives == [f"file={img}/data.img,format=raw,if=none,id=disk0",
                      f"file={layer},format=qcow2,if=none,id=disk1"]


def test_uml_cow_file_in_home_and_base_read_only(tmp_path: Path, img: Path) -> None:
    spec = GuestSpec(name="eph", backend=Backend.UML, kernel=img / "linux", uuid=UUID,
                     disks=(Disk(img / "base.img", ephemeral=True),))
    home = _home(tmp_path)
    res = [(r.path, r.access, r.kind) for r in UmlBackend().resources(spec, home)]
    # the COW file is UML's own, in its home (held already): no resource of its own
    assert res == [(home, Access.RW, ResourceKind.RUN_DIR),
                   (img / "base.img", Access.RO, ResourceKind.BACKING)]
    argv = UmlBackend().command(spec, Prepared(run_dir=home)).argv
    assert [a for a in argv if a.startswith("ubd")] == [
        f"ubd0={home}/.disk0.cow,{img}/base.img"]
