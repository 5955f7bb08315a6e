"""Attack: ``svirt image info`` on a disk a guest wrote.

A guest owns its writable disk, partition tables and qcow2 header
included; an admin then asks ``svirt image info`` what it is.  Every lie
below must end in one ``svirt: error:`` line (or a plain "does not boot"),
quickly, in bounded memory (the command runs under a 1 GiB address-space
limit) and with little read (counted in-process through ``os.pread``):
never a hang on a FIFO, never a read sized by the image, never a loop
followed.
"""

from __future__ import annotations

import os
import resource
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from svirt.errors import SvirtError
from svirt.images import imagefile
from svirt.images.info import inspect_image
from tests import diskcraft as dc

from .helpers import set_qcow2_backing

pytestmark = pytest.mark.skipif(dc.have_tools() is not None, reason=str(dc.have_tools()))
#: seconds one `svirt image info` may take on any of these (it reads a few KiB)
SECONDS = 10
#: bytes one inspection may read of a hostile image (the GPT array is 16 KiB)
READ_BOUND = 4 << 20


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))


def _cli(path: Path) -> subprocess.CompletedProcess[str]:
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "svirt", "image", "info", str(path)],
                          capture_output=True, text=True, timeout=SECONDS,
                          preexec_fn=_limit_memory)  # noqa: PLW1509 - a limit, no threads
    assert time.monotonic() - start < SECONDS
    return proc


def _refused(path: Path, words: str) -> None:
    proc = _cli(path)
    assert proc.returncode == 1, proc.stdout
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("svirt: error:"), proc.stderr
    assert words in lines[0]
    assert "Traceback" not in proc.stderr and "internal error" not in proc.stderr


def _read_counted(path: Path, monkeypatch: pytest.MonkeyPatch) -> int:
    total = [0]
    real = os.pread

    def counting(fd: int, size: int, offset: int) -> bytes:
        total[0] += size
        assert size <= READ_BOUND, f"one read of {size} bytes"
        return real(fd, size, offset)

    monkeypatch.setattr(os, "pread", counting)
    try:
        inspect_image(path)
    except SvirtError:
        pass
    monkeypatch.undo()
    return total[0]


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    return dc.make_disk(tmp_path / "guest.raw")


LIES: dict[str, tuple[Callable[[Path], None], str]] = {
    "gpt claims 2^32 entries": (lambda p: dc.set_entries(p, 0xFFFFFFFF), "entries"),
    "gpt entries of 256 MiB": (lambda p: dc.set_entries(p, 128, 1 << 28), "entry size"),
    "gpt partitions overlap": (lambda p: dc.rewrite_entry(p, 2, 2100, 70000), "overlap"),
    "gpt partition of 2^64 sectors": (lambda p: dc.rewrite_entry(p, 2, 34, 2**64 - 1),
                                      "outside"),
    "gpt entry array past the disk": (lambda p: _gpt_field(p, 72, 2**40), "outside the disk"),
    "gpt header size 4 GiB": (lambda p: _gpt_field(p, 12, 0xFFFFFFFF, "<I"), "header size"),
}


def _gpt_field(path: Path, offset: int, value: int, fmt: str = "<Q") -> None:
    header = dc.gpt_header(path)
    struct.pack_into(fmt, header, offset, value)
    dc.put_gpt_header(path, header)


@pytest.mark.parametrize("lie", sorted(LIES))
def test_partition_table_lies(disk: Path, lie: str, monkeypatch: pytest.MonkeyPatch) -> None:
    make, words = LIES[lie]
    make(disk)
    _refused(disk, words)
    assert _read_counted(disk, monkeypatch) < READ_BOUND


