"""Partition tables: a GPT written for the images svirt builds, and any
disk's MBR/GPT read back, bounded, as guest-written data.

Writing (:func:`gpt_layout`, :func:`protective_mbr`, :func:`gpt_sectors`):
the three-partition layout of ``svirt image build`` (a BIOS boot partition
for GRUB's core image, an EFI system partition, the root file system), a
protective MBR and the primary and backup GPT, all in memory.

Reading (:func:`read_table`): the disk is whatever the guest wrote, so
nothing in it is a size to trust.  A GPT's header CRC and entry-array CRC
must match; it may describe at most :data:`MAX_GPT_ENTRIES` entries of at
most :data:`MAX_ENTRY_SIZE` bytes (so at most 512 KiB is read for the
array); every partition must lie inside the disk and inside the header's
usable range, and no two may overlap.  An MBR's extended partitions are a
linked list in the disk itself: it is followed at most
:data:`MAX_LOGICAL` links, and a link that points back (a loop) or out of
the extended partition is refused.  Every violation is one
:class:`PartitionTableError` line.
"""

from __future__ import annotations

import struct
import uuid
import zlib
from collections.abc import Callable
from dataclasses import dataclass

from svirt.errors import SvirtError

SECTOR = 512
#: GPT partition type GUIDs (the UEFI spec; the root one is the
#: Discoverable Partitions Specification's x86-64 root)
BIOS_BOOT = uuid.UUID("21686148-6449-6e6f-744e-656564454649")
ESP = uuid.UUID("c12a7328-f81f-11d2-ba4b-00a0c93ec93b")
LINUX_ROOT_X86_64 = uuid.UUID("4f68bce3-e8cd-4db1-96e7-fbcaf984b709")
LINUX_DATA = uuid.UUID("0fc63daf-8483-4772-8e79-3d69d8477de4")
GPT_SIGNATURE = b"EFI PART"
#: bounds on what a GPT header may claim (the spec's minimum array is 128 x 128)
MAX_GPT_ENTRIES = 1024
MAX_ENTRY_SIZE = 512
#: logical partitions followed in an MBR extended chain
MAX_LOGICAL = 128
MBR_EXTENDED = (0x05, 0x0F, 0x85)
MBR_ESP, MBR_PROTECTIVE = 0xEF, 0xEE

#: reads ``size`` bytes of the disk at byte ``offset`` (short at its end)
Reader = Callable[[int, int], bytes]


class PartitionTableError(SvirtError):
    """A partition table that is malformed or claims what cannot be."""


@dataclass(frozen=True)
class Partition:
    """One partition: ``first``/``last`` sectors (inclusive), its type as
    a GUID (GPT) or a byte (MBR), its number (1-based)."""

    number: int
    first: int
    last: int
    type_guid: uuid.UUID | None = None
    mbr_type: int | None = None
    name: str = ""

    @property
    def offset(self) -> int:
        return self.first * SECTOR

    @property
    def size(self) -> int:
        return (self.last - self.first + 1) * SECTOR

    @property
    def is_esp(self) -> bool:
        return self.type_guid == ESP or self.mbr_type == MBR_ESP

    @property
    def is_bios_boot(self) -> bool:
        return self.type_guid == BIOS_BOOT


@dataclass(frozen=True)
class Table:
    """A disk's partition table: ``kind`` is ``gpt``, ``mbr`` or ``none``."""

    kind: str
    partitions: tuple[Partition, ...]
    mbr: bytes  # sector 0 as read (its boot code is checked by the caller)


# --------------------------------------------------------------------------
# writing


def gpt_layout(disk_bytes: int, *, bios_boot: int = 1 << 20, esp: int = 32 << 20
               ) -> tuple[Partition, Partition, Partition]:
    """BIOS boot at 1 MiB, the ESP after it, root to 1 MiB before the end."""
    sectors = disk_bytes // SECTOR
    mib = (1 << 20) // SECTOR
    first = mib
    parts = []
    for number, (size, kind, name) in enumerate(
            ((bios_boot, BIOS_BOOT, "bios"), (esp, ESP, "esp")), start=1):
        last = first + size // SECTOR - 1
        parts.append(Partition(number, first, last, kind, name=name))
        first = last + 1
    end = sectors - mib - 1
    if end - first < 16 * mib:
        raise PartitionTableError(f"a disk of {disk_bytes} bytes is too small")
    parts.append(Partition(3, first, end, LINUX_ROOT_X86_64, name="root"))
    return parts[0], parts[1], parts[2]


