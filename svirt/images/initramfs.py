"""The busybox initramfs: its members, its content hash, and the cached image.

A static busybox with one symlink per applet ``/init`` uses, ``/init``
itself (:mod:`svirt.images.guest_init`), the ACPI power button handler, and
for QEMU the cloud kernel's modules in load order (:mod:`svirt.images.kmod`).
The image's name carries a hash of every member, so a changed input gives a
new image and an unchanged one is reused; it is written once, whole, under
the cache lock (:mod:`svirt.images.cache`).
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import stat
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO, cast

from svirt.errors import ImageBuildError
from svirt.images.cache import atomic_write, locked, resolve_cache
from svirt.images.cpio import CpioEntry, write_cpio
from svirt.images.elf import is_static_elf
from svirt.images.guest_init import ACPI_POWER_HANDLER, MODULE_ORDER_FILE, init_script
from svirt.images.kernels import qemu_kernel_tree
from svirt.images.kmod import kernel_modules

__all__ = ["QEMU_MODULES", "build_initramfs", "initramfs_entries"]

# Bump when the layout of the initramfs changes in a way the hash of its
# entries would not notice.
_FORMAT_VERSION = b"svirt-initramfs-1"

_BUSYBOX_CANDIDATES = (Path("/bin/busybox"), Path("/usr/bin/busybox"))

# Every applet /init (and the acpid handler) uses; each becomes /bin/<name>.
_APPLETS = (
    "acpid",
    "cat",
    "dd",
    "echo",
    "head",
    "insmod",
    "ip",
    "kill",
    "ls",
    "mkdir",
    "mount",
    "ping",
    "poweroff",
    "printf",
    "sh",
    "sleep",
    "stty",
    "sync",
    "uname",
)

QEMU_MODULES = ("button", "evdev", "virtio_pci", "virtio_net", "virtio_blk", "pvpanic_mmio",
                "pvpanic_pci")
"""Modules the QEMU guest needs from the cloud kernel (their dependencies are
added automatically): the ACPI power button and evdev for system_powerdown,
virtio-pci, virtio-net and virtio-blk for networking and disks, pvpanic (ISA
``-device pvpanic`` and ``-device pvpanic-pci``) so that QEMU can report a
guest panic (``-action panic=exit-failure``, QMP GUEST_PANICKED)."""

_DIR = stat.S_IFDIR | 0o755
_EXE = stat.S_IFREG | 0o755
_FILE = stat.S_IFREG | 0o644
_LINK = stat.S_IFLNK | 0o777


def _busybox() -> bytes:
    for candidate in _BUSYBOX_CANDIDATES:
        try:
            data = candidate.read_bytes()
        except OSError:
            continue
        if is_static_elf(data):
            return data
    raise ImageBuildError(
        "no statically linked busybox found (looked at "
        + ", ".join(str(p) for p in _BUSYBOX_CANDIDATES)
        + ")",
        hint="apt-get install busybox-static",
    )


def initramfs_entries(modules: tuple[str, list[tuple[str, bytes]]] | None) -> list[CpioEntry]:
    """Every member, parents first; ``modules`` is (release, [(name, .ko)]) in load order."""
    entries = [
        CpioEntry("bin", _DIR),
        CpioEntry("dev", _DIR),
        CpioEntry("etc", _DIR),
        CpioEntry("etc/acpi", _DIR),
        CpioEntry("etc/acpi/PWRF", _DIR),
        CpioEntry("etc/acpi/PWRF/00000080", _EXE, ACPI_POWER_HANDLER.encode()),
        CpioEntry("lib", _DIR),
        CpioEntry("proc", _DIR),
        CpioEntry("sys", _DIR),
        CpioEntry("tmp", stat.S_IFDIR | 0o1777),
        CpioEntry("bin/busybox", _EXE, _busybox()),
    ]
    entries += [CpioEntry(f"bin/{applet}", _LINK, b"busybox") for applet in _APPLETS]
    if modules is not None:
        release, mods = modules
        base = f"lib/modules/{release}"
        entries += [CpioEntry("lib/modules", _DIR), CpioEntry(base, _DIR)]
        entries += [CpioEntry(f"{base}/{name}.ko", _FILE, data) for name, data in mods]
        order = "".join(f"{name}.ko\n" for name, _ in mods)
        entries.append(CpioEntry(f"{base}/{MODULE_ORDER_FILE}", _FILE, order.encode()))
    entries.append(CpioEntry("init", _EXE, init_script().encode()))
    return entries


def _entries_digest(entries: Sequence[CpioEntry]) -> str:
    h = hashlib.sha256(_FORMAT_VERSION)
    for e in entries:
        name = e.name.encode()
        h.update(struct.pack("<QIIQ", len(name), e.mode, e.mtime, len(e.data)))
        h.update(name)
        h.update(e.data)
    return h.hexdigest()


def build_initramfs(cache: Path | None = None, *, qemu_modules: bool = True) -> Path:
    """The busybox initramfs (gzip-compressed newc cpio), built once per content.

    Its file name carries a hash of everything in it (busybox, ``/init``,
    modules), so a changed input gives a new image and an unchanged one is
    reused.  With ``qemu_modules`` (the default) it ships the cloud kernel's
    ACPI button, evdev and virtio-net modules, downloading that kernel if
    needed; UML guests pass ``False`` and need nothing from the network.
    """
    cache = resolve_cache(cache)
    modules = kernel_modules(qemu_kernel_tree(cache), QEMU_MODULES) if qemu_modules else None
    entries = initramfs_entries(modules)
    dest = cache / f"initramfs-{_entries_digest(entries)[:16]}.cpio.gz"
    if dest.is_file():
        return dest

    def fill(f: BinaryIO) -> None:
        with gzip.GzipFile(filename="", fileobj=f, mode="wb", compresslevel=9, mtime=0) as gz:
            write_cpio(entries, cast(BinaryIO, gz))

    with locked(cache, "initramfs"):
        if not dest.is_file():
            # We hold the lock: temporary files left by killed builds can go.
            for stale in cache.glob(".initramfs-*.tmp"):
                with contextlib.suppress(OSError):
                    stale.unlink()
            try:
                atomic_write(dest, fill)
            except OSError as exc:
                raise ImageBuildError(
                    f"cannot write {dest}: {exc.strerror or exc}",
                    hint="is the cache writable and not full?",
                ) from exc
    return dest
