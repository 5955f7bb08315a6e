"""write_cpio produces "newc" archives that GNU cpio reads back."""

from __future__ import annotations

import io
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from svirt.images.build import CpioEntry, write_cpio

pytestmark = pytest.mark.skipif(shutil.which("cpio") is None, reason="needs GNU cpio")

HEADER_LEN = 110


def archive(entries: list[CpioEntry]) -> bytes:
    buf = io.BytesIO()
    write_cpio(entries, buf)
    return buf.getvalue()


def cpio_list(data: bytes) -> list[str]:
    out = subprocess.run(
        ["cpio", "-t", "--quiet"], input=data, capture_output=True, check=True
    ).stdout
    return out.decode().splitlines()


def cpio_extract(data: bytes, dest: Path) -> None:
    dest.mkdir()
    subprocess.run(
        ["cpio", "-i", "-d", "-m", "--quiet", "--no-absolute-filenames"],
        input=data,
        cwd=dest,
        capture_output=True,
        check=True,
    )


def parse_newc(data: bytes) -> list[tuple[str, dict[str, int], bytes]]:
    """A strict reader: checks magic and 4-byte alignment of every part."""
    names = (
        "ino mode uid gid nlink mtime filesize devmajor devminor rdevmajor rdevminor namesize check"
    ).split()
    members = []
    pos = 0
    while True:
        assert pos % 4 == 0
        assert data[pos : pos + 6] == b"070701"
        fields = {
            name: int(data[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i, name in enumerate(names)
        }
        name_start = pos + HEADER_LEN
        name_end = name_start + fields["namesize"]
        name = data[name_start : name_end - 1].decode()
        assert data[name_end - 1] == 0
        data_start = name_end + (-name_end % 4)
        assert data[name_end:data_start] == bytes(data_start - name_end)
        body = data[data_start : data_start + fields["filesize"]]
        pos = data_start + fields["filesize"]
        pad = -pos % 4
        assert data[pos : pos + pad] == bytes(pad)
        pos += pad
        members.append((name, fields, body))
        if name == "TRAILER!!!":
            assert pos == len(data)
            return members


def test_files_directory_and_symlink_round_trip(tmp_path: Path) -> None:
    entries = [
        CpioEntry("bin", stat.S_IFDIR | 0o755),
        CpioEntry("bin/tool", stat.S_IFREG | 0o755, b"#!/bin/sh\necho hi\n", mtime=1_700_000_000),
        CpioEntry("etc", stat.S_IFDIR | 0o750),
        CpioEntry("etc/config", stat.S_IFREG | 0o640, b"key=value\n"),
        CpioEntry("etc/empty", stat.S_IFREG | 0o600),
        CpioEntry("etc/link", stat.S_IFLNK | 0o777, b"../bin/tool"),
        CpioEntry("blob", stat.S_IFREG | 0o644, bytes(range(256)) * 17),
    ]
    data = archive(entries)

    assert cpio_list(data) == [e.name for e in entries]

    dest = tmp_path / "out"
    cpio_extract(data, dest)
    for e in entries:
        path = dest / e.name
        st = os.lstat(path)
        assert stat.S_IFMT(st.st_mode) == stat.S_IFMT(e.mode), e.name
        if stat.S_ISLNK(e.mode):
            assert os.readlink(path) == e.data.decode()
            continue
        assert stat.S_IMODE(st.st_mode) == stat.S_IMODE(e.mode), e.name
        if stat.S_ISREG(e.mode):
            assert path.read_bytes() == e.data
    assert os.stat(dest / "bin/tool").st_mtime == 1_700_000_000
    assert (dest / "etc/link").read_bytes() == b"#!/bin/sh\necho hi\n"


def test_header_fields() -> None:
    entries = [
        CpioEntry("d", stat.S_IFDIR | 0o755),
        CpioEntry("d/f", stat.S_IFREG | 0o644, b"abc", mtime=42),
        CpioEntry("/abs", stat.S_IFREG | 0o600, b"x"),
    ]
    members = parse_newc(archive(entries))
    assert [m[0] for m in members] == ["d", "d/f", "abs", "TRAILER!!!"]
    inos = [m[1]["ino"] for m in members[:-1]]
    assert len(set(inos)) == len(inos) and all(inos)
    for _, fields, _ in members:
        assert fields["uid"] == 0 and fields["gid"] == 0 and fields["check"] == 0
    assert members[0][1]["nlink"] == 2
    assert members[1][1]["nlink"] == 1
    assert members[1][1]["mtime"] == 42
    assert members[1][2] == b"abc"
    assert members[1][1]["mode"] == stat.S_IFREG | 0o644
    trailer = members[-1][1]
    assert trailer["mode"] == 0 and trailer["filesize"] == 0 and trailer["nlink"] == 1


def test_empty_archive(tmp_path: Path) -> None:
    data = archive([])
    assert len(data) % 4 == 0
    assert [m[0] for m in parse_newc(data)] == ["TRAILER!!!"]
    assert cpio_list(data) == []
    dest = tmp_path / "out"
    cpio_extract(data, dest)
    assert list(dest.iterdir()) == []


@pytest.mark.parametrize("name_len", range(1, 9))
def test_padding_of_every_length(tmp_path: Path, name_len: int) -> None:
    # Names of 1..8 characters give every (header + name + NUL) mod 4, data
    # of 0..7 bytes every data length mod 4; the symlink target too.
    entries = [CpioEntry("d" * name_len, stat.S_IFDIR | 0o755)]
    for size in range(8):
        entries.append(
            CpioEntry(
                f"{'d' * name_len}/{chr(ord('a') + size) * name_len}",
                stat.S_IFREG | 0o644,
                bytes([65 + size]) * size,
            )
        )
    entries.append(CpioEntry(f"{'d' * name_len}/l", stat.S_IFLNK | 0o777, b"t" * name_len))
    data = archive(entries)
    assert len(data) % 4 == 0

    members = parse_newc(data)
    assert [m[0] for m in members[:-1]] == [e.name for e in entries]
    assert [m[2] for m in members[:-1]] == [e.data for e in entries]
    assert cpio_list(data) == [e.name for e in entries]

    dest = tmp_path / "out"
    cpio_extract(data, dest)
    for e in entries[1:-1]:
        assert (dest / e.name).read_bytes() == e.data
    assert os.readlink(dest / entries[-1].name) == "t" * name_len


@pytest.mark.parametrize(
    "entry",
    [
        CpioEntry("", stat.S_IFREG | 0o644),
        CpioEntry("a\0b", stat.S_IFREG | 0o644),
        CpioEntry("TRAILER!!!", stat.S_IFREG | 0o644),
        CpioEntry("dev/null", stat.S_IFCHR | 0o666),
        CpioEntry("d", stat.S_IFDIR | 0o755, b"data"),
        CpioEntry("l", stat.S_IFLNK | 0o777),
        CpioEntry("f", stat.S_IFREG | 0o644, mtime=-1),
    ],
)
def test_rejects_bad_entries(entry: CpioEntry) -> None:
    with pytest.raises(ValueError):
        archive([entry])