def protective_mbr(disk_bytes: int) -> bytes:
    """Sector 0 with the one 0xEE partition (boot code: zeros, for GRUB to fill)."""
    sectors = disk_bytes // SECTOR
    entry = struct.pack("<B3sB3sII", 0, b"\x00\x02\x00", MBR_PROTECTIVE, b"\xff\xff\xff",
                        1, min(sectors - 1, 0xFFFFFFFF))
    return bytes(446) + entry + bytes(48) + b"\x55\xaa"


def _entry(part: Partition, unique: uuid.UUID) -> bytes:
    kind = part.type_guid or LINUX_DATA
    name = part.name.encode("utf-16-le")[:72].ljust(72, b"\0")
    return struct.pack("<16s16sQQQ", kind.bytes_le, unique.bytes_le, part.first,
                       part.last, 0) + name


def gpt_sectors(disk_bytes: int, parts: tuple[Partition, ...], disk_guid: uuid.UUID,
                seed: bytes) -> tuple[bytes, bytes]:
    """(primary: sectors 1-33, backup: the last 33 sectors) of a 128-entry
    GPT; partition GUIDs are derived from ``seed`` (reproducible builds)."""
    sectors = disk_bytes // SECTOR
    array = bytearray(128 * 128)
    for i, part in enumerate(parts):
        unique = uuid.uuid5(disk_guid, seed.hex() + str(part.number))
        array[i * 128:(i + 1) * 128] = _entry(part, unique)
    array_crc = zlib.crc32(array)

    def header(current: int, backup: int, entries_at: int) -> bytes:
        fields = [GPT_SIGNATURE, 0x00010000, 92, 0, 0, current, backup, 34, sectors - 34,
                  disk_guid.bytes_le, entries_at, 128, 128, array_crc]
        raw = struct.pack("<8sIIIIQQQQ16sQIII", *fields)
        fields[3] = zlib.crc32(raw)
        return struct.pack("<8sIIIIQQQQ16sQIII", *fields).ljust(SECTOR, b"\0")

    primary = header(1, sectors - 1, 2) + bytes(array)
    backup = bytes(array) + header(sectors - 1, 1, sectors - 33)
    return primary, backup


# --------------------------------------------------------------------------
# reading


def _read_exact(read: Reader, offset: int, size: int, what: str) -> bytes:
    data = read(offset, size)
    if len(data) != size:
        raise PartitionTableError(f"{what} lies past the end of the disk")
    return data


def read_table(read: Reader, disk_bytes: int) -> Table:
    """The partition table of a disk of ``disk_bytes`` read through ``read``."""
    if disk_bytes < SECTOR:
        return Table("none", (), b"")
    mbr = _read_exact(read, 0, SECTOR, "sector 0")
    if mbr[510:512] != b"\x55\xaa":
        return Table("none", (), mbr)
    entries = [struct.unpack_from("<B3sB3sII", mbr, 446 + 16 * i) for i in range(4)]
    if any(e[0] not in (0, 0x80) for e in entries):
        return Table("none", (), mbr)  # a boot sector without a partition table (FAT, ...)
    if any(e[2] == MBR_PROTECTIVE for e in entries) and disk_bytes >= 2 * SECTOR:
        header = _read_exact(read, SECTOR, SECTOR, "the GPT header")
        if header[:8] == GPT_SIGNATURE:
            return Table("gpt", _gpt(read, header, disk_bytes), mbr)
    return Table("mbr", _mbr(read, entries, disk_bytes), mbr)


