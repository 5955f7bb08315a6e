"""Build tiny guests from Debian packages: a kernel plus a busybox initramfs.

The public front of the image builders; each job has a module of its own:

=======================  ===================================================
``guest_init``           the ``/init`` script (``init.sh``, package data),
                         the modes it knows, :func:`guest_cmdline`
``initramfs``            the initramfs members, their hash, the cached image
``cpio``                 the cpio "newc" writer
``kmod``                 kernel modules: ``.modinfo`` dependencies, load order
``elf``                  the bits of ELF64 those two read
``kernels``              the QEMU kernel (Debian's cloud kernel) and UML's
``apt``                  Debian packages downloaded and unpacked into the cache
``cache``                the cache directory, atomic writes, the build lock
=======================  ===================================================

QEMU guests boot Debian's ``linux-image-cloud-amd64`` with an initramfs that
carries its power button, evdev, virtio and pvpanic modules; UML guests boot
the host's ``/usr/bin/linux`` with a module-less initramfs and need nothing
from the network.  Everything lands in the cache (``$SVIRT_CACHE`` or
``/var/cache/svirt``), world-readable, built atomically under a lock.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from svirt.images.cache import DEFAULT_CACHE, cache_dir, resolve_cache
from svirt.images.cpio import CpioEntry, write_cpio
from svirt.images.guest_init import (
    DEFAULT_MARKER,
    DISK_PREFIX,
    GUEST_MODES,
    PING_PREFIX,
    POWEROFF_MARKER,
    guest_cmdline,
)
from svirt.images.initramfs import build_initramfs
from svirt.images.kernels import QEMU_KERNEL_PACKAGE, qemu_kernel, uml_kernel

__all__ = [
    "DEFAULT_CACHE",
    "DEFAULT_MARKER",
    "DISK_PREFIX",
    "GUEST_MODES",
    "PING_PREFIX",
    "POWEROFF_MARKER",
    "QEMU_KERNEL_PACKAGE",
    "CpioEntry",
    "TinyGuest",
    "build_initramfs",
    "cache_dir",
    "guest_cmdline",
    "qemu_kernel",
    "tiny_qemu_guest",
    "tiny_uml_guest",
    "uml_kernel",
    "write_cpio",
]


@dataclass(frozen=True)
class TinyGuest:
    """A bootable tiny guest: kernel (or UML binary) and initramfs."""

    kernel: Path
    initrd: Path


def tiny_qemu_guest(cache: Path | None = None) -> TinyGuest:
    """Debian's cloud kernel and the initramfs with its modules, for ``-accel tcg``."""
    cache = resolve_cache(cache)
    return TinyGuest(kernel=qemu_kernel(cache), initrd=build_initramfs(cache))


def tiny_uml_guest(cache: Path | None = None) -> TinyGuest:
    """``/usr/bin/linux`` and the module-less initramfs."""
    cache = resolve_cache(cache)
    return TinyGuest(kernel=uml_kernel(), initrd=build_initramfs(cache, qemu_modules=False))
