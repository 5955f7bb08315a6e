"""Every refusal rule of safe relabelling, each with a real file."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from svirt.backends.base import Access, Resource, ResourceKind
from svirt.errors import RelabelRefused, SecurityError
from svirt.images.chain import backing_chain, parse_chain
from svirt.launcher.state import Registry
from svirt.security.files import open_object
from svirt.spec import Disk, DiskFormat, GuestSpec
from svirt.testing import require_root


def _file(path: Path, data: bytes = b"x") -> Path:
    path.write_bytes(data)
    return path


def test_symlink_as_final_component_is_refused(tmp_path: Path) -> None:
    target = _file(tmp_path / "real.img")
    link = tmp_path / "link.img"
    link.symlink_to(target)
    with pytest.raises(RelabelRefused, match="symbolic link"):
        open_object(link)
    open_object(target).close()  # the target itself is fine


def test_symlink_to_etc_shadow_is_refused(tmp_path: Path) -> None:
    link = tmp_path / "disk.img"
    link.symlink_to("/etc/shadow")
    with pytest.raises(RelabelRefused, match="symbolic link"):
        open_object(link)


def test_file_with_two_hard_links_is_refused(tmp_path: Path) -> None:
    first = _file(tmp_path / "a.img")
    os.link(first, tmp_path / "b.img")
    with pytest.raises(RelabelRefused, match="2 hard links"):
        open_object(first)


@pytest.mark.parametrize("path", ["/etc/passwd", "/usr/bin/env", "/proc/self/status",
                                  "/sys/kernel/uevent_seqnum", "/dev/null"])
def test_deny_listed_trees_are_refused(path: str) -> None:
    if not os.path.exists(path):
        pytest.skip(f"{path} does not exist here")
    with pytest.raises(RelabelRefused, match="never relabels"):
        open_object(Path(path))


def test_boot_is_deny_listed(tmp_path: Path) -> None:
    boots = [p for p in Path("/boot").glob("*") if p.is_file()] if Path("/boot").is_dir() else []
    if not boots:
        pytest.skip("/boot has no file on this machine")
    with pytest.raises(RelabelRefused, match="under /boot"):
        open_object(boots[0])


def test_outside_image_roots_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "images"
    root.mkdir()
    inside = _file(root / "ok.img")
    outside = _file(tmp_path / "elsewhere.img")
    open_object(inside, roots=(root,)).close()
    with pytest.raises(RelabelRefused, match="outside the image roots"):
        open_object(outside, roots=(root,))


def test_directory_symlink_into_denied_tree_is_caught_by_real_path(tmp_path: Path) -> None:
    (tmp_path / "etc-link").symlink_to("/etc")
    with pytest.raises(RelabelRefused, match="under /etc"):
        open_object(tmp_path / "etc-link" / "hostname")


def _spec(name: str, kernel: Path) -> GuestSpec:
    return GuestSpec(name=name, kernel=kernel, uuid=uuid.uuid4())


def test_writable_image_in_use_by_another_guest_is_refused(tmp_path: Path) -> None:
    registry = Registry(tmp_path / "run")
    kernel = _file(tmp_path / "vmlinuz")
    disk = _file(tmp_path / "disk.img")
    a = registry.reserve(_spec("a", kernel), [])
    b = registry.reserve(_spec("b", kernel), [])
    registry.hold(a, Resource(disk, Access.RW, ResourceKind.DISK), [], ())
    with pytest.raises(SecurityError, match="in use by guest a"):
        registry.hold(b, Resource(disk, Access.RW, ResourceKind.DISK), [], ())
    with pytest.raises(SecurityError, match="in use by guest a"):
        registry.hold(b, Resource(disk, Access.RO, ResourceKind.DISK), [], ())
    # read-only content and shared disks may be held by several guests
    registry.hold(a, Resource(kernel, Access.RO, ResourceKind.KERNEL), [], ())
    registry.hold(b, Resource(kernel, Access.RO, ResourceKind.KERNEL), [], ())
    shared = _file(tmp_path / "shared.img")
    registry.hold(a, Resource(shared, Access.SHARED, ResourceKind.DISK), [], ())
    registry.hold(b, Resource(shared, Access.SHARED, ResourceKind.DISK), [], ())
    registry.release(a)
    registry.hold(b, Resource(disk, Access.RW, ResourceKind.DISK), [], ())  # free again
    registry.release(b)
    assert registry.records() == []
    assert list((tmp_path / "run" / "objects").iterdir()) == []


def test_backing_file_without_recorded_format_is_refused() -> None:
    info = [{"filename": "/img/top.qcow2", "format": "qcow2",
             "backing-filename": "/etc/shadow", "full-backing-filename": "/etc/shadow"}]
    with pytest.raises(SecurityError, match="no recorded format"):
        parse_chain(info, Path("/img/top.qcow2"))


def test_real_backing_chain_is_listed(tmp_path: Path) -> None:
    import shutil
    import subprocess

    if shutil.which("qemu-img") is None:
        pytest.skip("qemu-img is not installed")
    base = tmp_path / "base.raw"
    top = tmp_path / "top.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(base), "1M"], check=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "raw",
                    str(top)], check=True)
    assert backing_chain(Disk(top, format=DiskFormat.QCOW2)) == [base]
    assert backing_chain(Disk(base)) == []


def test_selinux_labels_are_real_xattrs(tmp_path: Path) -> None:
    """Root can write security.selinux here although nothing enforces it."""
    require_root()
    from svirt.security.base import LiveProcesses
    from svirt.security.selinux import XATTR, SELinuxDriver

    driver = SELinuxDriver(
        launcher_context="system_u:system_r:unconfined_t:s0-s0:c0.c1023",
        domain_context="system_u:system_r:svirt_t:s0",
        image_context="system_u:object_r:svirt_image_t:s0",
        content_context="system_u:object_r:virt_content_t:s0",
        enforcing=False,
    )
    kernel = _file(tmp_path / "vmlinuz")
    disk = _file(tmp_path / "disk.img")
    original = "system_u:object_r:user_home_t:s0"
    os.setxattr(disk, XATTR, original.encode() + b"\0")
    registry = Registry(tmp_path / "run")
    record = registry.reserve(_spec("se", kernel), [driver])
    label = record.labels["selinux"]
    assert label.process.startswith("system_u:system_r:svirt_t:s0:c")
    registry.hold(record, Resource(disk, Access.RW, ResourceKind.DISK), [driver], ())
    registry.hold(record, Resource(kernel, Access.RO, ResourceKind.KERNEL), [driver], ())
    assert os.getxattr(disk, XATTR).rstrip(b"\0").decode() == label.image
    assert os.getxattr(kernel, XATTR).rstrip(b"\0").decode() == \
        "system_u:object_r:virt_content_t:s0"
    pair = label.image.rsplit(":", 1)[1]
    a, b = (int(c[1:]) for c in pair.split(","))
    assert a < b
    registry.release(record)
    assert os.getxattr(disk, XATTR).rstrip(b"\0").decode() == original
    with pytest.raises(OSError):
        os.getxattr(kernel, XATTR)  # it had none: removed again
    assert LiveProcesses().uids  # the live table is readable


def test_smack_labels_are_real_xattrs(tmp_path: Path) -> None:
    """SMACK is not active here; its labels are still written and restored for real."""
    require_root()
    from svirt.security.smack import XATTR, SmackDriver

    kernel = _file(tmp_path / "vmlinuz")
    disk = _file(tmp_path / "disk.img")
    registry = Registry(tmp_path / "run")
    driver = SmackDriver()
    record = registry.reserve(_spec("sm", kernel), [driver])
    label = record.labels["smack"]
    assert label.process == f"svirt-{record.slot}"
    registry.hold(record, Resource(disk, Access.RW, ResourceKind.DISK), [driver], ())
    registry.hold(record, Resource(kernel, Access.RO, ResourceKind.KERNEL), [driver], ())
    assert os.getxattr(disk, XATTR) == label.process.encode()
    assert os.getxattr(kernel, XATTR) == b"_"
    registry.release(record)
    for path in (disk, kernel):
        with pytest.raises(OSError):
            os.getxattr(path, XATTR)
