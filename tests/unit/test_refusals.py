"""Every refusal rule of safe relabelling, each with a real file."""

from __future__ import annotations

import errno
import os
import signal
import struct
import uuid
from pathlib import Path

import pytest

from svirt import config
from svirt.errors import ConfigError, HostError, RelabelRefused, SecurityError, SpecError
from svirt.images.chain import backing_chain, read_qcow2_backing
from svirt.launcher.registry import Registry
from svirt.resources import Access, Resource, ResourceKind
from svirt.security.files import Roots, launch_roots, open_object
from svirt.spec import Backing, Disk, DiskFormat, GuestSpec
from svirt.testing import require_root


def _file(path: Path, data: bytes = b"x") -> Path:
    path.write_bytes(data)
    return path


def test_symlink_as_final_component_is_refused(tmp_path: Path) -> None:
    target = _file(tmp_path / "real.img")
    link = tmp_path / "link.img"
    link.symlink_to(target)
    with pytest.raises(RelabelRefused, match="symbolic link"):
        open_object(link, roots=(tmp_path,))
    open_object(target, roots=(tmp_path,)).close()  # the target itself is fine


def test_symlink_to_etc_shadow_is_refused(tmp_path: Path) -> None:
    link = tmp_path / "disk.img"
    link.symlink_to("/etc/shadow")
    with pytest.raises(RelabelRefused, match="symbolic link"):
        open_object(link, roots=(tmp_path,))


def test_file_with_two_hard_links_is_refused(tmp_path: Path) -> None:
    first = _file(tmp_path / "a.img")
    os.link(first, tmp_path / "b.img")
    with pytest.raises(RelabelRefused, match="2 hard links"):
        open_object(first, roots=(tmp_path,))


@pytest.mark.parametrize("path", ["/etc/passwd", "/usr/bin/env", "/proc/self/status",
                                  "/sys/kernel/uevent_seqnum", "/dev/null"])
def test_deny_listed_trees_are_refused(path: str) -> None:
    if not os.path.exists(path):
        pytest.skip(f"{path} does not exist here")
    with pytest.raises(RelabelRefused, match="never relabels"):
        open_object(Path(path), roots=(Path("/"),))  # even under a root that holds it


def test_boot_is_deny_listed(tmp_path: Path) -> None:
    boots = [p for p in Path("/boot").glob("*") if p.is_file()] if Path("/boot").is_dir() else []
    if not boots:
        pytest.skip("/boot has no file on this machine")
    with pytest.raises(RelabelRefused, match="under /boot"):
        open_object(boots[0], roots=(Path("/boot"),))


def test_outside_image_roots_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "images"
    root.mkdir()
    inside = _file(root / "ok.img")
    outside = _file(tmp_path / "elsewhere.img")
    open_object(inside, roots=(root,)).close()
    with pytest.raises(RelabelRefused, match="outside the image roots"):
        open_object(outside, roots=(root,))


def test_directory_symlink_into_denied_tree_is_refused_by_the_walk(tmp_path: Path) -> None:
    (tmp_path / "etc-link").symlink_to("/etc")
    with pytest.raises(RelabelRefused, match="on its way down .* is a symbolic link"):
        open_object(tmp_path / "etc-link" / "hostname", roots=(tmp_path,))


def _spec(name: str, kernel: Path) -> GuestSpec:
    return GuestSpec(name=name, kernel=kernel, uuid=uuid.uuid4())


