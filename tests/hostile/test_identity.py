"""Restore names an object by more than its inode number.

A guest's disk is deleted while the guest holds it (after a crash, or by
whoever owns the directory) and a new file is created under the same name;
ext4 hands the freed inode number to the next file created, so the new file
has the old ``dev-ino``.  Restore identified objects by ``dev-ino`` only and
gave the new file the old one's original owner, mode and labels: here the
object key carries the inode's birth time (``statx``; not the generation,
which the file's owner may set), and the new file keeps its own.

Real parts: a loop-mounted ext4 image as the image root (inode numbers are
reused there; tmpfs never reuses one), a real registry, the real DAC and
SELinux drivers writing real owners, modes and ``security.selinux`` xattrs
(not enforced on this kernel, only stored).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from svirt.errors import StateError
from svirt.images.build import DEFAULT_CACHE, TinyGuest
from svirt.launcher.registry import Registry
from svirt.resources import Access, Resource, ResourceKind
from svirt.security.dac import DacDriver
from svirt.security.files import open_object
from svirt.security.inodes import object_key
from svirt.security.selinux import SELinuxDriver
from svirt.spec import GuestSpec
from svirt.testing import TEST_IMAGE_ROOTS, write_host_config

from ..integration.helpers import pids_of_uid, wait_for, write_spec

ROOT = Path(__file__).resolve().parents[2]

#: another user, the one whose new file must keep its owner
OTHER = 1_999_321
TRIES = 200


@pytest.fixture
def ext4_root(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A 16 MiB ext4 image mounted on a fresh directory, made the only image
    root of a host config for this test."""
    for tool in ("mkfs.ext4", "mount", "umount"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    base = Path(tempfile.mkdtemp(prefix="svirt-ino-", dir="/var/tmp"))
    base.chmod(0o755)
    image, mnt = base / "fs.img", base / "mnt"
    mnt.mkdir()
    with open(image, "wb") as f:
        f.truncate(16 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-N", "64", str(image)], check=True,
                   capture_output=True)
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
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False, capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


def _recreate_with_inode(path: Path, ino: int) -> bool:
    """Create files next to ``path`` until one gets inode ``ino``, and give
    it ``path``'s name (owned by OTHER, 0640).  False if it never came."""
    spares = []
    try:
        for i in range(TRIES):
            candidate = path.with_name(f".new{i}")
            fd = os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
            try:
                os.write(fd, b"another user's data\n")
                os.fchown(fd, OTHER, OTHER)
                got = os.fstat(fd).st_ino
            finally:
                os.close(fd)
            if got == ino:
                os.rename(candidate, path)
                return True
            spares.append(candidate)
        return False
    finally:
        for spare in spares:
            spare.unlink(missing_ok=True)


def _drivers() -> list[object]:
    selinux = SELinuxDriver(
        launcher_context="system_u:system_r:unconfined_t:s0-s0:c0.c1023",
        domain_context="system_u:system_r:svirt_t:s0",
        image_context="system_u:object_r:svirt_image_t:s0",
        content_context="system_u:object_r:virt_content_t:s0", enforcing=False)
    return [selinux, DacDriver()]


def test_a_recreated_file_with_the_old_inode_number_keeps_its_owner(
        ext4_root: Path, tmp_path: Path) -> None:
    disk = ext4_root / "disk.img"
    disk.write_bytes(b"\0" * 4096)
    disk.chmod(0o644)
    os.setxattr(disk, "security.selinux", b"system_u:object_r:virt_image_t:s0\0")
    kernel = ext4_root / "vmlinuz"
    kernel.write_bytes(b"k")
    registry = Registry(tmp_path / "run", tmp_path / "state")
    drivers = _drivers()
    record = registry.reserve(GuestSpec(name="reused", kernel=kernel, uuid=uuid.uuid4()),
                              drivers)  # type: ignore[arg-type]
    try:
        registry.hold(record, Resource(disk, Access.RW, ResourceKind.DISK),
                      drivers, (ext4_root,))  # type: ignore[arg-type]
        guest_uid = int(record.labels["dac"].process.split(":")[0])
        st = disk.stat()
        assert st.st_uid == guest_uid  # labelled for the guest
        held = os.getxattr(disk, "security.selinux")
        old_ino = st.st_ino
        obj = open_object(disk, roots=(ext4_root,))
        try:
            key = obj.key
            assert key.startswith(f"{st.st_dev}-{st.st_ino}-b"), key  # ext4: a birth time
        finally:
            obj.close()
        # the object goes; another user's file takes its inode number
        disk.unlink()
        if not _recreate_with_inode(disk, old_ino):
            pytest.skip(f"ext4 did not hand out inode {old_ino} again in {TRIES} files")
        new = disk.stat()
        assert new.st_ino == old_ino and new.st_dev == st.st_dev
        fd = os.open(disk, os.O_RDONLY)
        try:
            assert object_key(os.fstat(fd), fd) != key  # the birth time tells them apart
        finally:
            os.close(fd)
        before = (new.st_uid, new.st_gid, new.st_mode, disk.read_bytes(),
                  _xattr(disk, "security.selinux"))
        print(f"inode {old_ino} reused; key was {key}")
        report = registry.release(record)
        after = disk.stat()
        assert (after.st_uid, after.st_gid, after.st_mode, disk.read_bytes(),
                _xattr(disk, "security.selinux")) == before, report
        assert after.st_uid == OTHER and held != _xattr(disk, "security.selinux")
        assert any("gone or replaced" in line for line in report), report
        record = None  # type: ignore[assignment]
    finally:
        if record is not None:
            registry.release(record)


def _xattr(path: Path, name: str) -> bytes | None:
    try:
        return os.getxattr(path, name)
    except OSError:
        return None


def test_gc_after_a_crash_leaves_a_recreated_disk_alone(
        ext4_root: Path, tiny_uml: TinyGuest, tmp_path: Path) -> None:
    """The real path: a UML guest boots with its disk on the ext4 root, its
    launcher is SIGKILLed (the guest dies with it), the disk is deleted and
    another user's file takes its inode number, then `svirt gc` releases the
    record: the new file keeps its owner and mode."""
    disk = ext4_root / "crash.img"
    with open(disk, "wb") as f:
        f.truncate(1 << 20)
    disk.chmod(0o644)
    run_root = Path(tempfile.mkdtemp(prefix="svirt-ino-run-", dir="/run"))
    run_root.chmod(0o755)
    state = Path(tempfile.mkdtemp(prefix="svirt-ino-state-", dir="/var/tmp"))
    conf = Path(os.environ["SVIRT_CONFIG"])
    cache = os.environ.get("SVIRT_CACHE") or str(DEFAULT_CACHE)
    write_host_config(conf, image_roots=(ext4_root, *TEST_IMAGE_ROOTS, cache),
                      log_roots=(ext4_root,))
    env = {**os.environ, "SVIRT_RUN_DIR": str(run_root), "SVIRT_STATE_DIR": str(state)}
    spec = write_spec(tmp_path / "crash.toml", "crash", "uml", tiny_uml,
                      extra=f'[[disk]]\npath = "{disk}"\n')
    launcher = subprocess.Popen([sys.executable, "-m", "tests.integration.launcher_proc",
                                 str(spec)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                text=True)
    try:
        assert launcher.stdout is not None
        line = launcher.stdout.readline()
        assert line, "the launcher died before its guest booted"
        uid = int(json.loads(line)["labels"]["dac"].split(":")[0])
        assert disk.stat().st_uid == uid
        old = disk.stat()
        launcher.send_signal(signal.SIGKILL)
        launcher.wait(10)
        assert wait_for(lambda: pids_of_uid(uid) == [], 20), "the guest outlived its launcher"
        disk.unlink()
        reused = False
        for _ in range(50):  # the last reference goes with the jail's mounts
            if _recreate_with_inode(disk, old.st_ino):
                reused = True
                break
            time.sleep(0.2)
        if not reused:
            pytest.skip(f"ext4 did not hand out inode {old.st_ino} again")
        before = disk.stat()
        gc = subprocess.run([sys.executable, "-m", "svirt", "gc"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120, check=False)
        print(gc.stdout + gc.stderr)
        after = disk.stat()
        assert (after.st_uid, after.st_gid, after.st_mode) == (
            before.st_uid, before.st_gid, before.st_mode) == (OTHER, OTHER, before.st_mode)
        assert "gone or replaced" in gc.stdout + gc.stderr
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
        subprocess.run([sys.executable, "-m", "svirt", "gc"], cwd=ROOT, env=env,
                       capture_output=True, timeout=120, check=False)
        shutil.rmtree(run_root, ignore_errors=True)
        shutil.rmtree(state, ignore_errors=True)


def test_an_object_that_is_not_the_held_one_but_carries_the_guests_uid_is_restore_failed(
        ext4_root: Path, tmp_path: Path) -> None:
    """The second net under the key: whatever the guest changes of what
    identifies its file (the generation was the owner's to set), a file at
    the held path that still carries the guest's uid is not "replaced, left
    alone": release keeps the record (restore-failed) and the object table,
    and the uid is not handed out again.  Played by root: the disk is
    recreated with a new inode (a new birth time) owned by the guest's uid."""
    disk = ext4_root / "kept.img"
    disk.write_bytes(b"\0" * 4096)
    disk.chmod(0o644)
    kernel = ext4_root / "vmlinuz"
    kernel.write_bytes(b"k")
    registry = Registry(tmp_path / "run", tmp_path / "state")
    drivers = [DacDriver()]
    record = registry.reserve(GuestSpec(name="kept", kernel=kernel, uuid=uuid.uuid4()),
                              drivers)
    guest_uid = int(record.labels["dac"].process.split(":")[0])
    registry.hold(record, Resource(disk, Access.RW, ResourceKind.DISK), drivers, (ext4_root,))
    tables = list((tmp_path / "state" / "objects").glob("*.json"))
    assert len(tables) == 1
    disk.unlink()
    disk.write_bytes(b"the guest's\n")
    os.chown(disk, guest_uid, guest_uid)
    try:
        with pytest.raises(StateError, match="owned by the guest's uid"):
            registry.release(record)
        (kept,) = registry.records()
        assert kept.restore_failed, kept.status
        assert tables[0].exists()
    finally:
        os.chown(disk, 0, 0)
        for table in tables:
            table.unlink(missing_ok=True)
        for left in registry.records():
            registry.release(left)
    assert not registry.records()


def test_keys_of_older_svirt_are_read_without_their_generation(tmp_path: Path) -> None:
    """A key written before the generation was dropped (``DEV-INO-gGEN-bBIRTH``)
    still names its object whatever the generation now is (the owner may
    have changed it), and still not another inode or another birth time."""
    from svirt.security.inodes import birth_time, same_object

    path = tmp_path / "obj"
    path.write_bytes(b"x")
    fd = os.open(path, os.O_RDONLY)
    try:
        st = os.fstat(fd)
        key = object_key(st, fd)
        born = birth_time(fd)
        if born is None:
            pytest.skip("this file system keeps no birth time")
        assert "-g" not in key and key.endswith(f"-b{born[0]}.{born[1]:09d}"), key
        dev_ino = f"{st.st_dev}-{st.st_ino}"
        stamp = f"{born[0]}.{born[1]:09d}"
        assert same_object(f"{dev_ino}-g12345-b{stamp}", st, fd)
        assert same_object(f"{dev_ino}-g7", st, fd)
        assert same_object(dev_ino, st, fd)
        assert not same_object(f"{dev_ino}-g12345-b{born[0] + 1}.{born[1]:09d}", st, fd)
        assert not same_object(f"{st.st_dev}-{st.st_ino + 1}-b{stamp}", st, fd)
    finally:
        os.close(fd)
