"""``svirt image info``: what a disk image is and how it boots, read by svirt
itself, bounded (no root needed, no QEMU run, nothing in it trusted).

- format, virtual size, file size, and the backing chain as the headers
  record it (:mod:`svirt.images.imagefile`: bounded, loops refused);
- the partition table (:mod:`svirt.images.parttable`: CRCs, entry count
  and size bounded, no overlap, extended chains without loops);
- **BIOS**: sector 0 carries boot code (not all zeros, with the 0x55AA
  signature); GRUB's is recognised, and its core image must be where its
  boot code points (a GPT disk's BIOS boot partition, non-empty);
- **UEFI**: an EFI system partition holding the removable-media loader
  ``EFI/BOOT/BOOTX64.EFI`` (:mod:`svirt.images.fat`), a PE file (``MZ``).

Each failure is one line (:class:`~svirt.images.imagefile.ImageFormatError`
or :class:`~svirt.images.parttable.PartitionTableError`).
"""

from __future__ import annotations

import struct
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from svirt.images.fat import Fat
from svirt.images.imagefile import Layer, open_image
from svirt.images.parttable import (
    LINUX_DATA,
    LINUX_ROOT_X86_64,
    SECTOR,
    Partition,
    PartitionTableError,
    Table,
    read_table,
)

REMOVABLE_LOADER = "EFI/BOOT/BOOTX64.EFI"
_GRUB_KERNEL_SECTOR = 0x5C
_KNOWN = {LINUX_ROOT_X86_64: "linux-root-x86-64", LINUX_DATA: "linux-data"}


@dataclass(frozen=True)
class ChainEntry:
    path: str
    format: str
    virtual_size: int


@dataclass(frozen=True)
class ImageInfo:
    path: str
    format: str
    virtual_size: int
    file_size: int
    chain: tuple[ChainEntry, ...]
    partition_table: str
    partitions: tuple[dict[str, Any], ...]
    bios: bool
    bios_detail: str
    uefi: bool
    uefi_detail: str

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["chain"] = [asdict(c) for c in self.chain]
        data["partitions"] = list(self.partitions)
        return data


def inspect_image(path: Path) -> ImageInfo:
    """Read ``path`` (and its chain) and say what it is and how it boots."""
    layer = open_image(path)
    try:
        chain = []
        lower = layer.lower
        while lower is not None:
            chain.append(ChainEntry(str(lower.path), lower.format, lower.virtual_size))
            lower = lower.lower
        table = read_table(layer.read, layer.virtual_size)
        bios, bios_detail = _bios(layer, table)
        uefi, uefi_detail = _uefi(layer, table)
        return ImageInfo(
            path=str(path), format=layer.format, virtual_size=layer.virtual_size,
            file_size=layer.file_size, chain=tuple(chain), partition_table=table.kind,
            partitions=tuple(_describe(p) for p in table.partitions),
            bios=bios, bios_detail=bios_detail, uefi=uefi, uefi_detail=uefi_detail)
    finally:
        layer.close()


def _describe(part: Partition) -> dict[str, Any]:
    kind = ("bios-boot" if part.is_bios_boot else "esp" if part.is_esp
            else _KNOWN.get(part.type_guid, str(part.type_guid)) if part.type_guid
            else f"mbr-{part.mbr_type:#04x}")
    return {"number": part.number, "start": part.offset, "size": part.size, "type": kind,
            "name": part.name}


def _bios(layer: Layer, table: Table) -> tuple[bool, str]:
    mbr = table.mbr
    if len(mbr) < SECTOR or mbr[510:512] != b"\x55\xaa":
        return False, "no boot signature in sector 0"
    code = mbr[:440]
    if code.count(0) == len(code):
        return False, "sector 0 carries no boot code"
    if b"GRUB" not in code:
        return True, "boot code in sector 0 (not GRUB's)"
    (core,) = struct.unpack_from("<Q", mbr, _GRUB_KERNEL_SECTOR)
    if core == 0 or core * SECTOR >= layer.virtual_size:
        return False, f"GRUB's boot code points at sector {core}, outside the disk"
    if table.kind == "gpt" and not any(p.is_bios_boot and p.first <= core <= p.last
                                       for p in table.partitions):
        return False, f"GRUB's core image (sector {core}) is not in a BIOS boot partition"
    sector = layer.read(core * SECTOR, SECTOR)
    if sector.count(0) == len(sector):
        return False, f"GRUB's core image (sector {core}) is empty"
    return True, f"GRUB (core image at sector {core})"


def _uefi(layer: Layer, table: Table) -> tuple[bool, str]:
    esps = [p for p in table.partitions if p.is_esp]
    if not esps:
        return False, "no EFI system partition"
    problems = []
    for part in esps:
        def read(offset: int, size: int, part: Partition = part) -> bytes:
            if offset < 0 or offset + size > part.size:
                raise PartitionTableError(f"a read past the end of partition {part.number}")
            return layer.read(part.offset + offset, size)

        try:
            fat = Fat(read, part.size)
            found = fat.find(REMOVABLE_LOADER)
            if found is None:
                problems.append(f"partition {part.number}: no {REMOVABLE_LOADER}")
                continue
            first, size = found
            head = fat.cluster_bytes(first, 2) if first >= 2 else b""
            if size < 64 or head != b"MZ":
                problems.append(f"partition {part.number}: {REMOVABLE_LOADER} is not a PE file")
                continue
            return True, f"{REMOVABLE_LOADER} on partition {part.number} ({size} bytes)"
        except PartitionTableError as err:
            problems.append(f"partition {part.number}: {err.message}")
    return False, "; ".join(problems)


def format_text(info: ImageInfo) -> list[str]:
    """The lines ``svirt image info`` prints (values as data: the caller escapes)."""
    lines = [f"image:           {info.path}",
             f"format:          {info.format}",
             f"virtual size:    {_human(info.virtual_size)} ({info.virtual_size} bytes)",
             f"file size:       {_human(info.file_size)}"]
    for i, entry in enumerate(info.chain):
        lines.append(f"backing {i + 1}:       {entry.path} ({entry.format})")
    lines.append(f"partitions:      {info.partition_table}")
    for p in info.partitions:
        lines.append(f"  {p['number']:>3}  {_human(p['size']):>9}  {p['type']}"
                     + (f"  {p['name']}" if p["name"] else ""))
    lines.append(f"boots via BIOS:  {'yes' if info.bios else 'no'} ({info.bios_detail})")
    lines.append(f"boots via UEFI:  {'yes' if info.uefi else 'no'} ({info.uefi_detail})")
    return lines


def _human(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if value < 1024 or unit == "PiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"
