"""Root-side file operations below directories a guest can write.

After exec the hypervisor owns its home directory (UML's ``uml_dir``) and
everything in it, and may rename or replace any entry at any moment.  Root
therefore never names a path there: it walks one component at a time from a
directory fd it opened itself, each step ``O_NOFOLLOW`` and on the same
filesystem (the same guarantee as ``openat2(RESOLVE_BENEATH |
RESOLVE_NO_SYMLINKS | RESOLVE_NO_XDEV)``, which is used where the kernel has
it), and acts on the fd it got, never on the name again.

What the guest built is also bounded in what it costs root to take it
apart: :func:`remove_tree` never recurses (a tree 100,000 directories deep
is no deeper for it than one), holds at most three fds of its own at any
time, reads a directory at most ``REMOVE_BATCH`` names at a time, and gives
up with a :class:`StateError` after ``REMOVE_MAX_ENTRIES`` entries (a guest
process that is still writing makes the tree endless: release keeps the
record and a later ``svirt gc`` retries).
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat

from svirt.errors import StateError

#: names read from one directory per listing (the memory a listing costs)
REMOVE_BATCH = 1024
#: entries one remove_tree call unlinks, moves or retries before it gives up
REMOVE_MAX_ENTRIES = 4_000_000
#: lookups of one name that a concurrent rename may spoil (openat2's EAGAIN)
OPEN_RETRIES = 64

# openat2(2) (Linux 5.6): one component, resolved beneath the dirfd, never
# through a symlink (magic links included) and never across a mount point
_SYS_OPENAT2 = 437  # the same number on every architecture's generic table
_RESOLVE = 0x01 | 0x02 | 0x04 | 0x08  # NO_XDEV | NO_MAGICLINKS | NO_SYMLINKS | BENEATH
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64),
                ("resolve", ctypes.c_uint64)]


_OPENAT2: list[bool] = []  # probed once: [True] when the kernel has openat2
_LIBC: list[ctypes.CDLL] = []


def _openat2(dirfd: int, name: str, flags: int) -> int:
    if not _LIBC:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.syscall.restype = ctypes.c_long
        _LIBC.append(libc)
    how = _OpenHow(flags, 0, _RESOLVE)
    fd: int = _LIBC[0].syscall(ctypes.c_long(_SYS_OPENAT2), ctypes.c_long(dirfd),
                               ctypes.c_char_p(os.fsencode(name)), ctypes.byref(how),
                               ctypes.c_size_t(ctypes.sizeof(how)))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), name)
    return fd


def open_dir(path: str, *, follow: bool = False) -> int:
    """An O_PATH fd of directory ``path`` (whose parents must be root's)."""
    flags = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW)
    return os.open(path, flags)


def open_beneath(dirfd: int, relpath: str, flags: int = os.O_PATH) -> int:
    """Open ``relpath`` below ``dirfd`` without following a symlink or leaving
    the filesystem; raises OSError (ELOOP for a symlink, EXDEV for a mount)."""
    parts = [p for p in relpath.split("/") if p]
    if not parts or any(p in (".", "..") for p in parts):
        raise OSError(errno.EINVAL, f"not a plain relative path: {relpath!r}")
    dev = os.fstat(dirfd).st_dev
    current = dirfd
    try:
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            step = (flags if last else os.O_PATH | os.O_DIRECTORY) | os.O_NOFOLLOW | os.O_CLOEXEC
            try:
                fd = os.open(part, step, dir_fd=current)
            except OSError as err:
                if err.errno in (errno.ENOTDIR, errno.ELOOP) and stat.S_ISLNK(
                        os.stat(part, dir_fd=current, follow_symlinks=False).st_mode):
                    raise OSError(errno.ELOOP, f"{part} is a symbolic link") from None
                raise
            st = os.fstat(fd)
            if stat.S_ISLNK(st.st_mode):
                os.close(fd)
                raise OSError(errno.ELOOP, f"{relpath}: {part} is a symbolic link")
            if st.st_dev != dev:
                os.close(fd)
                raise OSError(errno.EXDEV, f"{relpath}: {part} is on another filesystem")
            if current != dirfd:
                os.close(current)
            current = fd
        return current
    except BaseException:
        if current != dirfd:
            os.close(current)
        raise


