"""Bounds on what a guest makes the host write: its console log and its disk files.

**The console log** of ``svirt run`` (``[console] log = PATH``) is written by
the supervisor through one fd (the hypervisor never holds it).
:class:`CappedLog` keeps it at most ``console_log_max_mib`` (host config,
default 64 MiB): a write that would take the file past the cap first
truncates it and starts again with a marker line that says how much was
dropped (the newest output is kept, between 0 and the cap; no second file,
no path is walked again, the fd is never closed and reopened).  A write
that fails (ENOSPC on the log's file system, EDQUOT, EFBIG, EIO) drops that
output and counts it; at the next write that succeeds, one line says how
many bytes were lost and why.  A regular file's write never waits for
space, so a full disk never stalls the console pump.  Detached guests'
logs are rotated by :mod:`svirt.service.logs` instead.

**Disk files**: a writable disk image is the guest's own file on an image
root (often the state disk).  A hostile hypervisor may write past its
virtual size (a raw file at any offset, a qcow2 header's tables pointing
far out).  The child sets ``RLIMIT_FSIZE`` (soft and hard: the guest cannot
raise it; :func:`svirt.launcher.child.spawn`) to :func:`file_size_limit`:
the largest bound of any file the hypervisor legitimately writes:

- each writable file disk (private or shared), read through the fd the
  root walk checked: a raw file's size (a raw disk never grows); a qcow2's
  virtual size plus the layer allowance of
  :func:`svirt.launcher.storage.layer_bound` (1/256 and 1 MiB, for its
  L1/L2 and refcount tables), or the file's size now if larger (internal
  snapshots), so nothing already written is cut off.  The virtual size is
  the smaller of the header's size field and the one svirt remembered the
  first time it saw the file, in its ``trusted.svirt.virtual_size`` xattr
  (:func:`remembered_virtual_size`): the guest writes the header while it
  runs, and a size it forged there would otherwise lift the next run's
  bound to anything; the trusted namespace is root's alone (CAP_SYS_ADMIN),
  so the owner can neither change nor remove it, and it follows the inode
  (a new file is measured anew).  After growing a disk by hand
  (``qemu-img resize``) set it to the new size, or remove it:
  ``setfattr -x trusted.svirt.virtual_size FILE``.  A file system without
  trusted xattrs (NFS) falls back to the header;
- each ephemeral layer (QEMU's overlay, UML's COW file): the same bound of
  its base;
- the guest's RAM + 64 MiB, for files the hypervisor sizes from its memory
  (a memfd is bounded too); for UML + 1 GiB more: UML keeps RAM in a
  sparse file in /dev/shm whose size is ``mem=`` plus the "exec-shield
  gap" between its binary's end and its randomised heap start (UML adds
  it to physical memory when over 1 MiB), which the kernel draws from a
  1 GiB range on x86_64 (``arch_randomize_brk``, 32 MiB before Linux 6.9;
  302 MB seen here).

Block devices are not bounded by ``RLIMIT_FSIZE`` (the kernel does not
apply it to them) and do not count.  The limit is per process, not per
file: a smaller disk may grow to the largest one's bound.  A write past the
limit fails with EFBIG: the child ignores SIGXFSZ (an ignored signal stays
ignored across exec), so the hypervisor is not killed for it; QEMU and UML
report the failed write to the guest as an I/O error.  A hypervisor that
re-enables SIGXFSZ is killed by it instead; either way the file stays
under the limit.  Nothing else the hypervisor writes is a file: its console
and control channels are sockets and FIFOs the launcher owns.
"""

from __future__ import annotations

import errno
import os
import stat
import struct
from pathlib import Path

from svirt.spec import DiskFormat, GuestSpec

MIB = 1024 * 1024
#: beyond the guest's RAM, for files sized from it (UML's memory file)
MEMORY_FILE_SLACK = 64 * MIB
#: UML's memory file also holds the gap up to its randomised heap start
#: (x86_64's brk randomisation range)
UML_BRK_GAP = 1024 * MIB
#: a writable qcow2's virtual size as svirt first saw it (root's: the
#: trusted namespace needs CAP_SYS_ADMIN, so the guest that owns the file
#: can neither set nor remove it)
VIRTUAL_SIZE_XATTR = "trusted.svirt.virtual_size"
MARKER = b"\n[svirt: console log reached its cap of %d bytes: %d earlier bytes dropped]\n"
LOST = b"\n[svirt: %d bytes of console output lost: %s on the log's file system]\n"


