"""review-c: restore identity on a file system that keeps no birth time.

d5285e4 dropped the inode generation from object keys (the file's owner may
set it with ``FS_IOC_SETVERSION``) and kept the birth time as what tells a
recreated file from the held one.  ext4 with 128-byte inodes (``mkfs.ext4
-I 128``: old or small file systems, ext3 mounted as ext4), XFS v4 and NFS
keep no birth time, so there the key fell back to ``DEV-INO`` alone: the
issue's item 13 ("a reused inode gets the old owner") was back.  A file
created under the freed inode number of a held disk got the disk's
original owner and mode at release.

Fixed: where there is no birth time the key carries the generation again
(``DEV-INO-gGEN``); a guest that changes its file's generation no longer
escapes restore, because the release's second net (an inode at the held
path that still carries the guest's uid) makes the record restore-failed.

Real parts: a loop-mounted ext4 with 128-byte inodes, a real registry and
DAC driver writing real owners and modes.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from svirt.errors import StateError
from svirt.launcher.record import Record
from svirt.launcher.registry import Registry
from svirt.resources import Access, Resource, ResourceKind
from svirt.security.dac import DacDriver
from svirt.security.inodes import birth_time, object_key, same_object
from svirt.spec import GuestSpec
from svirt.testing import write_host_config

OTHER = 1_999_322
FS_IOC_SETVERSION = 0x40087602  # _IOW('v', 2, long)


@pytest.fixture
def small_inode_root(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A 16 MiB ext4 with 128-byte inodes (no birth time) and no metadata_csum
    (an older file system: its owner may set an inode generation), the image root."""
    for tool in ("mkfs.ext4", "mount", "umount"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    base = Path(tempfile.mkdtemp(prefix="svirt-rc-ino-", dir="/var/tmp"))
    base.chmod(0o755)
    image, mnt = base / "fs.img", base / "mnt"
    mnt.mkdir()
    with open(image, "wb") as f:
        f.truncate(16 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-I", "128", "-O", "^metadata_csum", "-N", "64",
                    str(image)],
                   check=True, capture_output=True)
    mounted = subprocess.run(["mount", "-o", "loop", str(image), str(mnt)],
                             capture_output=True, text=True, check=False)
    if mounted.returncode != 0:
        shutil.rmtree(base, ignore_errors=True)
        pytest.skip(f"cannot loop-mount an ext4 image here: {mounted.stderr.strip()}")
    try:
        mnt.chmod(0o755)
        conf = base / "svirt.toml"
        write_host_config(conf, image_roots=(mnt,), log_roots=(mnt,))
        monkeypatch.setenv("SVIRT_CONFIG", str(conf))
        probe = mnt / ".probe"
        probe.write_bytes(b"")
        fd = os.open(probe, os.O_RDONLY)
        try:
            if birth_time(fd) is not None:
                pytest.skip("this ext4 keeps a birth time even with 128-byte inodes")
        finally:
            os.close(fd)
            probe.unlink()
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False, capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


def _reserve(tmp_path: Path, root: Path, name: str
             ) -> tuple[Registry, list[DacDriver], Record, int]:
    kernel = root / "vmlinuz"
    kernel.write_bytes(b"k")
    registry = Registry(tmp_path / "run", tmp_path / "state")
    drivers = [DacDriver()]
    record = registry.reserve(GuestSpec(name=name, kernel=kernel, uuid=uuid.uuid4()), drivers)
    uid = int(record.labels["dac"].process.split(":")[0])
    return registry, drivers, record, uid


