"""A disk image read as the guest sees it: raw or qcow2 (its backing chain
followed), every byte of it treated as guest-written data.

``svirt image info`` reads what a guest may have written (its own disk,
qcow2 header included), so:

- a file is first reached ``O_PATH`` (which opens nothing) and must be a
  regular file there (the image named on the command line may also be a
  block device); only then is that inode opened for reading, through
  ``/proc/self/fd``, ``O_NONBLOCK | O_NOCTTY``: a FIFO that would hang the
  reader, or a device whose mere opening acts (a watchdog, a tape), is
  refused unopened;
- the qcow2 header is checked field by field (cluster size 512 B - 2 MiB,
  an L1 table that covers the virtual size and no more than
  :data:`MAX_L1_ENTRIES`, no encryption, no external data file, no
  feature svirt does not know); its virtual size is a number to show,
  never an amount to read;
- a backing chain is followed at most :data:`MAX_CHAIN` deep, never
  through a ``json:`` or protocol name, and a file met twice (same device
  and inode) is a loop, refused;
- every read goes through one :class:`Budget` (at most
  :data:`READ_BUDGET` bytes and :data:`READ_CALLS` reads per image): the
  callers above (partition tables, FAT) are bounded too, this is the net
  under them.

Any violation is one :class:`ImageFormatError` line.
"""

from __future__ import annotations

import os
import stat
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from svirt.errors import SvirtError

QCOW2_MAGIC = b"QFI\xfb"
MAX_CHAIN = 16
MAX_L1_ENTRIES = 1 << 22
READ_BUDGET = 64 << 20
READ_CALLS = 100_000
MAX_BACKING_NAME = 1023
#: incompatible features svirt reads past: dirty (0), corrupt (1); the
#: compression type (3) is checked on its own (zlib only)
_KNOWN_INCOMPATIBLE = 0b1011
_L1_MASK = 0x00FF_FFFF_FFFF_FE00
_COMPRESSED = 1 << 62


class ImageFormatError(SvirtError):
    """A disk image that cannot be read within svirt's bounds."""

    def __init__(self, message: str, *, path: Path | None = None) -> None:
        super().__init__(f"{path}: {message}" if path else message)
        self.path = path


@dataclass
class Budget:
    """What one inspection may read, every layer together."""

    bytes_left: int = READ_BUDGET
    calls_left: int = READ_CALLS

    def spend(self, size: int) -> None:
        self.bytes_left -= size
        self.calls_left -= 1
        if self.bytes_left < 0 or self.calls_left < 0:
            raise ImageFormatError(f"reading it would take more than {READ_BUDGET} bytes or "
                                   f"{READ_CALLS} reads (a table that loops or lies?)")


