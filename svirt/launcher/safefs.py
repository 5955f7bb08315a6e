"""Root-side file operations below directories a guest can write.

After exec the hypervisor owns its home directory (UML's ``uml_dir``) and
everything in it, and may rename or replace any entry at any moment.  Root
therefore never names a path there: it walks one component at a time from a
directory fd it opened itself, each step ``O_NOFOLLOW`` and on the same
filesystem (the same guarantee as ``openat2(RESOLVE_BENEATH |
RESOLVE_NO_SYMLINKS | RESOLVE_NO_XDEV)``, without needing a kernel that has
it), and acts on the fd it got, never on the name again.
"""

from __future__ import annotations

import errno
import os
import stat

from svirt.errors import StateError


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


def remove_tree(parent_fd: int, name: str) -> None:
    """Remove ``name`` below ``parent_fd`` and everything in it, by fd only:
    symlinks are unlinked, never followed; mount points are not crossed."""
    try:
        st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(name, dir_fd=parent_fd)
        return
    fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                 dir_fd=parent_fd)
    try:
        if os.fstat(fd).st_dev != os.fstat(parent_fd).st_dev:
            raise StateError(f"{name} is a mount point; svirt does not remove below it")
        for _ in range(100):  # a guest process may still be adding entries
            entries = os.listdir(fd)
            if not entries:
                break
            for entry in entries:
                remove_tree(fd, entry)
    finally:
        os.close(fd)
    try:
        os.rmdir(name, dir_fd=parent_fd)
    except FileNotFoundError:
        pass
