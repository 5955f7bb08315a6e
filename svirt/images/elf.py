"""Just enough ELF64 (little-endian) reading: is a binary static, what is in a section.

Read from bytes svirt already holds (busybox, kernel modules of a Debian
package); nothing here runs or maps them.
"""

from __future__ import annotations

import struct

__all__ = ["is_static_elf", "section"]

_PT_INTERP = 3


def _is_elf64_le(data: bytes) -> bool:
    return data[:4] == b"\x7fELF" and len(data) > 5 and data[4] == 2 and data[5] == 1


def is_static_elf(data: bytes) -> bool:
    """True for an ELF64 little-endian executable without a program interpreter."""
    if not _is_elf64_le(data):
        return False
    (e_phoff,) = struct.unpack_from("<Q", data, 0x20)
    e_phentsize, e_phnum = struct.unpack_from("<HH", data, 0x36)
    for i in range(e_phnum):
        (p_type,) = struct.unpack_from("<I", data, e_phoff + i * e_phentsize)
        if p_type == _PT_INTERP:
            return False
    return True


def section(data: bytes, wanted: str) -> bytes | None:
    """The contents of section ``wanted`` of an ELF64 little-endian object."""
    if not _is_elf64_le(data):
        return None
    (e_shoff,) = struct.unpack_from("<Q", data, 0x28)
    e_shentsize, e_shnum, e_shstrndx = struct.unpack_from("<HHH", data, 0x3A)

    def header(i: int) -> tuple[int, int, int]:
        base = e_shoff + i * e_shentsize
        (sh_name,) = struct.unpack_from("<I", data, base)
        sh_offset, sh_size = struct.unpack_from("<QQ", data, base + 0x18)
        return sh_name, sh_offset, sh_size

    _, str_off, str_size = header(e_shstrndx)
    names = data[str_off : str_off + str_size]
    for i in range(e_shnum):
        sh_name, offset, size = header(i)
        end = names.find(b"\0", sh_name)
        if names[sh_name:end].decode(errors="replace") == wanted:
            return data[offset : offset + size]
    return None
