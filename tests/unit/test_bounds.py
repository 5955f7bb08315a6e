"""CappedLog (svirt/launcher/bounds.py): the cap, failures that drop and count,
a closed log that forgets its fd; and the disk bound read from a file."""

from __future__ import annotations

import os
import re
import struct
from pathlib import Path

from svirt import config
from svirt.launcher.bounds import MEMORY_FILE_SLACK, CappedLog, disk_bound
from svirt.launcher.storage import layer_bound
from svirt.spec import DiskFormat

MIB = 1 << 20


def _log(path: Path) -> int:
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)


def test_a_flood_never_takes_the_log_past_its_cap(tmp_path: Path) -> None:
    path = tmp_path / "c.log"
    log = CappedLog(_log(path), 64 * 1024)
    for i in range(2000):
        log.write(b"%d " % i + b"x" * 500 + b"\n")
        assert path.stat().st_size <= 64 * 1024
    log.write(b"y" * 10 * MIB)  # one write far larger than the cap
    assert path.stat().st_size <= 64 * 1024
    data = path.read_bytes()
    assert data.endswith(b"y" * 1000)
    m = re.search(rb"cap of 65536 bytes: (\d+) earlier bytes dropped", data)
    assert m and int(m.group(1)) == log.truncated > 1_000_000
    log.close()


def test_a_failed_write_drops_counts_and_says_so_once_room_returns(tmp_path: Path) -> None:
    full = os.open("/dev/full", os.O_WRONLY | os.O_CLOEXEC)  # every write: ENOSPC
    log = CappedLog(full, MIB)
    log.write(b"a" * 1000)
    log.write(b"b" * 500)
    assert log.lost == 1500
    path = tmp_path / "back.log"
    good = _log(path)
    os.dup2(good, full)  # the same fd number, now on a file with room
    os.close(good)
    log.write(b"after\n")
    log.write(b"more\n")
    data = path.read_bytes()
    assert data.count(b"lost") == 1
    assert b"1500 bytes of console output lost: ENOSPC" in data
    assert data.endswith(b"after\nmore\n")
    assert log.lost == 0
    log.close()


def test_close_forgets_the_fd_number(tmp_path: Path) -> None:
    log = CappedLog(_log(tmp_path / "x.log"), MIB)
    log.close()
    other = os.open(tmp_path / "other", os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        log.write(b"never here")  # the old number may be this file's now
        log.close()  # and a second close must not close it
        os.fstat(other)
        assert (tmp_path / "other").read_bytes() == b""
    finally:
        os.close(other)


def _path_fd(path: Path) -> int:
    return os.open(path, os.O_PATH | os.O_CLOEXEC)


def test_disk_bound_raw_is_its_size_qcow2_its_virtual_size_and_allowance(
        tmp_path: Path) -> None:
    raw = tmp_path / "d.img"
    raw.write_bytes(b"\0" * 12345)
    q = tmp_path / "d.qcow2"
    q.write_bytes(b"QFI\xfb" + b"\0" * 20 + struct.pack(">Q", 10 * MIB) + b"\0" * 100)
    for path, fmt, want in ((raw, DiskFormat.RAW, 12345),
                            (q, DiskFormat.QCOW2, layer_bound(10 * MIB))):
        fd = _path_fd(path)
        try:
            assert disk_bound(fd, fmt) == want
        finally:
            os.close(fd)
    fd = _path_fd(Path("/dev/null"))  # a device: RLIMIT_FSIZE does not apply
    try:
        assert disk_bound(fd, DiskFormat.RAW) == 0
    finally:
        os.close(fd)
    assert MEMORY_FILE_SLACK == 64 * MIB


def test_console_log_max_mib_is_a_host_config_key() -> None:
    assert config.HostConfig().console_log_max_mib == 64
    assert config.parse({"console_log_max_mib": 2}).console_log_max_mib == 2