def _gpt(read: Reader, header: bytes, disk_bytes: int) -> tuple[Partition, ...]:
    (size,) = struct.unpack_from("<I", header, 12)
    if not 92 <= size <= SECTOR:
        raise PartitionTableError(f"GPT header size {size} (92 to {SECTOR})")
    (crc,) = struct.unpack_from("<I", header, 16)
    if zlib.crc32(header[:16] + b"\0\0\0\0" + header[20:size]) != crc:
        raise PartitionTableError("GPT header checksum does not match")
    first_usable, last_usable, _guid, entries_at, count, entry_size, array_crc = \
        struct.unpack_from("<QQ16sQIII", header, 40)
    sectors = disk_bytes // SECTOR
    if count > MAX_GPT_ENTRIES:
        raise PartitionTableError(f"GPT header claims {count} entries "
                                  f"(svirt reads at most {MAX_GPT_ENTRIES})")
    if entry_size < 128 or entry_size > MAX_ENTRY_SIZE or entry_size % 8:
        raise PartitionTableError(f"GPT entry size {entry_size} (128 to {MAX_ENTRY_SIZE})")
    if not 2 <= entries_at < sectors or first_usable > last_usable or last_usable >= sectors:
        raise PartitionTableError("GPT header points outside the disk")
    array = _read_exact(read, entries_at * SECTOR, count * entry_size, "the GPT entry array")
    if zlib.crc32(array) != array_crc:
        raise PartitionTableError("GPT entry array checksum does not match")
    parts = []
    for i in range(count):
        raw = array[i * entry_size:i * entry_size + 128]
        if raw[:16] == bytes(16):
            continue
        first, last = struct.unpack_from("<QQ", raw, 32)
        if not first_usable <= first <= last <= last_usable:
            raise PartitionTableError(f"GPT partition {i + 1} (sectors {first}-{last}) lies "
                                      "outside the disk's usable sectors")
        name = raw[56:128].decode("utf-16-le", errors="replace").split("\0", 1)[0]
        parts.append(Partition(i + 1, first, last, uuid.UUID(bytes_le=raw[:16]),
                               name="".join(c if c.isprintable() else "?" for c in name)))
    _no_overlap(parts)
    return tuple(parts)


def _no_overlap(parts: list[Partition]) -> None:
    ordered = sorted(parts, key=lambda p: p.first)
    for a, b in zip(ordered, ordered[1:], strict=False):
        if b.first <= a.last:
            raise PartitionTableError(f"partitions {a.number} and {b.number} overlap")


def _mbr(read: Reader, entries: list[tuple[int, bytes, int, bytes, int, int]],
         disk_bytes: int) -> tuple[Partition, ...]:
    sectors = disk_bytes // SECTOR
    parts: list[Partition] = []
    extended = None
    for i, (_status, _chs, kind, _chs_end, start, count) in enumerate(entries):
        if kind == 0 or count == 0:
            continue
        if start + count > sectors:
            raise PartitionTableError(f"MBR partition {i + 1} (sectors {start}+{count}) lies "
                                      "past the end of the disk")
        if kind in MBR_EXTENDED:
            if extended is not None:
                raise PartitionTableError("two extended MBR partitions")
            extended = (start, count)
            continue
        parts.append(Partition(i + 1, start, start + count - 1, mbr_type=kind))
    if extended is not None:
        parts += _logical(read, *extended)
    _no_overlap(parts)
    return tuple(parts)


def _logical(read: Reader, ext_start: int, ext_count: int) -> list[Partition]:
    """Follow the extended partition's chain: at most MAX_LOGICAL links,
    each forward within the extended partition (no loop can be followed)."""
    parts: list[Partition] = []
    link = 0  # relative to the extended partition's start
    for number in range(5, 5 + MAX_LOGICAL):
        ebr = _read_exact(read, (ext_start + link) * SECTOR, SECTOR, "an extended boot record")
        if ebr[510:512] != b"\x55\xaa":
            raise PartitionTableError(f"extended boot record at sector {ext_start + link} "
                                      "has no signature")
        _s, _c, kind, _e, start, count = struct.unpack_from("<B3sB3sII", ebr, 446)
        if kind and count:
            first = ext_start + link + start
            if link + start + count > ext_count:
                raise PartitionTableError(f"logical partition {number} lies outside its "
                                          "extended partition")
            parts.append(Partition(number, first, first + count - 1, mbr_type=kind))
        _s, _c, kind, _e, nxt, _n = struct.unpack_from("<B3sB3sII", ebr, 462)
        if kind not in MBR_EXTENDED or nxt == 0:
            return parts
        if nxt <= link or nxt >= ext_count:
            raise PartitionTableError("the extended partition's chain loops or leaves it "
                                      f"(link {link} -> {nxt})")
        link = nxt
    raise PartitionTableError(f"more than {MAX_LOGICAL} logical partitions")
