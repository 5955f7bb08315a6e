"""Which inode an object is: a key that a recreated file does not share.

The registry keeps an object's originals under its key; restore gives them
back only to the same inode (:func:`same_object`), never to a file that took
its place under a reused inode number.
"""

from __future__ import annotations

import ctypes
import os
import re
import stat

_libc = ctypes.CDLL(None, use_errno=True)


def proc_fd(fd: int) -> str:
    return f"/proc/self/fd/{fd}"


#: every key :func:`object_key` makes (and older svirt made: ``-gGEN`` and
#: ``-bSEC.NSEC`` together); the registry checks a journal's keys with it
OBJECT_KEY = re.compile(r"[0-9]+-[0-9]+(-g[0-9]+)?(-b-?[0-9]+\.[0-9]{9})?")


def object_key(st: os.stat_result, fd: int | None = None) -> str:
    """The identity of the inode behind ``fd`` (``st`` is its fstat):
    ``DEV-INO``, plus ``-bSEC.NSEC`` (its birth time, ``statx``) where the
    file system has one (ext4 with 256-byte inodes, XFS v5, btrfs, tmpfs),
    else ``-gGEN`` (the inode generation, ``FS_IOC_GETVERSION``) where it
    has that (ext4 with 128-byte inodes, XFS v4).  An inode number is
    reused once its file is deleted; a birth time or generation is not, so
    a file recreated under an old number is another object (restore leaves
    it alone).  The birth time comes first: nobody sets it, while the
    file's owner may set the generation (ext4 ``FS_IOC_SETVERSION``, where
    metadata_csum is off), and a guest owns its writable disk while it
    runs.  A guest that changes it makes its file "not the object held";
    release's second net then finds the inode still carrying the guest's
    uid and keeps the record restore-failed (state.py), so it gains
    nothing.  Only ``DEV-INO`` where the file system has neither (NFS)."""
    key = f"{st.st_dev}-{st.st_ino}"
    if fd is None:
        return key
    born = birth_time(fd)
    if born is not None:
        return key + f"-b{born[0]}.{born[1]:09d}"
    generation = inode_generation(fd, st)
    if generation is not None:
        key += f"-g{generation}"
    return key


def same_object(key: str, st: os.stat_result, fd: int) -> bool:
    """Whether ``fd`` is the object ``key`` was taken from: the same
    ``DEV-INO`` and, where the key has one, the same birth time; a key
    without a birth time compares its ``-gGEN`` part when the file system
    keeps no birth time (keys of older svirt carried both: there the birth
    time alone counts)."""
    head, _, born_part = key.partition("-b")
    dev_ino, _, generation = head.partition("-g")
    if dev_ino != object_key(st):
        return False
    born = birth_time(fd)
    if born_part:
        return born is not None and f"{born[0]}.{born[1]:09d}" == born_part
    if generation and born is None:
        return str(inode_generation(fd, st)) == generation
    return True


#: _IOR('v', 1, long): ext4, XFS, btrfs and others; tmpfs and NFS have none
FS_IOC_GETVERSION = 0x80087601


def inode_generation(fd: int, st: os.stat_result) -> int | None:
    """The inode's generation, or None when its file system has none.  An
    ``O_PATH`` fd cannot take an ioctl, so regular files and directories are
    opened again read-only through it (never a device or a FIFO: opening one
    has effects of its own)."""
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
        return None
    import fcntl

    try:
        rfd = os.open(proc_fd(fd), os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if not os.path.samestat(os.fstat(rfd), st):
            return None
        buf = fcntl.ioctl(rfd, FS_IOC_GETVERSION, b"\0" * 8)
    except OSError:
        return None
    finally:
        os.close(rfd)
    return int.from_bytes(buf[:4], "little")  # the kernel writes an int


AT_EMPTY_PATH = 0x1000
STATX_BTIME = 0x800
_STATX_SIZE = 256
_STATX_BTIME_AT = 80  # struct statx: stx_btime {s64 tv_sec; u32 tv_nsec; s32}


def birth_time(fd: int) -> tuple[int, int] | None:
    """(seconds, nanoseconds) the inode was created, or None when the file
    system does not say (``statx(fd, "", AT_EMPTY_PATH, STATX_BTIME)``)."""
    statx = getattr(_libc, "statx", None)
    if statx is None:
        return None
    buf = ctypes.create_string_buffer(_STATX_SIZE)
    if statx(ctypes.c_int(fd), ctypes.c_char_p(b""), ctypes.c_int(AT_EMPTY_PATH),
             ctypes.c_uint(STATX_BTIME), buf) != 0:
        return None
    raw = buf.raw
    if not int.from_bytes(raw[0:4], "little") & STATX_BTIME:
        return None
    seconds = int.from_bytes(raw[_STATX_BTIME_AT:_STATX_BTIME_AT + 8], "little", signed=True)
    nanos = int.from_bytes(raw[_STATX_BTIME_AT + 8:_STATX_BTIME_AT + 12], "little")
    return seconds, nanos