def open_child_dir(dirfd: int, name: str) -> int:
    """A readable fd of directory ``name``, a plain name directly below
    ``dirfd``: never through a symlink, never across a mount point (bind
    mounts included where the kernel has openat2).  OSError otherwise:
    ELOOP (a symlink), ENOTDIR (not a directory), EXDEV (a mount point),
    ENOENT (gone)."""
    if not name or "/" in name or name in (".", ".."):
        raise OSError(errno.EINVAL, f"not a plain name: {name!r}")
    if not _OPENAT2:
        try:
            os.close(_openat2(dirfd, ".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC))
            _OPENAT2.append(True)
        except OSError as err:
            # ENOSYS: an older kernel; EPERM: a seccomp filter that hides it
            _OPENAT2.append(err.errno not in (errno.ENOSYS, errno.EPERM))
    if _OPENAT2[0]:
        for _ in range(OPEN_RETRIES):
            try:
                return _openat2(dirfd, name, _DIR_FLAGS)
            except OSError as err:
                if err.errno not in (errno.EAGAIN, errno.EINTR):  # EAGAIN: a rename raced
                    raise
        raise OSError(errno.EAGAIN, f"{name}: renamed under every lookup", name)
    fd = os.open(name, _DIR_FLAGS, dir_fd=dirfd)
    if (os.fstat(fd).st_dev != os.fstat(dirfd).st_dev
            or _mount_id(fd) != _mount_id(dirfd)):  # a bind mount has the same st_dev
        os.close(fd)
        raise OSError(errno.EXDEV, f"{name} is a mount point", name)
    return fd


def _mount_id(fd: int) -> str | None:
    """The mount an fd is on (``mnt_id`` of /proc/self/fdinfo; None where
    the kernel does not say)."""
    try:
        with open(f"/proc/self/fdinfo/{fd}", "rb") as f:
            for line in f:
                if line.startswith(b"mnt_id:"):
                    return line.split()[1].decode()
    except OSError:
        pass
    return None


def _names(dirfd: int, limit: int) -> list[str]:
    """Up to ``limit`` entry names of directory ``dirfd``, from its start (the
    listing holds one more fd, a duplicate, while it runs)."""
    os.lseek(dirfd, 0, os.SEEK_SET)
    out: list[str] = []
    with os.scandir(dirfd) as it:
        for entry in it:
            out.append(entry.name)
            if len(out) >= limit:
                break
    return out


class _Walk:
    """One :func:`remove_tree` call: its top directory, its budget, the
    names it gives what it moves up."""

    def __init__(self, top: int, what: str, limit: int) -> None:
        self.top = top
        self.what = what
        self.limit = limit
        self.left = limit
        self.removed = 0
        self._prefix = f".svirt-rm.{os.urandom(6).hex()}."  # names nobody can predict
        self._next = 0

    def spend(self) -> None:
        self.left -= 1
        if self.left < 0:
            raise StateError(
                f"{self.what}: not empty after {self.limit} entries were handled; a "
                "process may still be writing to it",
                hint="svirt gc retries once the guest's processes are gone")

    def fresh(self) -> str:
        self._next += 1
        return f"{self._prefix}{self._next}"

    def mount_point(self, name: str) -> StateError:
        return StateError(f"{self.what}: {name} is a mount point; svirt does not remove "
                          "below it", hint="unmount it, then run svirt gc")


def remove_tree(parent_fd: int, name: str, *, max_entries: int = REMOVE_MAX_ENTRIES) -> int:
    """Remove ``name`` below ``parent_fd`` and everything in it, by fd only:
    symlinks are unlinked, never followed; mount points are not crossed
    (StateError).  Returns how many entries it removed.

    Iterative, with bounded depth and fds: ``name`` is opened once (the
    top); each directory in the top is made root's and 0700 (a guest
    process that still runs can add nothing more to it), emptied through
    its own fd (its files unlinked, its subdirectories renamed up into the
    top), then removed.  The walk is never deeper than one level below the top
    however deep the guest nested its tree, and a guest that renames,
    swaps or adds entries meanwhile only moves work around: whatever is in
    the top is removed, whatever name it has.  Every entry handled counts
    against ``max_entries``; past it, StateError (a writer that never
    stops makes the tree endless)."""
    if not name or "/" in name or name in (".", ".."):
        raise StateError(f"not a plain name to remove: {name!r}")
    walk = _Walk(-1, name, max_entries)
    while True:
        walk.spend()
        try:
            os.unlink(name, dir_fd=parent_fd)
            return walk.removed + 1
        except FileNotFoundError:
            return walk.removed
        except IsADirectoryError:
            pass
        try:
            walk.top = open_child_dir(parent_fd, name)
        except FileNotFoundError:
            return walk.removed
        except OSError as err:
            if err.errno in (errno.ENOTDIR, errno.ELOOP):
                continue  # replaced by a file or a symlink meanwhile: unlink that
            if err.errno == errno.EXDEV:
                raise StateError(f"{name} is a mount point; svirt does not remove below it",
                                 hint="unmount it, then run svirt gc") from None
            raise
        try:
            _fence(walk.top)
            _empty(walk)
        finally:
            os.close(walk.top)
            walk.top = -1
        try:
            os.rmdir(name, dir_fd=parent_fd)
            return walk.removed + 1
        except FileNotFoundError:
            return walk.removed
        except OSError as err:
            if err.errno == errno.EBUSY:
                raise StateError(f"{name} is a mount point; svirt does not remove below it",
                                 hint="unmount it, then run svirt gc") from None
            if err.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
                raise
            # a new entry arrived, or the name is something else now: again


def _empty(walk: _Walk) -> None:
    """Remove everything in the top directory."""
    while True:
        pending = _names(walk.top, REMOVE_BATCH)
        if not pending:
            return
        pending.reverse()
        while pending:
            walk.spend()
            moved = _clear(walk, pending.pop())
            # depth first: what was just moved up goes next (a deep chain is
            # one listing of the top); past a batch, the next listing has it
            pending.extend(moved[: max(0, REMOVE_BATCH - len(pending))])


def _clear(walk: _Walk, name: str) -> list[str]:
    """Remove entry ``name`` of the top: a non-directory is unlinked; a
    directory is emptied (subdirectories renamed up into the top, whose new
    names are returned) and removed.  What cannot be finished now (a guest
    that swapped or refilled it) stays in the top for its next listing."""
    try:
        os.unlink(name, dir_fd=walk.top)
        walk.removed += 1
        return []
    except FileNotFoundError:
        return []
    except IsADirectoryError:
        pass
    try:
        fd = open_child_dir(walk.top, name)
    except FileNotFoundError:
        return []
    except OSError as err:
        if err.errno in (errno.ENOTDIR, errno.ELOOP):
            return []  # swapped for a file or a symlink: the next listing has it
        if err.errno == errno.EXDEV:
            raise walk.mount_point(name) from None
        raise
    moved: list[str] = []
    try:
        _fence(fd)
        while children := _names(fd, REMOVE_BATCH):
            for child in children:
                walk.spend()
                try:
                    os.unlink(child, dir_fd=fd)
                    walk.removed += 1
                    continue
                except FileNotFoundError:
                    continue
                except IsADirectoryError:
                    pass
                new = _move_up(walk, fd, child)
                if new is None:
                    return moved  # the top is full of links: empty it first
                if new and len(moved) < REMOVE_BATCH:
                    moved.append(new)
    finally:
        os.close(fd)
    try:
        os.rmdir(name, dir_fd=walk.top)
        walk.removed += 1
    except FileNotFoundError:
        pass
    except OSError as err:
        if err.errno == errno.EBUSY:
            raise walk.mount_point(name) from None
        if err.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
            raise
    return moved


def _fence(fd: int) -> None:
    """Make directory ``fd`` root's, 0700, before it is emptied: a guest
    process still running can add nothing more to it (its owner first, so
    the guest can no longer change the mode in between; the mode also masks
    out any ACL entry that named the guest)."""
    try:
        os.fchown(fd, 0, 0)
        os.fchmod(fd, 0o700)
    except PermissionError:
        pass  # not root (a test, or a user's own tree): nothing to fence against


def _move_up(walk: _Walk, dirfd: int, child: str) -> str | None:
    """Rename directory ``child`` of ``dirfd`` into the top under a fresh
    name; that name ("" when the child is gone, None when the top can take
    no more subdirectories)."""
    for _ in range(8):
        new = walk.fresh()
        try:
            os.rename(child, new, src_dir_fd=dirfd, dst_dir_fd=walk.top)
            return new
        except FileNotFoundError:
            return ""
        except OSError as err:
            if err.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
                continue  # the new name is taken: another
            if err.errno == errno.EMLINK:
                return None
            if err.errno in (errno.EXDEV, errno.EBUSY):
                raise walk.mount_point(child) from None
            raise
    raise StateError(f"{walk.what}: no free name to move {child!r} to")
