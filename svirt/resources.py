"""The guest's object vocabulary: what a guest opens, how, and where its layers go.

Backends say which host objects a guest opens (:class:`Resource`), security
drivers label them by their :class:`Access`, images make and check them, and
the launcher holds them: all four speak of objects in these words, and this
module imports nothing of svirt above the spec, so none of them needs another
to name an object.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path

from svirt.spec import Backend, GuestSpec

LAYERS_DIR = "layers"  # below the run directory (root's), for QEMU overlays
SEED_NAME = "seed.iso"  # in the run directory (root's)


class Access(enum.StrEnum):
    RW = "rw"  # private to this guest, writable
    RO = "ro"  # read-only content (kernel, initrd, read-only disk, backing file)
    SHARED = "shared"  # writable, shared between guests that all say shared
    #: read-only, for this guest alone (a cloud-init seed): labelled like a
    #: private disk (SELinux: the guest's own level), write stopped by DAC
    PRIVATE_RO = "private-ro"

    @property
    def read_only(self) -> bool:
        """The guest may only read it (RO and PRIVATE_RO)."""
        return self in (Access.RO, Access.PRIVATE_RO)


class ResourceKind(enum.StrEnum):
    KERNEL = "kernel"
    INITRD = "initrd"
    DISK = "disk"
    BACKING = "backing"  # a lower layer of a disk's backing chain
    CONSOLE_LOG = "console-log"
    RUN_DIR = "run-dir"  # the guest's private directory (UML's uml_dir)
    LAYER = "layer"  # an ephemeral disk's overlay, in the run directory (root's)
    CDROM = "cdrom"  # a read-only ISO image (qemu), from an image root
    SEED = "seed"  # the guest's cloud-init seed ISO, in the run directory (root's)


@dataclass(frozen=True)
class Resource:
    path: Path
    access: Access
    kind: ResourceKind
    relabel: bool = True


def layer_path(spec: GuestSpec, index: int, home: Path) -> Path:
    """Where disk ``index``'s ephemeral layer lives; ``home`` is the guest's
    home (``Registry.home``), inside its run directory
    (:mod:`svirt.images.layers` makes it)."""
    if spec.backend is Backend.UML:
        return home / f".disk{index}.cow"
    return home.parent / LAYERS_DIR / f"disk{index}.qcow2"


def seed_path(home: Path) -> Path:
    """Where a guest's cloud-init seed lives (root's run directory around
    ``home``; :mod:`svirt.images.seed` writes it, the storage mount takes it
    away at release)."""
    return home.parent / SEED_NAME


def uml_ubd_value(spec: GuestSpec, index: int, home: Path) -> str:
    """``COW,BASE`` for UML's ``ubdN=``: the COW file first, then its base."""
    return f"{layer_path(spec, index, home)},{spec.disks[index].path}"