@pytest.mark.parametrize("links", [[10, 10], [10, 5], [10, 20, 10], [10, 5000000]])
def test_extended_partition_loops(tmp_path: Path, links: list[int],
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    disk = dc.mbr_disk(tmp_path / "mbr.raw", links)
    _refused(disk, "chain loops or leaves it")
    assert _read_counted(disk, monkeypatch) < READ_BOUND


def test_fat_directory_loop(disk: Path) -> None:
    """The ESP's FAT says the root directory's cluster chain loops (FAT32)
    or the EFI directory's cluster is its own successor: the walk stops."""
    info = inspect_image(disk)
    assert info.uefi
    esp = 2048 * 512 + (1 << 20)
    boot = dc.read_at(disk, esp, 512)
    reserved, nfats = struct.unpack_from("<H", boot, 14)[0], boot[16]
    fatsz = struct.unpack_from("<H", boot, 22)[0]
    fat = esp + reserved * 512
    # every FAT16 entry points at cluster 3, which points at itself
    for copy in range(nfats):
        dc.write_at(disk, fat + copy * fatsz * 512 + 4, struct.pack("<HH", 3, 3) * 64)
    start = time.monotonic()
    info = inspect_image(disk)
    assert time.monotonic() - start < SECONDS
    dc.write_at(disk, esp + 11, b"\x00\x00")  # sector size 0
    info = inspect_image(disk)
    assert not info.uefi and "FAT sector size" in info.uefi_detail


def _qcow2(disk: Path, tmp_path: Path, name: str = "g.qcow2") -> Path:
    return dc.to_qcow2(disk, tmp_path / name)


QCOW2_LIES: dict[str, tuple[dict[str, int], str]] = {
    "virtual size 2^63": ({"virtual_size": 1 << 63}, "virtual size"),
    "virtual size past its L1 table": ({"virtual_size": 1 << 50}, "L1 table"),
    "L1 table of 2^31 entries": ({"l1_size": 1 << 31}, "L1 table"),
    "L1 table past the file": ({"l1_offset": 1 << 45}, "outside the file"),
    "cluster size 2^31": ({"cluster_bits": 31}, "cluster size"),
    "external data file": ({"incompatible": 4}, "incompatible features"),
}


@pytest.mark.parametrize("lie", sorted(QCOW2_LIES))
def test_qcow2_header_lies(disk: Path, tmp_path: Path, lie: str,
                           monkeypatch: pytest.MonkeyPatch) -> None:
    image = _qcow2(disk, tmp_path)
    fields, words = QCOW2_LIES[lie]
    dc.set_qcow2_fields(image, **fields)
    _refused(image, words)
    assert _read_counted(image, monkeypatch) < READ_BOUND


def test_l2_entries_past_the_file(disk: Path, tmp_path: Path) -> None:
    image = _qcow2(disk, tmp_path)
    l1 = struct.unpack(">Q", dc.read_at(image, 40, 8))[0]
    l2 = struct.unpack(">Q", dc.read_at(image, l1, 8))[0] & 0x00FFFFFFFFFFFE00
    dc.write_at(image, l2, struct.pack(">Q", 1 << 50))  # cluster 0 far past the end
    _refused(image, "past the end of the file")
    dc.write_at(image, l2, struct.pack(">Q", (1 << 62) | (1 << 40)))  # compressed, garbage
    proc = _cli(image)
    assert proc.returncode in (0, 1) and len(proc.stderr.splitlines()) <= 1


def test_backing_chain_loops(disk: Path, tmp_path: Path) -> None:
    a = _qcow2(disk, tmp_path, "a.qcow2")
    b = dc.overlay(a, tmp_path / "b.qcow2")  # before the loop: qemu-img would hang on it
    set_qcow2_backing(a, b"a.qcow2", "qcow2")
    _refused(a, "loops")
    set_qcow2_backing(a, b"b.qcow2", "qcow2")  # a -> b -> a
    _refused(b, "loops")
    link = tmp_path / "alias.qcow2"
    link.symlink_to(b)
    set_qcow2_backing(a, str(link).encode(), "qcow2")  # the same inode by another name
    _refused(b, "loops")


def test_backing_chain_too_deep(disk: Path, tmp_path: Path) -> None:
    lower = _qcow2(disk, tmp_path, "l0.qcow2")
    for i in range(1, imagefile.MAX_CHAIN + 2):
        lower = dc.overlay(lower, tmp_path / f"l{i}.qcow2")
    _refused(lower, "deeper than")


@pytest.mark.parametrize("target", ["fifo", "/dev/zero", "json:{}", "nbd://host/x",
                                    "/nonexistent"])
def test_backing_that_is_no_file(disk: Path, tmp_path: Path, target: str) -> None:
    image = _qcow2(disk, tmp_path)
    if target == "fifo":
        os.mkfifo(tmp_path / "fifo")  # opening it for reading would block
    set_qcow2_backing(image, target.encode(), "raw")
    words = {"fifo": "not a regular file", "/dev/zero": "not a regular file",
             "/nonexistent": "cannot open"}.get(target, "not a file name")
    _refused(image, words)


def test_a_fifo_named_on_the_command_line(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "img")
    _refused(tmp_path / "img", "not a regular file")
