"""How a guest boots: a kernel given to the hypervisor, or firmware that boots a disk.

UML and lguest always boot their ``kernel``.  QEMU boots it when one is given
(directly, under SeaBIOS, or under OVMF with ``firmware = "uefi"``), and
otherwise runs firmware (``firmware``: BIOS unless it says ``"uefi"``) that
boots the first disk, or the first ``[[cdrom]]`` with ``boot = "cdrom"``.
A UEFI guest's variables store is a fresh copy per run unless ``nvram``
names a persistent one (under an image root: checked when it is opened,
:mod:`svirt.images.firmware`).

``firmware`` is a key and ``nvram`` another, both at the top of the spec:
TOML cannot hold ``firmware = "uefi"`` and a ``[firmware]`` table at once.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from svirt.spec.keys import key
from svirt.spec.values import Backend, _enum, _fail, _path, _show, show_path

MAX_CDROMS = 4


class Firmware(enum.StrEnum):
    BIOS = "bios"  # SeaBIOS (Debian's seabios)
    UEFI = "uefi"  # OVMF (Debian's ovmf): a shared code file, a per-guest NVRAM


class BootFrom(enum.StrEnum):
    DISK = "disk"
    CDROM = "cdrom"


@dataclass(frozen=True)
class Cdrom:
    """A read-only ISO image (qemu): labelled like a shared read-only disk."""

    path: Path = key("the ISO image")

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", _path("cdrom.path", self.path))


class GuestSpec(Protocol):
    """The keys of :class:`svirt.spec.model.GuestSpec` the checks read (model
    imports this module, never the other way)."""

    @property
    def kernel(self) -> Path | None: ...
    @property
    def initrd(self) -> Path | None: ...
    @property
    def cmdline(self) -> str: ...
    @property
    def disks(self) -> tuple[Any, ...]: ...
    @property
    def firmware(self) -> Firmware | None: ...
    @property
    def nvram(self) -> Path | None: ...
    @property
    def boot(self) -> BootFrom: ...
    @property
    def cdroms(self) -> tuple[Cdrom, ...]: ...


def firmware_of(spec: GuestSpec) -> Firmware | None:
    """The firmware a guest runs: the spec's, else BIOS when there is no
    kernel, else none asked for (QEMU's own default, the argv unchanged)."""
    if spec.firmware is not None:
        return spec.firmware
    return Firmware.BIOS if spec.kernel is None else None


def check_boot(spec: GuestSpec, backend: Backend) -> None:
    """The boot keys, each alone and together (called by GuestSpec)."""
    if spec.kernel is not None:
        object.__setattr__(spec, "kernel", _path("kernel", spec.kernel))
    if spec.firmware is not None:
        object.__setattr__(spec, "firmware", _enum(Firmware, "firmware", spec.firmware))
    object.__setattr__(spec, "boot", _enum(BootFrom, "boot", spec.boot))
    if spec.nvram is not None:
        object.__setattr__(spec, "nvram", _path("nvram", spec.nvram))
    if not isinstance(spec.cdroms, tuple | list) or not all(
            isinstance(c, Cdrom) for c in spec.cdroms):
        raise _fail("cdrom", f"expected a tuple of Cdrom, got {_show(spec.cdroms)}")
    object.__setattr__(spec, "cdroms", tuple(spec.cdroms))
    if backend is not Backend.QEMU:
        _check_kernel_only(spec, backend)
        return
    if spec.kernel is None:
        _check_firmware_boot(spec)
    elif spec.boot is BootFrom.CDROM:
        raise _fail("boot", "a guest with a kernel boots that kernel, not a cdrom",
                    hint="drop kernel (firmware then boots the cdrom) or boot = \"cdrom\"")
    if spec.nvram is not None and spec.firmware is not Firmware.UEFI:
        raise _fail("nvram", "only a UEFI guest has a variables store",
                    hint="set firmware = \"uefi\", or drop nvram")
    if spec.boot is BootFrom.CDROM and not spec.cdroms:
        raise _fail("boot", "boot = \"cdrom\" needs a [[cdrom]]")
    if len(spec.cdroms) > MAX_CDROMS:
        raise _fail("cdrom", f"at most {MAX_CDROMS} cdroms")
    _check_distinct(spec)


def _check_kernel_only(spec: GuestSpec, backend: Backend) -> None:
    what = "the UML binary" if backend is Backend.UML else "a kernel"
    if spec.kernel is None:
        raise _fail("kernel", f"the {backend} backend needs {what}: only qemu boots "
                    "through firmware", hint="name the kernel, or use backend = \"qemu\"")
    for name, given in (("firmware", spec.firmware is not None),
                        ("nvram", spec.nvram is not None), ("cdrom", bool(spec.cdroms)),
                        ("boot", spec.boot is not BootFrom.DISK)):
        if given:
            raise _fail(name, f"the {backend} backend boots its kernel, never firmware "
                        "(only qemu has firmware, cdroms and an NVRAM store)")


def _check_firmware_boot(spec: GuestSpec) -> None:
    if spec.initrd is not None:
        raise _fail("initrd", "an initrd goes with a kernel; firmware boots the disk's own",
                    hint="name the kernel too, or drop initrd")
    if spec.cmdline:
        raise _fail("cmdline", "a command line goes with a kernel; the disk's boot loader "
                    "has its own", hint="name the kernel too, or drop cmdline")
    if not spec.disks and not spec.cdroms:
        raise _fail("kernel", "no kernel and nothing for firmware to boot",
                    hint="name a kernel, a [[disk]] or a [[cdrom]]")
    if spec.boot is BootFrom.DISK and not spec.disks:
        raise _fail("boot", "boot = \"disk\" (the default) needs a [[disk]]",
                    hint="set boot = \"cdrom\" to boot the cdrom")


def _check_distinct(spec: GuestSpec) -> None:
    """A file is one object: never a disk, a cdrom and the NVRAM at once."""
    seen = {d.path: "a disk" for d in spec.disks}
    if spec.kernel is not None:
        seen.setdefault(spec.kernel, "the kernel")
    for i, cd in enumerate(spec.cdroms):
        if cd.path in seen:
            raise _fail(f"cdrom[{i}].path", f"{show_path(cd.path)} is also {seen[cd.path]}")
        seen[cd.path] = "a cdrom"
    if spec.nvram is not None and spec.nvram in seen:
        raise _fail("nvram", f"{show_path(spec.nvram)} is also {seen[spec.nvram]}")