def test_writable_image_in_use_by_another_guest_is_refused(tmp_path: Path) -> None:
    registry = Registry(tmp_path / "run")
    roots = Roots((tmp_path,))
    kernel = _file(tmp_path / "vmlinuz")
    disk = _file(tmp_path / "disk.img")
    a = registry.reserve(_spec("a", kernel), [])
    b = registry.reserve(_spec("b", kernel), [])
    registry.hold(a, Resource(disk, Access.RW, ResourceKind.DISK), [], roots)
    with pytest.raises(SecurityError, match="in use by guest a"):
        registry.hold(b, Resource(disk, Access.RW, ResourceKind.DISK), [], roots)
    with pytest.raises(SecurityError, match="in use by guest a"):
        registry.hold(b, Resource(disk, Access.RO, ResourceKind.DISK), [], roots)
    # read-only content and shared disks may be held by several guests
    registry.hold(a, Resource(kernel, Access.RO, ResourceKind.KERNEL), [], roots)
    registry.hold(b, Resource(kernel, Access.RO, ResourceKind.KERNEL), [], roots)
    shared = _file(tmp_path / "shared.img")
    registry.hold(a, Resource(shared, Access.SHARED, ResourceKind.DISK), [], roots)
    registry.hold(b, Resource(shared, Access.SHARED, ResourceKind.DISK), [], roots)
    registry.release(a)
    registry.hold(b, Resource(disk, Access.RW, ResourceKind.DISK), [], roots)  # free again
    registry.release(b)
    assert registry.records() == []
    assert list(registry.objects.iterdir()) == []


def _qemu_img(*args: str) -> None:
    import shutil
    import subprocess

    if shutil.which("qemu-img") is None:
        pytest.skip("qemu-img is not installed")
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


def test_declared_backing_chain_matching_the_header_is_used(tmp_path: Path) -> None:
    base = tmp_path / "base.raw"
    mid = tmp_path / "mid.qcow2"
    top = tmp_path / "top.qcow2"
    _qemu_img("create", "-q", "-f", "raw", str(base), "1M")
    _qemu_img("create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", str(mid))
    _qemu_img("create", "-q", "-f", "qcow2", "-b", str(mid), "-F", "qcow2", str(top))
    disk = Disk(top, format=DiskFormat.QCOW2,
                backing=(Backing(mid, DiskFormat.QCOW2), Backing(base, DiskFormat.RAW)))
    assert backing_chain(disk, Roots((tmp_path,))) == [mid, base]
    assert backing_chain(Disk(base), Roots((tmp_path,))) == []


@pytest.mark.parametrize("backing, fmt, why", [
    ("/etc/shadow", "raw", "the spec declares"),
    ("/etc/shadow", None, "no format"),
    ("other.raw", "raw", "the spec declares"),
    ("base.raw", "qcow2", "the spec declares"),
    ("json:{\"file.filename\":\"/etc/shadow\"}", "raw", "the spec declares"),
])
def test_header_that_disagrees_with_the_spec_is_refused(
        tmp_path: Path, backing: str, fmt: str | None, why: str) -> None:
    base = tmp_path / "base.raw"
    (tmp_path / "other.raw").write_bytes(b"\0" * 4096)
    top = tmp_path / "top.qcow2"
    _qemu_img("create", "-q", "-f", "raw", str(base), "1M")
    _qemu_img("create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", str(top))
    # the guest owns its disk: it rewrites the header as it likes
    _qemu_img("rebase", "-u", "-f", "qcow2", "-b", backing, "-F", fmt or "raw", str(top))
    if fmt is None:  # qemu-img insists on a format: drop the extension by hand
        data = top.read_bytes()
        at = data.index(struct.pack(">I", 0xE2792ACA))
        top.write_bytes(data[:at] + struct.pack(">I", 0x0BADF00D) + data[at + 4:])
    disk = Disk(top, format=DiskFormat.QCOW2, backing=(Backing(base, DiskFormat.RAW),))
    with pytest.raises(SecurityError, match=why) as info:
        backing_chain(disk, Roots((tmp_path,)))
    assert str(top) in info.value.message


def test_undeclared_backing_file_is_refused(tmp_path: Path) -> None:
    base = tmp_path / "base.raw"
    top = tmp_path / "top.qcow2"
    _qemu_img("create", "-q", "-f", "raw", str(base), "1M")
    _qemu_img("create", "-q", "-f", "qcow2", "-b", str(base), "-F", "raw", str(top))
    with pytest.raises(SecurityError, match="declares none"):
        backing_chain(Disk(top, format=DiskFormat.QCOW2), Roots((tmp_path,)))
    plain = tmp_path / "plain.qcow2"
    _qemu_img("create", "-q", "-f", "qcow2", str(plain), "1M")
    with pytest.raises(SecurityError, match="names none"):
        backing_chain(Disk(plain, format=DiskFormat.QCOW2,
                           backing=(Backing(base, DiskFormat.RAW),)), Roots((tmp_path,)))


