"""Small disks made for the image-info tests: svirt's own GPT writer, a real
FAT ESP (mkfs.vfat + mtools), fake GRUB boot code; and the ways a guest
can make one lie (each recomputes the CRCs, so only the lie is wrong)."""

from __future__ import annotations

import shutil
import struct
import subprocess
import uuid
import zlib
from pathlib import Path

from svirt.images.disk import patch_core_img
from svirt.images.parttable import SECTOR, gpt_layout, gpt_sectors, protective_mbr

DISK_BYTES = 64 << 20
ESP_BYTES = 32 << 20


def have_tools() -> str | None:
    missing = [t for t in ("mkfs.vfat", "mmd", "mcopy", "qemu-img")
               if shutil.which(t) is None and shutil.which(t, path="/usr/sbin:/sbin") is None]
    return f"missing {', '.join(missing)}" if missing else None


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=60)  # noqa: S603


def write_at(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def read_at(path: Path, offset: int, size: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(size)


def make_disk(path: Path, *, loader: bytes | None = b"MZ" + bytes(200),
              grub: bool = True) -> Path:
    """A raw GPT disk: BIOS boot (fake GRUB core), ESP (FAT, with ``loader``
    as EFI/BOOT/BOOTX64.EFI), root (empty)."""
    parts = gpt_layout(DISK_BYTES, esp=ESP_BYTES)
    with open(path, "wb") as f:
        f.truncate(DISK_BYTES)
    mbr = bytearray(protective_mbr(DISK_BYTES))
    if grub:
        mbr[0:2] = b"\xeb\x63"
        mbr[0x180:0x185] = b"GRUB "
        struct.pack_into("<Q", mbr, 0x5C, parts[0].first)
        write_at(path, parts[0].offset, patch_core_img(b"\x52\xe8" + bytes(2000),
                                                       parts[0].first))
    primary, backup = gpt_sectors(DISK_BYTES, parts, uuid.UUID(int=7), b"test")
    write_at(path, 0, bytes(mbr) + primary)
    write_at(path, DISK_BYTES - len(backup), backup)
    esp = path.with_suffix(".esp")
    _run("mkfs.vfat", "-C", str(esp), str(ESP_BYTES // 1024))
    if loader is not None:
        src = path.with_suffix(".efi")
        src.write_bytes(loader)
        _run("mmd", "-i", str(esp), "::/EFI", "::/EFI/BOOT")
        _run("mcopy", "-i", str(esp), str(src), "::/EFI/BOOT/BOOTX64.EFI")
        src.unlink()
    write_at(path, parts[1].offset, esp.read_bytes())
    esp.unlink()
    return path


def to_qcow2(raw: Path, dest: Path, *compress: str) -> Path:
    _run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", *compress, str(raw), str(dest))
    return dest


def overlay(base: Path, dest: Path, fmt: str = "qcow2") -> Path:
    _run("qemu-img", "create", "-f", "qcow2", "-F", fmt, "-b", str(base), str(dest))
    return dest


# --------------------------------------------------------------------------
# lies, each with the CRCs made right again


def gpt_header(path: Path) -> bytearray:
    return bytearray(read_at(path, SECTOR, SECTOR))


def put_gpt_header(path: Path, header: bytearray) -> None:
    struct.pack_into("<I", header, 16, 0)
    struct.pack_into("<I", header, 16, zlib.crc32(bytes(header[:92])))
    write_at(path, SECTOR, bytes(header))


def set_entries(path: Path, count: int, size: int = 128) -> None:
    header = gpt_header(path)
    struct.pack_into("<II", header, 80, count, size)
    put_gpt_header(path, header)


def rewrite_entry(path: Path, index: int, first: int, last: int) -> None:
    """Entry ``index`` now spans ``first``..``last``; the array CRC fixed."""
    array = bytearray(read_at(path, 2 * SECTOR, 128 * 128))
    struct.pack_into("<QQ", array, index * 128 + 32, first, last)
    write_at(path, 2 * SECTOR, bytes(array))
    header = gpt_header(path)
    struct.pack_into("<I", header, 88, zlib.crc32(bytes(array)))
    put_gpt_header(path, header)


def mbr_disk(path: Path, ebr_links: list[int], size: int = 8 << 20) -> Path:
    """An MBR disk with an extended partition at sector 2048 whose EBRs link
    to the given sectors (relative to it): a loop when a link points back."""
    with open(path, "wb") as f:
        f.truncate(size)
    sectors = size // SECTOR
    mbr = bytearray(SECTOR)
    struct.pack_into("<B3sB3sII", mbr, 446, 0, b"", 0x05, b"", 2048, sectors - 2048)
    mbr[510:512] = b"\x55\xaa"
    write_at(path, 0, bytes(mbr))
    written: set[int] = set()
    for i, pos in enumerate([0, *ebr_links]):
        if pos in written:
            break
        written.add(pos)
        nxt = ebr_links[i] if i < len(ebr_links) else 0
        ebr = bytearray(SECTOR)
        struct.pack_into("<B3sB3sII", ebr, 446, 0, b"", 0x83, b"", 1, 1)
        if nxt:
            struct.pack_into("<B3sB3sII", ebr, 462, 0, b"", 0x05, b"", nxt, 2)
        ebr[510:512] = b"\x55\xaa"
        write_at(path, (2048 + pos) * SECTOR, bytes(ebr))
    return path


def set_qcow2_fields(path: Path, **fields: int) -> None:
    """Overwrite qcow2 header fields (virtual_size, l1_size, l1_offset,
    cluster_bits, incompatible)."""
    where = {"cluster_bits": (20, ">I"), "virtual_size": (24, ">Q"), "l1_size": (36, ">I"),
             "l1_offset": (40, ">Q"), "incompatible": (72, ">Q")}
    for name, value in fields.items():
        offset, fmt = where[name]
        write_at(path, offset, struct.pack(fmt, value))
