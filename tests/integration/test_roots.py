"""Image roots are an allow-list, walked by fd: real symlinks, bind mounts,
device nodes and FIFOs on this host's kernel."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from svirt.errors import RelabelRefused, SecurityError
from svirt.images.build import TinyGuest
from svirt.launcher.launch import Guest
from svirt.launcher.registry import Registry
from svirt.resources import Access, Resource, ResourceKind
from svirt.security.files import Roots, launch_roots, open_log, open_object, open_resource
from svirt.spec import Backend, Console, Disk, Security
from svirt.testing import tiny_spec, write_host_config

from .helpers import svirt_cli, write_spec


def _disk(path: Path, size: int = 1 << 20) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    path.chmod(0o644)
    return path


def _owner(path: Path) -> tuple[int, int, int]:
    st = path.stat()
    return st.st_uid, st.st_gid, st.st_mode


@pytest.fixture
def bind_mount() -> Iterator[Callable[[Path, Path], None]]:
    """mount --bind SOURCE TARGET for real; unmounted when the test ends."""
    mounted: list[Path] = []

    def mount(source: Path, target: Path) -> None:
        subprocess.run(["mount", "--bind", str(source), str(target)], check=True)
        mounted.append(target)

    yield mount
    for target in reversed(mounted):
        subprocess.run(["umount", str(target)], check=False)


def test_normal_launch_with_disk_and_log_in_the_roots(
    tiny_uml: TinyGuest, image_dir: Path, launch_guest: Callable[..., Guest]
) -> None:
    disk = _disk(image_dir / "ok.img")
    log = image_dir / "ok.log"
    guest = launch_guest(tiny_spec(tiny_uml, "roots-ok", Backend.UML, disks=(Disk(disk),),
                                   console=Console(log=log)))
    guest.console.expect_line("SVIRT-READY", timeout=120)
    uid = int(guest.labels["dac"].split(":")[0])
    assert log.stat().st_uid == uid  # the file being written is the one labelled
    assert disk.stat().st_uid == uid
    deadline = time.monotonic() + 5
    while b"SVIRT-READY" not in log.read_bytes() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert b"SVIRT-READY" in log.read_bytes()
    guest.stop()


def test_symlinked_parent_directory_is_refused(
    tiny_uml: TinyGuest, image_dir: Path, launch_guest: Callable[..., Guest]
) -> None:
    real = image_dir / "real"
    real.mkdir(mode=0o755)
    disk = _disk(real / "disk.img")
    (image_dir / "via").symlink_to(real)
    before = _owner(disk)
    spec = tiny_spec(tiny_uml, "roots-symdir", Backend.UML,
                     disks=(Disk(image_dir / "via" / "disk.img"),))
    with pytest.raises(RelabelRefused, match="is a symbolic link; svirt walks"):
        launch_guest(spec)
    assert _owner(disk) == before


def test_symlinked_parent_of_the_console_log_is_refused(
    tiny_uml: TinyGuest, image_dir: Path, launch_guest: Callable[..., Guest]
) -> None:
    real = image_dir / "logs"
    real.mkdir(mode=0o755)
    (image_dir / "via").symlink_to(real)
    spec = tiny_spec(tiny_uml, "roots-symlog", Backend.UML,
                     console=Console(log=image_dir / "via" / "c.log"))
    with pytest.raises(RelabelRefused, match="is a symbolic link; svirt walks"):
        launch_guest(spec)
    assert list(real.iterdir()) == []  # nothing created through the link


def test_bind_mounted_directory_inside_a_root_is_refused(
    tiny_uml: TinyGuest, image_dir: Path, tmp_path: Path,
    launch_guest: Callable[..., Guest], bind_mount: Callable[[Path, Path], None]
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    victim = _disk(elsewhere / "disk.img")
    before = _owner(victim)
    mnt = image_dir / "mnt"
    mnt.mkdir(mode=0o755)
    bind_mount(elsewhere, mnt)
    assert (mnt / "disk.img").exists()
    spec = tiny_spec(tiny_uml, "roots-bind", Backend.UML, disks=(Disk(mnt / "disk.img"),))
    with pytest.raises(RelabelRefused, match="crosses a mount point"):
        launch_guest(spec)
    assert _owner(victim) == before


def test_file_bind_mounted_over_an_image_is_refused(
    image_dir: Path, tmp_path: Path, bind_mount: Callable[[Path, Path], None]
) -> None:
    victim = _disk(tmp_path / "secret.img")
    decoy = _disk(image_dir / "disk.img")
    bind_mount(victim, decoy)
    with pytest.raises(RelabelRefused, match="crosses a mount point"):
        open_resource(Resource(decoy, Access.RW, ResourceKind.DISK), launch_roots())


@pytest.mark.parametrize("kind", ["char", "block"])
def test_device_nodes_in_an_image_root_are_refused(
    kind: str, image_dir: Path, registry: Registry, tiny_uml: TinyGuest,
    launch_guest: Callable[..., Guest]
) -> None:
    node = image_dir / f"{kind}.img"
    mode = stat.S_IFCHR if kind == "char" else stat.S_IFBLK
    # /dev/null's and an unused loop device's numbers: opening either would work
    os.mknod(node, mode | 0o600, os.makedev(1, 3) if kind == "char" else os.makedev(7, 250))
    want = "is a character device" if kind == "char" else "is a block device"
    if kind == "block":  # the spec takes a block device: launch refuses it
        spec = tiny_spec(tiny_uml, "roots-blk", Backend.UML, disks=(Disk(node),))
        with pytest.raises(RelabelRefused, match=want):
            launch_guest(spec)
    for res_kind in (ResourceKind.DISK, ResourceKind.KERNEL, ResourceKind.BACKING,
                     ResourceKind.CONSOLE_LOG):
        with pytest.raises(RelabelRefused, match=want):
            open_resource(Resource(node, Access.RW, res_kind), launch_roots())
    with pytest.raises(RelabelRefused, match="console log .* is a device"):
        open_log(node, launch_roots())  # checked by an O_PATH fd: never opened for writing
    assert node.stat().st_uid == 0


def test_block_device_is_a_disk_only_under_block_device_roots(
    image_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    devs = image_dir / "dev"
    devs.mkdir()
    node = devs / "vdz"
    os.mknod(node, stat.S_IFBLK | 0o600, os.makedev(7, 250))
    char = devs / "null"
    os.mknod(char, stat.S_IFCHR | 0o600, os.makedev(1, 3))
    monkeypatch.setenv("SVIRT_CONFIG", str(write_host_config(
        image_dir / "svirt.toml", image_roots=[image_dir / "images"], block_device_roots=[devs])))
    roots = launch_roots()
    obj = open_resource(Resource(node, Access.RW, ResourceKind.DISK), roots)
    try:
        assert stat.S_ISBLK(obj.st_mode)
    finally:
        obj.close()
    with pytest.raises(RelabelRefused, match="outside the image roots"):
        open_resource(Resource(node, Access.RO, ResourceKind.KERNEL), roots)
    with pytest.raises(RelabelRefused, match="is a character device"):
        open_resource(Resource(char, Access.RW, ResourceKind.DISK), roots)
    _disk(devs / "plain.img")
    with pytest.raises(RelabelRefused, match="outside the image roots"):
        open_resource(Resource(devs / "plain.img", Access.RW, ResourceKind.DISK), roots)


@pytest.fixture
def outside_dir() -> Iterator[Path]:
    """A directory guest uids may traverse, under no root of the test config."""
    path = Path(tempfile.mkdtemp(prefix="svirt-out-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_objects_outside_the_roots_are_refused(
    tiny_uml: TinyGuest, image_dir: Path, outside_dir: Path,
    launch_guest: Callable[..., Guest], monkeypatch: pytest.MonkeyPatch
) -> None:
    tmp_path = outside_dir
    outside = _disk(tmp_path / "disk.img")
    spec = tiny_spec(tiny_uml, "roots-out", Backend.UML, disks=(Disk(outside),))
    with pytest.raises(RelabelRefused, match="outside the image roots"):
        launch_guest(spec)
    log_spec = tiny_spec(tiny_uml, "roots-outlog", Backend.UML,
                         console=Console(log=tmp_path / "c.log"))
    with pytest.raises(RelabelRefused, match="outside the log and image roots"):
        launch_guest(log_spec)
    assert not (tmp_path / "c.log").exists()
    # a host config whose roots leave out the image directory
    monkeypatch.setenv("SVIRT_CONFIG", str(write_host_config(
        tmp_path / "svirt.toml", image_roots=["/var/lib/svirt/images"],
        log_roots=["/var/log/svirt"])))
    disk = _disk(image_dir / "disk.img")
    with pytest.raises(RelabelRefused, match="outside the image roots"):
        open_object(disk)


def test_spec_roots_wider_than_the_host_roots_are_refused(
    tiny_uml: TinyGuest, image_dir: Path, launch_guest: Callable[..., Guest]
) -> None:
    disk = _disk(image_dir / "disk.img")
    wide = tiny_spec(tiny_uml, "roots-wide", Backend.UML, disks=(Disk(disk),),
                     security=Security(image_roots=(Path("/var"),)))
    with pytest.raises(SecurityError, match="/var is not inside a host image root"):
        launch_guest(wide)
    sub = image_dir / "only"
    sub.mkdir()
    narrow = tiny_spec(tiny_uml, "roots-narrow", Backend.UML, disks=(Disk(disk),),
                       security=Security(image_roots=(sub,)))
    with pytest.raises(RelabelRefused, match=f"outside the image roots \\({sub}\\)"):
        launch_guest(narrow)
    assert disk.stat().st_uid == 0


def test_fifo_console_log_is_refused_at_once(
    tiny_uml: TinyGuest, image_dir: Path, run_root: Path
) -> None:
    fifo = image_dir / "console.log"
    os.mkfifo(fifo)
    spec = write_spec(image_dir / "f.toml", "roots-fifo", "uml", tiny_uml,
                      extra=f'[console]\nlog = "{fifo}"\n')
    t0 = time.monotonic()
    try:
        proc = svirt_cli("run", str(spec), timeout=20)
    except subprocess.TimeoutExpired:
        pytest.fail("svirt run hung on a FIFO console log")
    assert time.monotonic() - t0 < 10
    assert proc.returncode == 1, proc.stderr
    assert "is a FIFO" in proc.stderr
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and fifo.stat().st_uid == 0
    assert Registry(run_root).records() == []


def test_roots_object_pins_the_log_it_writes(image_dir: Path) -> None:
    roots = Roots((), logs=(image_dir,))
    log = image_dir / "c.log"
    fd = open_log(log, roots)
    try:
        obj = open_resource(Resource(log, Access.RW, ResourceKind.CONSOLE_LOG), roots)
        try:
            st = os.fstat(fd)
            assert obj.key == roots.pins[log]
            assert obj.key.startswith(f"{st.st_dev}-{st.st_ino}")
        finally:
            obj.close()
    finally:
        os.close(fd)