@pytest.mark.parametrize("header", [
    b"",
    b"QFI\xfb" + b"\0" * 10,
    b"QFI\xfb" + struct.pack(">IQI", 9, 0, 0) + b"\0" * 60,
    b"QFI\xfb" + struct.pack(">IQI", 3, 200, 5000) + b"\0" * 200,
    b"QFI\xfb" + struct.pack(">IQI", 3, 10**6, 10) + b"\0" * 200,
    b"QFI\xfb" + struct.pack(">IQI", 3, 120, 4) + b"\0" * 88 + struct.pack(">I", 10**6)
    + b"\0" * 100,
])
def test_hostile_headers_are_refused_cleanly(header: bytes) -> None:
    with pytest.raises(SecurityError):
        read_qcow2_backing(header)


def test_spec_backing_declarations_are_checked(tmp_path: Path) -> None:
    raw = tmp_path / "a.raw"
    raw.write_bytes(b"\0" * 512)
    base = tmp_path / "b.raw"
    base.write_bytes(b"\0" * 512)
    with pytest.raises(SpecError, match="only a qcow2 image has a backing file"):
        Disk(raw, backing=(Backing(base),))
    with pytest.raises(SpecError, match="twice"):
        Disk(raw, format=DiskFormat.QCOW2, backing=(Backing(raw),))


def test_selinux_labels_are_real_xattrs(tmp_path: Path) -> None:
    """Root can write security.selinux here although nothing enforces it."""
    require_root()
    from svirt.procfs import LiveProcesses
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
    roots = Roots((tmp_path,))
    record = registry.reserve(_spec("se", kernel), [driver])
    label = record.labels["selinux"]
    assert label.process.startswith("system_u:system_r:svirt_t:s0:c")
    registry.hold(record, Resource(disk, Access.RW, ResourceKind.DISK), [driver], roots)
    registry.hold(record, Resource(kernel, Access.RO, ResourceKind.KERNEL), [driver], roots)
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
    roots = Roots((tmp_path,))
    driver = SmackDriver()
    record = registry.reserve(_spec("sm", kernel), [driver])
    label = record.labels["smack"]
    assert label.process == f"svirt-{record.slot}"
    registry.hold(record, Resource(disk, Access.RW, ResourceKind.DISK), [driver], roots)
    registry.hold(record, Resource(kernel, Access.RO, ResourceKind.KERNEL), [driver], roots)
    assert os.getxattr(disk, XATTR) == label.process.encode()
    assert os.getxattr(kernel, XATTR) == b"_"
    registry.release(record)
    for path in (disk, kernel):
        with pytest.raises(OSError):
            os.getxattr(path, XATTR)


