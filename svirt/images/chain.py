"""Backing chains: declared in the spec, checked against the image headers.

A qcow2 header is guest-writable: a guest that owns its disk can name any
host file as its backing store (and, with no recorded format, have its format
probed: CVE-2010-2237).  So the chain is never read from the header.  The
spec names every lower layer with its format (``Disk.backing``); at every
start :func:`check_chain` reads each qcow2 header of the chain (as data, with
limits) and refuses the launch unless the backing file and format it
records are exactly the declared next layer.  The resources are the declared
layers: a header cannot add one.

Every header is read through the fd the root walk checked
(:func:`~svirt.security.files.open_object`: no symlink, no mount crossing, a
regular file or a block device under ``block_device_roots``), never by
path: a FIFO or a device planted as a layer is refused without being opened,
so it cannot hang ``svirt check`` or a launch.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

from svirt.errors import RelabelRefused, SecurityError
from svirt.resources import Access, Resource, ResourceKind
from svirt.security.files import Roots, launch_roots, open_object
from svirt.security.inodes import proc_fd
from svirt.spec import Disk, DiskFormat

QCOW2_MAGIC = b"QFI\xfb"
BACKING_FORMAT_EXT = 0xE2792ACA
MAX_BACKING_NAME = 1023  # QEMU's own limit
HEADER_READ = 64 * 1024  # the header and its extensions live in the first cluster
_V2_HEADER = 72


def read_qcow2_backing(data: bytes, name_at: bytes | None = None
                       ) -> tuple[str | None, str | None]:
    """(backing file name, backing format) recorded in a qcow2 header.

    ``data`` is the start of the image; the name is read from it when it lies
    within (``name_at`` overrides, for tests).  Anything malformed is a
    SecurityError: the header is what a guest wrote.
    """
    if len(data) < _V2_HEADER or data[:4] != QCOW2_MAGIC:
        raise SecurityError("not a qcow2 image (bad magic)")
    version, offset, size = struct.unpack_from(">IQI", data, 4)
    if version not in (2, 3):
        raise SecurityError(f"unknown qcow2 version {version}")
    if offset == 0 or size == 0:
        return None, None
    if size > MAX_BACKING_NAME:
        raise SecurityError(f"backing file name of {size} bytes (at most {MAX_BACKING_NAME})")
    raw = name_at if name_at is not None else data[offset:offset + size]
    if len(raw) != size:
        raise SecurityError("backing file name lies outside the header")
    try:
        name = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise SecurityError("backing file name is not UTF-8") from None
    header_length = _V2_HEADER
    if version == 3:
        if len(data) < 104:
            raise SecurityError("truncated qcow2 v3 header")
        (header_length,) = struct.unpack_from(">I", data, 100)
        if header_length < 104 or header_length > len(data):
            raise SecurityError(f"qcow2 header length {header_length} is out of range")
    fmt = None
    pos = header_length
    for _ in range(256):  # bounded: the extensions of a hostile header
        if pos + 8 > len(data) or pos + 8 > offset:
            break
        ext_type, ext_len = struct.unpack_from(">II", data, pos)
        if ext_type == 0:
            break
        body = data[pos + 8:pos + 8 + ext_len]
        if len(body) != ext_len:
            raise SecurityError("truncated qcow2 header extension")
        if ext_type == BACKING_FORMAT_EXT:
            fmt = body.decode("ascii", errors="replace")
        pos += 8 + (ext_len + 7) // 8 * 8
    return name, fmt


def _read_header(path: Path, roots: tuple[Path, ...] = ()) -> bytes:
    """The first :data:`HEADER_READ` bytes of ``path``, walked from its root
    (``roots``: a launch's :class:`~svirt.security.files.Roots` as they are,
    or a spec's image roots narrowing the host's; ``()``: the host's) and
    read through the checked inode."""
    r = roots if isinstance(roots, Roots) else launch_roots(roots)
    obj = open_object(path, roots=tuple(r), block_roots=r.block_devices)
    try:
        # O_PATH fds cannot be read: open the checked inode itself (a regular
        # file or a block device: open_object refused anything else)
        fd = os.open(proc_fd(obj.fd), os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    finally:
        obj.close()
    try:
        return os.pread(fd, HEADER_READ, 0)
    finally:
        os.close(fd)


def _resolve(name: str, image: Path) -> Path:
    """QEMU resolves a relative backing name against the image's directory."""
    p = Path(name)
    return Path(os.path.normpath(p if p.is_absolute() else image.parent / p))


def check_chain(disk: Disk, roots: tuple[Path, ...] = ()) -> None:
    """Refuse unless every header in the chain names exactly the declared
    layers (each walked from ``roots``: see :func:`_read_header`)."""
    layers = [(disk.path, disk.format), *((b.path, b.format) for b in disk.backing)]
    for i, (path, fmt) in enumerate(layers):
        declared = layers[i + 1] if i + 1 < len(layers) else None
        if fmt is not DiskFormat.QCOW2:
            continue  # a raw image records nothing
        try:
            name, recorded = read_qcow2_backing(_read_header(path, roots))
        except OSError as err:
            raise SecurityError(f"{path}: cannot read its header: {err.strerror}",
                                path=path) from err
        except RelabelRefused:
            raise  # the walk's refusal names the path itself
        except SecurityError as err:
            raise SecurityError(f"{path}: {err.message}", path=path) from None
        if name is None and declared is None:
            continue
        if declared is None:
            raise SecurityError(
                f"{path}: its header names backing file {name!r} "
                f"({recorded or 'no format'}), but the spec declares none",
                path=path,
                hint="declare it under the disk: backing = [{path = ..., format = ...}] "
                     "(or the guest rewrote the header: restore the image)",
            )
        if name is None:
            raise SecurityError(
                f"{path}: the spec declares backing file {declared[0]} but the image "
                "header names none", path=path)
        if name.startswith(("json:", "file:")) or _resolve(name, path) != declared[0] \
                or recorded != str(declared[1]):
            raise SecurityError(
                f"{path}: its header names backing file {name!r} "
                f"({recorded or 'no format'}); the spec declares {declared[0]} "
                f"({declared[1]})",
                path=path,
                hint="the header must match the spec exactly; a guest may have rewritten "
                     "it (qemu-img rebase -u -F FORMAT -b BACKING IMAGE to set it back)",
            )


def backing_chain(disk: Disk, roots: tuple[Path, ...] = ()) -> list[Path]:
    """The declared lower layers of ``disk`` (top first), after checking them."""
    check_chain(disk, roots)
    return [b.path for b in disk.backing]


def chain_resources(disks: tuple[Disk, ...], roots: tuple[Path, ...] = ()) -> list[Resource]:
    """Read-only resources for every declared lower layer of every disk."""
    out: list[Resource] = []
    for disk in disks:
        for layer in backing_chain(disk, roots):
            out.append(Resource(layer, Access.RO, ResourceKind.BACKING, relabel=disk.relabel))
    return out
