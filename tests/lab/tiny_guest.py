"""Tiny guests for the lab: they print a marker and stop, as fast as possible.

* :func:`multiboot_kernel` -- a 100-byte multiboot "kernel" for
  ``qemu-system-x86_64 -kernel``: it writes a marker to COM1 and triple-faults,
  so QEMU started with ``-no-reboot`` exits 0.  Booting it under nested TCG in
  the lab takes about a second, against about 50 s for a Debian kernel.
  With ``stay=True`` it halts with interrupts off instead (no CPU used): the
  guest runs until QMP ``quit`` (it has no ACPI, so ``system_powerdown`` is
  ignored).
* :func:`busybox_initramfs` -- a newc cpio with a static busybox and an /init
  that prints a marker and powers off; used with the lab's Debian kernel
  (QEMU ``-initrd``) or with User-Mode-Linux (``initrd=``).

Stdlib only: usable on the host and inside the lab (python3 is in the image).
"""

from __future__ import annotations

import struct
from pathlib import Path

MARKER = "SVIRT-GUEST-MARKER"

_LOAD_ADDR = 0x100000
_HEADER_SIZE = 32


def multiboot_kernel(marker: str = MARKER, *, stay: bool = False) -> bytes:
    """A multiboot (a.out kludge) image printing *marker* on COM1 then resetting
    (``stay``: then halting for good)."""
    magic, flags = 0x1BADB002, 0x00010000  # bit 16: the address fields are valid
    checksum = (-(magic + flags)) & 0xFFFFFFFF
    entry = _LOAD_ADDR + _HEADER_SIZE

    def code(msg_addr: int, idtr_addr: int) -> bytes:
        if stay:
            end = b"\xfa\xf4\xeb\xfd"  # done: cli; hlt; jmp hlt
        else:
            # done: lidt [empty idt]; int3 -> triple fault -> reset (-no-reboot exits)
            end = b"\x0f\x01\x1d" + struct.pack("<I", idtr_addr) + b"\xcc\xf4\xeb\xfd"
        return b"".join(
            [
                b"\xbe" + struct.pack("<I", msg_addr),  # mov esi, msg
                b"\x66\xba\xf8\x03",  # mov dx, 0x3f8
                b"\xac",  # loop: lodsb
                b"\x84\xc0",  # test al, al
                b"\x74\x03",  # jz done
                b"\xee",  # out dx, al
                b"\xeb\xf8",  # jmp loop
                end,
            ]
        )

    size = len(code(0, 0))
    idtr_addr = entry + size
    msg_addr = idtr_addr + 8
    # stay: the marker on a line of its own (SeaBIOS leaves "Booting from ROM.." open)
    text = ("\r\n" if stay else "") + marker + "\r\n"
    body = code(msg_addr, idtr_addr) + b"\0" * 8 + text.encode() + b"\0"
    header = struct.pack("<8I", magic, flags, checksum, _LOAD_ADDR, _LOAD_ADDR, 0, 0, entry)
    assert len(header) == _HEADER_SIZE
    return header + body


def _cpio_entry(name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> bytes:
    fields = [
        0, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(name) + 1, 0,
    ]  # fmt: skip
    head = b"070701" + b"".join(b"%08X" % f for f in fields)
    out = head + name.encode() + b"\0"
    out += b"\0" * (-len(out) % 4)
    out += data + b"\0" * (-len(data) % 4)
    return out


def busybox_initramfs(
    busybox: Path = Path("/bin/busybox"), marker: str = MARKER, commands: str = ""
) -> bytes:
    """A newc initramfs: static busybox + /init that prints *marker* and powers off.

    *commands* (shell, run by busybox sh with /bin/busybox applets available
    as ``/bin/busybox APPLET``) run before the marker is printed.
    """
    init = f"#!/bin/busybox sh\n{commands}\n/bin/busybox echo {marker}\n/bin/busybox poweroff -f\n"
    parts = [
        _cpio_entry("dev", 0o040755),
        _cpio_entry("dev/console", 0o020600, rdev=(5, 1)),
        _cpio_entry("bin", 0o040755),
        _cpio_entry("bin/busybox", 0o100755, busybox.read_bytes()),
        _cpio_entry("init", 0o100755, init.encode()),
        _cpio_entry("TRAILER!!!", 0),
    ]
    blob = b"".join(parts)
    return blob + b"\0" * (-len(blob) % 512)