# ------------------------------------------------------- roots, walked by fd
def test_symlinked_parent_directory_is_refused(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    _file(real / "disk.img")
    (tmp_path / "via").symlink_to(real)  # even a link that stays inside the root
    open_object(real / "disk.img", roots=(tmp_path,)).close()
    with pytest.raises(RelabelRefused, match="is a symbolic link; svirt walks"):
        open_object(tmp_path / "via" / "disk.img", roots=(tmp_path,))


def test_root_that_is_a_symlink_is_refused(tmp_path: Path) -> None:
    real = tmp_path / "images"
    real.mkdir()
    _file(real / "disk.img")
    (tmp_path / "link").symlink_to(real)
    with pytest.raises(RelabelRefused, match="root .*/link is a symbolic link"):
        open_object(tmp_path / "link" / "disk.img", roots=(tmp_path / "link",))


def test_dotdot_out_of_a_root_is_outside_it(tmp_path: Path) -> None:
    root = tmp_path / "images"
    root.mkdir()
    _file(tmp_path / "secret.img")
    with pytest.raises(RelabelRefused, match="outside the image roots"):
        open_object(root / ".." / "secret.img", roots=(root,))


def test_openat2_beneath_refuses_dotdot_escape(tmp_path: Path) -> None:
    from svirt.security import files

    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    _file(root / "ok.img")
    _file(tmp_path / "secret.img")
    fd = files.open_root(root)
    try:
        with pytest.raises(OSError) as info:
            files.openat2(fd, "../secret.img", os.O_PATH, 0, files.WALK)
        assert info.value.errno == errno.EXDEV
        with pytest.raises(OSError) as info:  # even back in again: the walk left the root
            files.openat2(fd, "../images/ok.img", os.O_PATH, 0, files.WALK)
        assert info.value.errno == errno.EXDEV
        os.close(files.openat2(fd, "sub/../ok.img", os.O_PATH, 0, files.WALK))
    finally:
        os.close(fd)


def test_fifo_and_socket_are_refused(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo.img")
    with pytest.raises(RelabelRefused, match="not a regular file, directory or block device"):
        open_object(tmp_path / "fifo.img", roots=(tmp_path,))


def test_missing_openat2_is_a_clear_host_error(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from svirt.security import files

    _file(tmp_path / "disk.img")
    monkeypatch.setattr(files, "SYS_OPENAT2", 100_000)  # no such system call: ENOSYS
    with pytest.raises(HostError, match="no openat2 system call"):
        open_object(tmp_path / "disk.img", roots=(tmp_path,))


def test_open_object_defaults_to_the_host_image_roots(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    inside = _file(tmp_path / "ok.img")
    monkeypatch.setenv("SVIRT_CONFIG", str(tmp_path / "svirt.toml"))
    (tmp_path / "svirt.toml").write_text(f'image_roots = ["{tmp_path}"]\n')
    open_object(inside).close()
    (tmp_path / "svirt.toml").write_text('image_roots = ["/var/lib/svirt/images"]\n')
    with pytest.raises(RelabelRefused, match=r"outside the image roots \(/var/lib/svirt/images"):
        open_object(inside)


def test_console_log_fifo_is_refused_without_waiting_for_a_reader(tmp_path: Path) -> None:
    from svirt.security.files import open_log

    fifo = tmp_path / "console.log"
    os.mkfifo(fifo)
    def hung(*_: object) -> None:
        raise TimeoutError("opening the console log blocked on a FIFO")

    old = signal.signal(signal.SIGALRM, hung)
    signal.alarm(5)  # an open(O_WRONLY) of a FIFO would block here for ever
    try:
        with pytest.raises(RelabelRefused, match="console log .* is a FIFO"):
            open_log(fifo, Roots((), logs=(tmp_path,)))
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def test_console_log_is_created_0600_appended_and_pinned(tmp_path: Path) -> None:
    from svirt.security.files import open_log

    roots = Roots((), logs=(tmp_path,))
    log = tmp_path / "console.log"
    fd = open_log(log, roots)
    try:
        assert os.get_blocking(fd)  # O_NONBLOCK was only for the open
        os.write(fd, b"one\n")
    finally:
        os.close(fd)
    assert log.stat().st_mode & 0o777 == 0o600
    st = log.stat()
    assert roots.pins[log].startswith(f"{st.st_dev}-{st.st_ino}")  # + generation, birth
    fd = open_log(log, roots)
    os.write(fd, b"two\n")
    os.close(fd)
    assert log.read_bytes() == b"one\ntwo\n"


@pytest.mark.parametrize("make", ["symlink", "hardlink", "directory", "outside"])
def test_console_log_that_is_no_plain_file_under_a_root_is_refused(tmp_path: Path,
                                                                  make: str) -> None:
    from svirt.security.files import open_log

    logs = tmp_path / "logs"
    logs.mkdir()
    log = logs / "console.log"
    want = {"symlink": "is a symbolic link", "hardlink": "2 hard links",
            "directory": "is a directory", "outside": "outside the log and image roots"}[make]
    if make == "symlink":
        log.symlink_to(_file(tmp_path / "target"))
    elif make == "hardlink":
        os.link(_file(logs / "other"), log)
    elif make == "directory":
        log.mkdir()
    else:
        log = tmp_path / "console.log"
    with pytest.raises(RelabelRefused, match=want):
        open_log(log, Roots((), logs=(logs,)))
    if make == "symlink":
        assert (tmp_path / "target").read_bytes() == b"x"  # never written through the link


def test_log_replaced_between_open_and_labelling_is_refused(tmp_path: Path) -> None:
    from svirt.security.files import open_log

    roots = Roots((), logs=(tmp_path,))
    log = tmp_path / "console.log"
    writing = open_log(log, roots)  # held open by the sink while the guest runs
    registry = Registry(tmp_path / "run")
    record = registry.reserve(_spec("pin", _file(tmp_path / "vmlinuz")), [])
    try:
        log.unlink()
        log.write_text("another file\n")  # a new inode under the same name
        with pytest.raises(RelabelRefused, match="replaced since svirt opened it"):
            registry.hold(record, Resource(log, Access.RW, ResourceKind.CONSOLE_LOG), [], roots)
        os.close(open_log(log, roots))  # pinned again: now it is the file being written
        registry.hold(record, Resource(log, Access.RW, ResourceKind.CONSOLE_LOG), [], roots)
    finally:
        os.close(writing)
        registry.release(record)


# --------------------------------------------------------------- host config
def test_missing_host_config_means_defaults(tmp_path: Path) -> None:
    cfg = config.load(tmp_path / "absent.toml")
    assert cfg.image_roots == (Path("/var/lib/svirt/images"), Path("/var/cache/svirt"))
    assert cfg.log_roots == (Path("/var/log/svirt"),)
    assert cfg.block_device_roots == ()
    assert cfg.state_dir == Path("/var/lib/svirt")


def test_host_config_is_read_and_cached(tmp_path: Path) -> None:
    path = tmp_path / "svirt.toml"
    path.write_text('image_roots = ["/srv/images/"]\nblock_device_roots = ["/dev"]\n')
    cfg = config.load(path)
    assert cfg.image_roots == (Path("/srv/images"),)
    assert cfg.log_roots == (Path("/var/log/svirt"),)  # a key left out keeps its default
    assert cfg.block_device_roots == (Path("/dev"),)
    assert config.load(path) is cfg
    path.write_text('image_roots = ["/srv/other"]\n')  # changed: read again
    assert config.load(path).image_roots == (Path("/srv/other"),)


@pytest.mark.parametrize(("text", "key", "what"), [
    ('image_roots = "/srv"\n', "image_roots", "expected an array of paths"),
    ('log_roots = ["relative/dir"]\n', "log_roots", "expected an absolute path"),
    ('image_roots = [3]\n', "image_roots", "expected an absolute path"),
    ('image_roots = ["/etc/svirt"]\n', "image_roots", "never relabels"),
    ('log_roots = ["/"]\n', "log_roots", "never relabels"),
    ('state_dir = 5\n', "state_dir", "expected an absolute path"),
    ('image_root = ["/srv"]\n', "image_root", "unknown key"),
    ('image_roots = [\n', None, "not valid TOML"),
])
def test_bad_host_config_names_the_key(tmp_path: Path, text: str, key: str | None,
                                       what: str) -> None:
    path = tmp_path / "svirt.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=what) as info:
        config.load(path)
    assert info.value.key == key
    assert str(path) in info.value.message


def test_spec_roots_may_only_narrow_the_host_roots(tmp_path: Path) -> None:
    host = config.HostConfig(image_roots=(tmp_path / "images",), log_roots=(tmp_path / "logs",))
    narrowed = launch_roots((tmp_path / "images" / "web",), host)
    assert tuple(narrowed) == (tmp_path / "images" / "web",)
    assert narrowed.logs == (tmp_path / "logs",)
    assert tuple(launch_roots((), host)) == (tmp_path / "images",)
    for wider in (tmp_path, tmp_path / "elsewhere", tmp_path / "images" / ".." / "logs"):
        with pytest.raises(SecurityError, match="not inside a host image root"):
            launch_roots((wider,), host)


def test_restore_does_not_follow_a_parent_swapped_for_a_symlink(tmp_path: Path) -> None:
    from svirt.security.files import reopen

    images = tmp_path / "images"
    images.mkdir()
    obj = open_object(_file(images / "disk.img"), roots=(tmp_path,))
    obj.close()
    again = reopen(obj.path, obj.key)
    assert again is not None and again.key == obj.key
    again.close()
    images.rename(tmp_path / "moved")
    images.symlink_to(tmp_path / "moved")  # same inode, reached through a link
    assert reopen(obj.path, obj.key) is None