@dataclass
class Layer:
    """One file of a chain: its format, virtual size, backing name and format."""

    path: Path
    format: str
    virtual_size: int
    file_size: int
    backing: str | None = None
    backing_format: str | None = None
    fd: int = -1
    cluster_bits: int = 16
    l1_offset: int = 0
    l1_size: int = 0
    lower: Layer | None = None
    budget: Budget = field(default_factory=Budget)
    _clusters: dict[int, bytes] = field(default_factory=dict)

    def pread(self, size: int, offset: int) -> bytes:
        self.budget.spend(size)
        return os.pread(self.fd, size, offset)

    def read(self, offset: int, size: int) -> bytes:
        """Guest bytes ``offset`` .. ``offset + size`` (short past the end)."""
        size = max(0, min(size, self.virtual_size - offset))
        if self.format == "raw":
            return self.pread(size, offset)
        out = bytearray()
        csize = 1 << self.cluster_bits
        while len(out) < size:
            pos = offset + len(out)
            within = pos % csize
            take = min(size - len(out), csize - within)
            out += self._cluster_bytes(pos - within, within, take)
        return bytes(out)

    def _cluster_bytes(self, guest: int, within: int, take: int) -> bytes:
        entry = self._l2_entry(guest)
        host = entry & _L1_MASK
        if entry & _COMPRESSED:
            data = self._compressed(entry)
            return data[within:within + take]
        if entry & 1 or (host == 0 and self.lower is None):
            return bytes(take)  # a zero cluster, or unallocated with no backing
        if host == 0 and self.lower is not None:
            return self.lower.read(guest + within, take).ljust(take, b"\0")
        data = self.pread(take, host + within)
        if len(data) != take:
            raise ImageFormatError(f"a cluster lies past the end of the file ({host})",
                                   path=self.path)
        return data

    def _l2_entry(self, guest: int) -> int:
        bits = self.cluster_bits
        l2_entries = 1 << (bits - 3)
        index = guest >> bits
        l1_index, l2_index = divmod(index, l2_entries)
        if l1_index >= self.l1_size:
            raise ImageFormatError("its L1 table does not cover its virtual size",
                                   path=self.path)
        raw = self.pread(8, self.l1_offset + 8 * l1_index)
        if len(raw) != 8:
            raise ImageFormatError("its L1 table lies past the end of the file",
                                   path=self.path)
        l2 = struct.unpack(">Q", raw)[0] & _L1_MASK
        if l2 == 0:
            return 0
        raw = self.pread(8, l2 + 8 * l2_index)
        if len(raw) != 8:
            raise ImageFormatError("an L2 table lies past the end of the file",
                                   path=self.path)
        value: int = struct.unpack(">Q", raw)[0]
        return value

    def _compressed(self, entry: int) -> bytes:
        bits = self.cluster_bits
        shift = 62 - (bits - 8)
        offset = entry & ((1 << shift) - 1)
        if offset in self._clusters:
            return self._clusters[offset]
        sectors = ((entry >> shift) & ((1 << (bits - 8)) - 1)) + 1
        raw = self.pread(sectors * 512 - (offset & 511), offset)
        try:
            data = zlib.decompressobj(-12).decompress(raw, 1 << bits)
        except zlib.error as err:
            raise ImageFormatError(f"a compressed cluster does not inflate: {err}",
                                   path=self.path) from None
        if len(self._clusters) > 16:
            self._clusters.clear()
        self._clusters[offset] = data.ljust(1 << bits, b"\0")
        return self._clusters[offset]

    def close(self) -> None:
        layer: Layer | None = self
        while layer is not None:
            if layer.fd >= 0:
                os.close(layer.fd)
                layer.fd = -1
            layer = layer.lower


def open_image(path: Path, *, top: bool = True, seen: set[tuple[int, int]] | None = None,
               budget: Budget | None = None, fmt: str | None = None) -> Layer:
    """The image at ``path`` and its chain, opened and checked (close it)."""
    seen = set() if seen is None else seen
    budget = budget or Budget()
    if len(seen) >= MAX_CHAIN:
        raise ImageFormatError(f"its backing chain is deeper than {MAX_CHAIN}", path=path)
    fd = _open_checked(path, top)
    try:
        layer = _layer(fd, path, top, seen, budget, fmt)
    except BaseException:
        os.close(fd)
        raise
    return layer


