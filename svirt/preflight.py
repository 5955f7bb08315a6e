"""Preflight: can this host run this spec?  Checked before anything is reserved.

Parsing a spec (:mod:`svirt.spec`) never looks at the host.  This module
does, for ``svirt check`` and at the start of every launch: the kernel,
initrd, disks and backing files exist and are regular files or block
devices (an ephemeral disk's base a regular file), no disk is listed twice
under another name, the console log's directory exists, the memory fits in
this host's RAM; then the backend's own preflight (binaries, KVM, devices).

Errors are :class:`SpecError` (the spec names something this host does not
have; ``svirt`` exits 2) keyed by the field, e.g. ``disk[0].path``, or the
backend's :class:`HostError`.  They pass a first look only: the launcher
opens every object again by its root walk (svirt/security/files.py) and
trusts only what it checked on the fd.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from svirt.backends import get_backend
from svirt.backends.base import Backend
from svirt.errors import SpecError
from svirt.host import HostInfo, host_memory_mib
from svirt.spec import Accel, GuestSpec, os_reason, show_path, show_value

__all__ = ["check_files", "check_memory", "check_spec", "preflight"]


def _stat(key: str, path: Path) -> os.stat_result:
    try:
        return path.stat()
    except FileNotFoundError:
        raise SpecError(f"{show_path(path)} does not exist", key=key) from None
    except OSError as err:  # EACCES, ENAMETOOLONG, ELOOP, ENOTDIR, EIO...
        raise SpecError(f"{show_path(path)}: {os_reason(err)}", key=key) from None
    except ValueError:  # odd bytes the file system encoding cannot take
        raise SpecError(f"{show_path(path)} is not a valid file name", key=key) from None


def _regular_file(key: str, path: Path) -> os.stat_result:
    st = _stat(key, path)
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
        raise SpecError(f"{show_path(path)} is not a regular file or block device", key=key)
    return st


def _directory_of(key: str, path: Path) -> None:
    parent = path.parent
    try:
        is_dir = stat.S_ISDIR(parent.stat().st_mode)
    except FileNotFoundError:
        is_dir = False
    except OSError as err:
        raise SpecError(f"{show_path(parent)}: {os_reason(err)}", key=key) from None
    except ValueError:
        raise SpecError(f"{show_path(parent)} is not a valid file name", key=key) from None
    if not is_dir:
        raise SpecError(f"directory {show_path(parent)} does not exist", key=key)


def check_files(spec: GuestSpec) -> None:
    """Every file the spec names is there and of the right kind."""
    if spec.kernel is not None:
        _regular_file("kernel", spec.kernel)
    if spec.initrd is not None:
        _regular_file("initrd", spec.initrd)
    seen: dict[tuple[int, int], Path] = {}
    for i, disk in enumerate(spec.disks):
        key = f"disk[{i}].path"
        st = _regular_file(key, disk.path)
        if disk.ephemeral and not stat.S_ISREG(st.st_mode):
            raise SpecError(f"{show_path(disk.path)}: the base of an ephemeral disk must be a "
                            "regular file", key=key,
                            hint="copy the device into an image file first")
        for j, layer in enumerate(disk.backing):
            _regular_file(f"disk[{i}].backing[{j}].path", layer.path)
        inode = (st.st_dev, st.st_ino)
        if inode in seen:
            raise SpecError(f"{show_path(disk.path)} is listed twice "
                            f"(also as {show_path(seen[inode])})", key=key)
        seen[inode] = disk.path
    for i, cd in enumerate(spec.cdroms):
        _regular_file(f"cdrom[{i}].path", cd.path)
    if spec.nvram is not None:  # made from the template when it is not there yet
        _directory_of("nvram", spec.nvram)
    if spec.console.log is not None:
        _directory_of("console.log", spec.console.log)


def check_memory(spec: GuestSpec, host_mib: int | None = None) -> None:
    """The guest's memory fits in the host's RAM (``host_mib``, else this host's)."""
    host = host_memory_mib() if host_mib is None else host_mib
    if spec.memory > host:
        raise SpecError(f"{show_value(spec.memory)} MiB is more than this host's {host} MiB",
                        key="memory")


def check_spec(spec: GuestSpec) -> None:
    """What the spec asks of this host that parsing did not look at."""
    check_files(spec)
    check_memory(spec)


def preflight(spec: GuestSpec, host: HostInfo) -> tuple[Backend, Accel]:
    """:func:`check_spec`, then the backend's preflight: (backend, resolved accel)."""
    check_spec(spec)
    backend = get_backend(spec.backend)
    return backend, backend.preflight(spec, host)