def test_a_recreated_file_under_a_reused_inode_keeps_its_owner_without_birth_time(
        small_inode_root: Path, tmp_path: Path) -> None:
    """The held disk is deleted while its guest runs and another user's file
    (0640) takes its inode number and name; release must leave that file
    alone, not give it the disk's original root:0644."""
    disk = small_inode_root / "disk.img"
    disk.write_bytes(b"\0" * 4096)
    disk.chmod(0o644)
    registry, drivers, record, uid = _reserve(tmp_path, small_inode_root, "reused")
    registry.hold(record, Resource(disk, Access.RW, ResourceKind.DISK), drivers,
                  (small_inode_root,))
    assert disk.stat().st_uid == uid
    ino = disk.stat().st_ino
    disk.unlink()
    fd = os.open(disk, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
    try:
        os.write(fd, b"another user's data\n")
        os.fchown(fd, OTHER, OTHER)
        os.fchmod(fd, 0o640)
    finally:
        os.close(fd)
    if disk.stat().st_ino != ino:
        pytest.skip("ext4 did not hand out the inode number again")
    try:
        registry.release(record)
    except StateError:
        pass  # restore-failed is an acceptable verdict; a chown is not
    after = disk.stat()
    for left in registry.records():
        try:
            registry.release(left)
        except StateError:
            pass
    assert (after.st_uid, after.st_gid, after.st_mode & 0o7777) == (OTHER, OTHER, 0o640), (
        "the new file was given the held disk's original owner and mode")


def test_keys_tell_a_recreated_file_apart_without_birth_time(small_inode_root: Path) -> None:
    """Unit form of the above: same dev and inode number, another file."""
    path = small_inode_root / "obj"
    path.write_bytes(b"x")
    fd = os.open(path, os.O_RDONLY)
    st = os.fstat(fd)
    key = object_key(st, fd)
    os.close(fd)
    path.unlink()
    path.write_bytes(b"y")
    fd = os.open(path, os.O_RDONLY)
    try:
        st2 = os.fstat(fd)
        if st2.st_ino != st.st_ino:
            pytest.skip("ext4 did not hand out the inode number again")
        assert not same_object(key, st2, fd), key
    finally:
        os.close(fd)


def test_a_guest_that_sets_its_disks_generation_does_not_escape_restore(
        small_inode_root: Path, tmp_path: Path) -> None:
    """The guest owns its disk while it runs and sets the inode generation
    (FS_IOC_SETVERSION, owner only): release either restores the disk or
    keeps the record restore-failed; never 'gone or replaced, left alone'
    with the guest still owning it."""
    disk = small_inode_root / "gen.img"
    disk.write_bytes(b"\0" * 4096)
    disk.chmod(0o644)
    registry, drivers, record, uid = _reserve(tmp_path, small_inode_root, "gen")
    registry.hold(record, Resource(disk, Access.RW, ResourceKind.DISK), drivers,
                  (small_inode_root,))
    pid = os.fork()
    if pid == 0:  # the guest: its uid, its own file
        code = 1
        try:
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
            gfd = os.open(disk, os.O_RDONLY)
            try:
                fcntl.ioctl(gfd, FS_IOC_SETVERSION, (424242).to_bytes(8, "little"))
                code = 0
            except OSError as err:
                code = 100 + (err.errno or 0) % 100
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code == 100 + errno.ENOTTY:  # ext4 with metadata_csum refuses it to everyone
        for table in (tmp_path / "state" / "objects").glob("*.json"):
            table.unlink()
        os.chown(disk, 0, 0)
        for left in registry.records():
            registry.release(left)
        pytest.skip("this ext4 (metadata_csum) refuses FS_IOC_SETVERSION")
    assert code == 0, f"the owner could not set its generation ({code})"
    failed = False
    try:
        registry.release(record)
    except StateError as err:
        failed = "owned by the guest's uid" in err.message
    try:
        st = disk.stat()
        assert failed or (st.st_uid, st.st_mode & 0o7777) == (0, 0o644), (
            "the guest kept its disk after release")
    finally:
        os.chown(disk, 0, 0)
        for table in (tmp_path / "state" / "objects").glob("*.json"):
            table.unlink()
        for left in registry.records():
            registry.release(left)
