"""Find a file on a FAT12/16/32 file system (an ESP), reading as little as
possible and trusting none of it.

The boot sector's numbers must describe a file system that fits its
partition; a directory is read at most :data:`MAX_DIR_CLUSTERS` clusters
and :data:`MAX_DIR_ENTRIES` entries; a cluster chain is followed only
through valid cluster numbers and never twice through one cluster (a loop
ends the walk).  Long names are skipped: the lookup is by 8.3 name, which
is what the UEFI removable path ``EFI/BOOT/BOOTX64.EFI`` is.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator

from svirt.images.parttable import PartitionTableError

MAX_DIR_CLUSTERS = 64
MAX_DIR_ENTRIES = 4096

#: reads ``size`` bytes at byte ``offset`` of the partition
Reader = Callable[[int, int], bytes]


class FatError(PartitionTableError):
    """A FAT file system that is malformed or out of svirt's bounds."""


class Fat:
    def __init__(self, read: Reader, part_bytes: int) -> None:
        boot = read(0, 512)
        if len(boot) != 512 or boot[510:512] != b"\x55\xaa":
            raise FatError("no FAT boot sector")
        bps, spc, reserved, nfats, root_entries, total16 = struct.unpack_from(
            "<HBHBHH", boot, 11)
        (fatsz16,) = struct.unpack_from("<H", boot, 22)
        total32, fatsz32, _flags, _ver, root_cluster = struct.unpack_from("<IIHHI", boot, 32)
        if bps not in (512, 1024, 2048, 4096) or spc not in (1, 2, 4, 8, 16, 32, 64, 128):
            raise FatError(f"FAT sector size {bps} / cluster of {spc} sectors")
        total = total16 or total32
        fatsz = fatsz16 or fatsz32
        if not reserved or not 1 <= nfats <= 4 or not fatsz or total * bps > part_bytes:
            raise FatError("FAT boot sector describes more than its partition")
        root_sectors = (root_entries * 32 + bps - 1) // bps
        self.first_data = reserved + nfats * fatsz + root_sectors
        if self.first_data >= total:
            raise FatError("FAT boot sector leaves no data area")
        self.clusters = (total - self.first_data) // spc
        self.kind = 12 if self.clusters < 4085 else 16 if self.clusters < 65525 else 32
        if self.kind == 32 and fatsz16:
            raise FatError("FAT32 with a 16-bit FAT size")
        self.read, self.bps, self.spc = read, bps, spc
        self.fat_at = reserved * bps
        self.fat_bytes = fatsz * bps
        self.root_at = (reserved + nfats * fatsz) * bps
        self.root_entries = root_entries
        self.root_cluster = root_cluster if self.kind == 32 else 0

    def _next(self, cluster: int) -> int:
        if self.kind == 12:
            at = cluster + cluster // 2
            raw = self._fat(at, 2)
            value = int(struct.unpack("<H", raw)[0])
            return value >> 4 if cluster & 1 else value & 0xFFF
        if self.kind == 16:
            return int(struct.unpack("<H", self._fat(cluster * 2, 2))[0])
        return int(struct.unpack("<I", self._fat(cluster * 4, 4))[0]) & 0x0FFFFFFF

    def _fat(self, at: int, size: int) -> bytes:
        if at + size > self.fat_bytes:
            raise FatError("a cluster number past its FAT")
        data = self.read(self.fat_at + at, size)
        if len(data) != size:
            raise FatError("the FAT lies past its partition")
        return data

    def chain(self, first: int, limit: int) -> Iterator[int]:
        """Up to ``limit`` clusters of the chain from ``first``; stops at its
        end, at a bad or free entry, and at a loop."""
        seen: set[int] = set()
        cluster = first
        while 2 <= cluster < self.clusters + 2 and cluster not in seen and len(seen) < limit:
            seen.add(cluster)
            yield cluster
            cluster = self._next(cluster)

    def cluster_bytes(self, cluster: int, size: int | None = None) -> bytes:
        csize = self.bps * self.spc
        at = (self.first_data + (cluster - 2) * self.spc) * self.bps
        data = self.read(at, csize if size is None else min(size, csize))
        return data

    def _entries(self, cluster: int) -> Iterator[tuple[str, int, int, int]]:
        """(8.3 name, attributes, first cluster, size) of a directory's entries."""
        if cluster == 0:  # FAT12/16's fixed root directory
            blocks: Iterator[bytes] = iter([self.read(self.root_at,
                                                      min(self.root_entries, MAX_DIR_ENTRIES)
                                                      * 32)])
        else:
            blocks = (self.cluster_bytes(c) for c in self.chain(cluster, MAX_DIR_CLUSTERS))
        count = 0
        for block in blocks:
            for pos in range(0, len(block) - 31, 32):
                count += 1
                raw = block[pos:pos + 32]
                if raw[0] == 0 or count > MAX_DIR_ENTRIES:
                    return
                attr = raw[11]
                if raw[0] == 0xE5 or attr & 0x0F == 0x0F or attr & 0x08:
                    continue
                name = raw[:8].decode("latin-1").rstrip()
                ext = raw[8:11].decode("latin-1").rstrip()
                hi, lo, size = struct.unpack_from("<H4xHI", raw, 20)
                yield (f"{name}.{ext}" if ext else name), attr, (hi << 16) | lo, size

    def find(self, path: str) -> tuple[int, int] | None:
        """(first cluster, size) of the file at ``path`` (``/``-separated, 8.3
        names, any case), or None."""
        cluster = self.root_cluster
        parts = [p.upper() for p in path.strip("/").split("/")]
        for depth, part in enumerate(parts):
            last = depth == len(parts) - 1
            for name, attr, first, size in self._entries(cluster):
                if name.upper() == part and bool(attr & 0x10) != last:
                    if last:
                        return first, size
                    cluster = first
                    if cluster == 0:
                        return None  # ".." to the root, or a broken entry
                    break
            else:
                return None
        return None
