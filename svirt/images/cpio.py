"""A cpio "newc" (070701) writer: the format the kernel unpacks an initramfs from.

Only what an initramfs needs: regular files, directories and symlinks, owned
by root, inodes numbered from 1, names and data padded to 4 bytes.
"""

from __future__ import annotations

import stat
from collections.abc import Iterable
from dataclasses import dataclass
from typing import BinaryIO

__all__ = ["CpioEntry", "write_cpio"]


@dataclass(frozen=True)
class CpioEntry:
    """One archive member.

    ``mode`` includes the file type bits (``S_IFREG``, ``S_IFDIR`` or
    ``S_IFLNK``); for a symlink ``data`` is the link target.
    """

    name: str
    mode: int
    data: bytes = b""
    mtime: int = 0


_CPIO_MAGIC = b"070701"
_CPIO_TRAILER = "TRAILER!!!"
_U32_MAX = 0xFFFFFFFF


def _pad4(length: int) -> bytes:
    return b"\0" * (-length % 4)


def _cpio_record(
    out: BinaryIO, name: bytes, *, ino: int, mode: int, nlink: int, mtime: int, data: bytes
) -> None:
    namesize = len(name) + 1
    fields = (ino, mode, 0, 0, nlink, mtime, len(data), 0, 0, 0, 0, namesize, 0)
    header = _CPIO_MAGIC + b"".join(b"%08X" % value for value in fields)
    out.write(header)
    out.write(name + b"\0")
    out.write(_pad4(len(header) + namesize))
    out.write(data)
    out.write(_pad4(len(data)))


def write_cpio(entries: Iterable[CpioEntry], out: BinaryIO) -> None:
    """Write ``entries`` as a cpio "newc" (070701) archive, ending with ``TRAILER!!!``.

    Owners are uid/gid 0, inodes are numbered from 1, names and data are
    padded to 4 bytes.  A leading ``/`` is stripped from names.  Parents must
    come before their children (the kernel does not create them).
    """
    ino = 0
    for entry in entries:
        name = entry.name.lstrip("/")
        if not name or "\0" in name or name == _CPIO_TRAILER:
            raise ValueError(f"invalid cpio member name {entry.name!r}")
        kind = stat.S_IFMT(entry.mode)
        if kind not in (stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK):
            raise ValueError(f"{name}: unsupported file type in mode {entry.mode:#o}")
        if entry.mode > _U32_MAX or entry.mode < 0:
            raise ValueError(f"{name}: invalid mode {entry.mode:#o}")
        if kind == stat.S_IFDIR and entry.data:
            raise ValueError(f"{name}: a directory cannot have data")
        if kind == stat.S_IFLNK and not entry.data:
            raise ValueError(f"{name}: a symlink needs a target")
        if len(entry.data) > _U32_MAX:
            raise ValueError(f"{name}: too large for a newc archive")
        if not 0 <= entry.mtime <= _U32_MAX:
            raise ValueError(f"{name}: mtime {entry.mtime} out of range")
        ino += 1
        _cpio_record(
            out,
            name.encode(),
            ino=ino,
            mode=entry.mode,
            nlink=2 if kind == stat.S_IFDIR else 1,
            mtime=entry.mtime,
            data=entry.data,
        )
    _cpio_record(out, _CPIO_TRAILER.encode(), ino=0, mode=0, nlink=1, mtime=0, data=b"")
