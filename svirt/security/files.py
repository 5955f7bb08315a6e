"""Safe relabelling: objects are opened by fd and labelled through the fd.

:func:`open_object` opens with ``O_PATH | O_NOFOLLOW`` and refuses what must
never be relabelled: a symlink as the final component, a regular file with
more than one hard link (a link to /etc/shadow in an image directory would
otherwise be relabelled), anything under a deny-listed tree, and anything
outside the configured image roots.  Drivers then change the inode through
``/proc/self/fd/N``, which names exactly the inode that was checked: a path
swapped after the check is not followed.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from svirt.errors import RelabelRefused

DENIED_TREES = ("/etc", "/usr", "/boot", "/proc", "/sys", "/dev")


@dataclass(frozen=True)
class OpenedObject:
    fd: int
    path: Path  # as the kernel resolved it
    st_mode: int
    key: str  # "dev-ino": identity of the inode

    def close(self) -> None:
        os.close(self.fd)


def proc_fd(fd: int) -> str:
    return f"/proc/self/fd/{fd}"


def object_key(st: os.stat_result) -> str:
    return f"{st.st_dev}-{st.st_ino}"


def _under(path: Path, tree: Path) -> bool:
    return path == tree or tree in path.parents


def check_location(real: Path, roots: tuple[Path, ...], allowed_devices: tuple[Path, ...]) -> None:
    for tree in DENIED_TREES:
        if _under(real, Path(tree)) and real not in allowed_devices:
            raise RelabelRefused(
                f"{real} is under {tree}, which svirt never relabels",
                path=real,
                hint="copy the file to an image directory (e.g. /var/lib/svirt/images)",
            )
    if roots and not any(_under(real, r) for r in roots):
        raise RelabelRefused(
            f"{real} is outside the image roots ({', '.join(map(str, roots))})",
            path=real,
            hint="move it under an image root or add its directory to security.image_roots",
        )


def open_object(
    path: Path,
    *,
    roots: tuple[Path, ...] = (),
    allowed_devices: tuple[Path, ...] = (),
) -> OpenedObject:
    """Open ``path`` for relabelling, or raise RelabelRefused saying why not."""
    try:
        fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise RelabelRefused(f"{path} does not exist", path=path) from None
    except OSError as err:
        raise RelabelRefused(f"{path}: {err.strerror}", path=path) from err
    try:
        st = os.fstat(fd)
        real = Path(os.readlink(proc_fd(fd)))
        check_location(real, roots, allowed_devices)
        if stat.S_ISLNK(st.st_mode):
            raise RelabelRefused(
                f"{path} is a symbolic link; svirt labels only the object itself",
                path=path,
                hint="name the target file in the spec instead of the link",
            )
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode) or stat.S_ISBLK(st.st_mode)):
            raise RelabelRefused(f"{path} is not a regular file, directory or block device",
                                 path=path)
        if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
            raise RelabelRefused(
                f"{path} has {st.st_nlink} hard links; relabelling it would relabel the others",
                path=path,
                hint="copy the file (cp --reflink=auto) so it has a single link",
            )
        return OpenedObject(fd, real, st.st_mode, object_key(st))
    except BaseException:
        os.close(fd)
        raise


def reopen(path: Path, key: str) -> OpenedObject | None:
    """Open ``path`` again for restore; None when it is gone or was replaced."""
    try:
        fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    st = os.fstat(fd)
    if object_key(st) != key or stat.S_ISLNK(st.st_mode):
        os.close(fd)
        return None
    return OpenedObject(fd, path, st.st_mode, key)


def get_xattr(fd: int, name: str) -> bytes | None:
    try:
        return os.getxattr(proc_fd(fd), name)
    except OSError as err:
        if err.errno in (61, 95):  # ENODATA, EOPNOTSUPP
            return None
        raise


def set_xattr(fd: int, name: str, value: bytes | None) -> None:
    """Set (or, with None, remove) an xattr on the inode behind ``fd``."""
    if value is None:
        try:
            os.removexattr(proc_fd(fd), name)
        except OSError as err:
            if err.errno != 61:  # ENODATA: already absent
                raise
        return
    os.setxattr(proc_fd(fd), name, value)