class CappedLog:
    """Append to a console log, never past ``max_bytes``; failures drop and count.

    Not thread-safe: one pump writes.  ``close`` is idempotent and forgets
    the fd number at once, so a later write never reaches whatever reuses it."""

    def __init__(self, fd: int, max_bytes: int) -> None:
        self._fd = fd
        self.max_bytes = max_bytes
        self.truncated = 0  # bytes dropped by the cap
        self.lost = 0  # bytes a failed write dropped
        self._lost_why = ""

    def write(self, data: bytes) -> None:
        if self._fd < 0 or not data:
            return
        if self.lost and not self._put(LOST % (self.lost, self._lost_why.encode())):
            self.lost += len(data)
            return
        self.lost = 0
        if not self._put(data):
            self.lost += len(data)

    def _put(self, data: bytes) -> bool:
        """All of ``data`` under the cap, or False (``_lost_why`` says why)."""
        try:
            size = os.fstat(self._fd).st_size  # the kernel's: anyone's appends count
            if size + len(data) > self.max_bytes:
                data = data[-(self.max_bytes // 2):]  # a flood larger than the cap
                os.ftruncate(self._fd, 0)
                self.truncated += size
                data = (MARKER % (self.max_bytes, self.truncated))[:self.max_bytes // 4] + data
            view = memoryview(data)
            while view:
                n = os.write(self._fd, view)  # O_APPEND: at the end, after a truncate at 0
                if n <= 0:
                    raise OSError(errno.EIO, "a write took nothing")
                view = view[n:]
        except OSError as err:
            self._lost_why = errno.errorcode.get(err.errno or 0, "an error")
            return False
        return True

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)


def console_log_cap() -> int:
    """Bytes a ``svirt run`` console log may hold (host config ``console_log_max_mib``)."""
    import svirt.config as config

    return config.load().console_log_max_mib * MIB


def file_size_limit(spec: GuestSpec, roots: tuple[Path, ...],
                    layer_sizes: dict[int, int]) -> int:
    """``RLIMIT_FSIZE`` for the hypervisor (see the module's docstring).
    ``layer_sizes``: the ephemeral disks' base sizes, by disk index."""
    from svirt.launcher.storage import layer_bound
    from svirt.resources import Access, Resource, ResourceKind
    from svirt.security.files import open_resource

    gap = UML_BRK_GAP if spec.backend == "uml" else 0
    bounds = [spec.memory * MIB + MEMORY_FILE_SLACK + gap]
    bounds += [layer_bound(size) for size in layer_sizes.values()]
    for disk in spec.disks:
        if disk.ephemeral or disk.readonly:
            continue
        opened = open_resource(Resource(disk.path, Access.RW, ResourceKind.DISK), roots)
        try:
            bounds.append(disk_bound(opened.fd, disk.format))
        finally:
            opened.close()
    return max(bounds)


def disk_bound(path_fd: int, fmt: DiskFormat) -> int:
    """The most bytes a writable disk file legitimately reaches, read through
    the checked ``O_PATH`` fd (the same inode, reopened read-only through
    /proc): a raw file's size; a qcow2's virtual size plus the layer
    allowance, or its size now if larger (internal snapshots); 0 for a
    block device (not bounded by RLIMIT_FSIZE)."""
    from svirt.launcher.storage import layer_bound

    st = os.fstat(path_fd)
    if not stat.S_ISREG(st.st_mode):
        return 0
    if fmt is DiskFormat.RAW:
        return st.st_size
    fd = os.open(f"/proc/self/fd/{path_fd}", os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        header = os.pread(fd, 32, 0)
        if len(header) < 32 or header[:4] != b"QFI\xfb":
            return st.st_size  # QEMU refuses it at open: the file as it is
        (size,) = struct.unpack_from(">Q", header, 24)
        size = remembered_virtual_size(fd, int(size))
    finally:
        os.close(fd)
    return max(layer_bound(size), st.st_size)


def remembered_virtual_size(fd: int, header_size: int) -> int:
    """The qcow2 virtual size to bound a writable disk by: the smaller of
    its header's (``header_size``: the guest writes the header while it
    runs) and the one svirt remembered in the file's
    :data:`VIRTUAL_SIZE_XATTR` the first time it saw it, which it writes
    now if there is none.  Where the file system keeps no trusted xattrs
    (NFS), the header's."""
    try:
        raw = os.getxattr(fd, VIRTUAL_SIZE_XATTR)
    except OSError as err:
        if err.errno not in (errno.ENODATA, errno.EOPNOTSUPP):
            raise
        raw = None
    if raw is not None and raw.isdigit() and len(raw) <= 20:
        return min(int(raw), header_size)
    try:
        os.setxattr(fd, VIRTUAL_SIZE_XATTR, str(header_size).encode())
    except OSError as err:
        if err.errno not in (errno.EOPNOTSUPP, errno.EPERM, errno.EROFS, errno.ENOSPC,
                             errno.EDQUOT):
            raise
    return header_size