def _open_checked(path: Path, top: bool) -> int:
    """``path`` opened for reading once its inode, reached ``O_PATH``, is a
    regular file (or, at the top, a block device)."""
    try:
        opath = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except OSError as err:
        raise ImageFormatError(f"cannot open it: {err.strerror}", path=path) from None
    try:
        mode = os.fstat(opath).st_mode
        if not (stat.S_ISREG(mode) or (top and stat.S_ISBLK(mode))):
            raise ImageFormatError("not a regular file" + (" or a block device" if top
                                                           else ""), path=path)
        try:
            return os.open(f"/proc/self/fd/{opath}",
                           os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
        except OSError as err:
            raise ImageFormatError(f"cannot open it: {err.strerror}", path=path) from None
    finally:
        os.close(opath)


def _layer(fd: int, path: Path, top: bool, seen: set[tuple[int, int]], budget: Budget,
           fmt: str | None) -> Layer:
    st = os.fstat(fd)
    if (st.st_dev, st.st_ino) in seen:
        raise ImageFormatError("its backing chain loops (this file is its own backing)",
                               path=path)
    seen.add((st.st_dev, st.st_ino))
    size = st.st_size if stat.S_ISREG(st.st_mode) else _blk_size(fd)
    budget.spend(512)
    head = os.pread(fd, 512, 0)
    if fmt not in (None, "raw", "qcow2"):
        raise ImageFormatError(f"backing format {fmt!r}: svirt reads raw and qcow2",
                               path=path)
    if fmt == "raw" or (fmt is None and head[:4] != QCOW2_MAGIC):
        return Layer(path, "raw", size, size, fd=fd, budget=budget)
    layer = _qcow2(fd, path, size, budget)
    if layer.backing is not None:
        layer.lower = open_image(_backing_path(layer.backing, path), top=False, seen=seen,
                                 budget=budget, fmt=layer.backing_format)
    return layer


def _blk_size(fd: int) -> int:
    return os.lseek(fd, 0, os.SEEK_END)


def _backing_path(name: str, image: Path) -> Path:
    if name.startswith("json:") or "://" in name or not name:
        raise ImageFormatError(f"backing name {name[:80]!r} is not a file name", path=image)
    p = Path(name)
    return p if p.is_absolute() else image.parent / p


def _qcow2(fd: int, path: Path, file_size: int, budget: Budget) -> Layer:
    budget.spend(65536)
    data = os.pread(fd, 65536, 0)
    if len(data) < 72:
        raise ImageFormatError("truncated qcow2 header", path=path)
    (version, b_off, b_size, bits, vsize, crypt, l1_size, l1_off) = struct.unpack_from(
        ">IQIIQIIQ", data, 4)
    if version not in (2, 3):
        raise ImageFormatError(f"qcow2 version {version}", path=path)
    if not 9 <= bits <= 21:
        raise ImageFormatError(f"qcow2 cluster size 2^{bits} (2^9 to 2^21)", path=path)
    if crypt:
        raise ImageFormatError("an encrypted qcow2 (svirt cannot read it)", path=path)
    if vsize > 1 << 56:
        raise ImageFormatError(f"virtual size {vsize} bytes (at most 2^56)", path=path)
    per_l1 = 1 << (bits - 3 + bits)
    if l1_size > MAX_L1_ENTRIES or l1_size * per_l1 < vsize:
        raise ImageFormatError(f"L1 table of {l1_size} entries for {vsize} bytes",
                               path=path)
    if l1_off % 512 or (l1_size and l1_off + 8 * l1_size > file_size):
        raise ImageFormatError("its L1 table lies outside the file", path=path)
    _check_features(data, version, path)
    layer = Layer(path, "qcow2", vsize, file_size, fd=fd, cluster_bits=bits, l1_offset=l1_off,
                  l1_size=l1_size, budget=budget)
    if b_off:
        if b_size == 0 or b_size > MAX_BACKING_NAME or b_off + b_size > len(data):
            raise ImageFormatError(f"backing name of {b_size} bytes at {b_off}", path=path)
        try:
            layer.backing = data[b_off:b_off + b_size].decode("utf-8")
        except UnicodeDecodeError:
            raise ImageFormatError("backing name is not UTF-8", path=path) from None
        layer.backing_format = _backing_format(data, version, b_off, path)
    return layer


def _check_features(data: bytes, version: int, path: Path) -> None:
    if version < 3:
        return
    (incompatible,) = struct.unpack_from(">Q", data, 72)
    if incompatible & ~_KNOWN_INCOMPATIBLE:
        raise ImageFormatError(f"qcow2 incompatible features {incompatible:#x} "
                               "(svirt reads: dirty, corrupt, compression type)", path=path)
    (length,) = struct.unpack_from(">I", data, 100)
    if incompatible & 8 and (length <= 104 or data[104] != 0):
        raise ImageFormatError("qcow2 compression other than zlib", path=path)


def _backing_format(data: bytes, version: int, limit: int, path: Path) -> str | None:
    pos = 72 if version == 2 else struct.unpack_from(">I", data, 100)[0]
    for _ in range(256):
        if pos < 72 or pos + 8 > min(len(data), limit):
            return None
        kind, length = struct.unpack_from(">II", data, pos)
        if kind == 0:
            return None
        if kind == 0xE2792ACA:
            return data[pos + 8:pos + 8 + min(length, 16)].decode("ascii", "replace")
        pos += 8 + (length + 7) // 8 * 8
    raise ImageFormatError("more than 256 qcow2 header extensions", path=path)
