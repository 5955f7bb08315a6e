"""Safe relabelling: objects are opened from an allow-listed root, by fd.

Every object a guest gets (disk, kernel, initrd, backing file, console log) must
sit under a root of the host config (:mod:`svirt.config`; a spec's
``security.image_roots`` may only narrow them).  :func:`open_object` opens the
root's directory (``O_PATH | O_DIRECTORY``, no symlink anywhere on its path)
and walks from it with ``openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS |
RESOLVE_NO_XDEV | RESOLVE_NO_MAGICLINKS)``: a symlinked directory, a ``..``
out of the root or a (bind) mount below it ends the walk.  It then refuses
what must never be relabelled: a symlink as the final component, a regular
file with more than one hard link (a link to /etc/shadow in an image
directory would otherwise be relabelled), device nodes (character devices
always; block devices unless the object is a disk under a
``block_device_roots`` entry), FIFOs and sockets, and, as a second net,
anything whose real path is under a deny-listed tree or outside the root.
Drivers then change the inode through ``/proc/self/fd/N``, which names
exactly the inode that was checked: a path swapped after the check is not
followed.

:func:`open_log` opens a console log the same way for writing and pins its
inode in the launch's :class:`Roots`, so that the fd labelled later is the
file being written.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import svirt.config as config
from svirt.errors import HostError, RelabelRefused, SecurityError, SvirtError
from svirt.security.inodes import (
    object_key,
    proc_fd,
    same_object,
)

if TYPE_CHECKING:
    from svirt.resources import Resource

DENIED_TREES = config.DENIED_TREES

AT_FDCWD = -100
RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
#: how every object is reached from its root's directory fd
WALK = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_XDEV | RESOLVE_NO_MAGICLINKS
#: how a root itself is reached from /: no symlink on the way (roots may be mount points)
ROOT_WALK = RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS
#: openat2 has the same number on every architecture of the unified table
SYS_OPENAT2 = {"alpha": 547}.get(platform.machine(), 437)
CONFIG_HINT = "see the host config (/etc/svirt/svirt.toml, or $SVIRT_CONFIG)"


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64),
                ("resolve", ctypes.c_uint64)]


_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long


def openat2(dirfd: int, path: str | Path, flags: int, mode: int = 0, resolve: int = 0) -> int:
    """The openat2(2) system call; OSError on failure, HostError without it."""
    how = _OpenHow(flags | os.O_CLOEXEC, mode, resolve)
    name = os.fsencode(path)
    for _ in range(16):  # EAGAIN: a rename raced the walk (RESOLVE_BENEATH retries are ours)
        fd = _syscall(ctypes.c_long(SYS_OPENAT2), ctypes.c_int(dirfd), ctypes.c_char_p(name),
                      ctypes.byref(how), ctypes.c_size_t(ctypes.sizeof(how)))
        if fd >= 0:
            return int(fd)
        err = ctypes.get_errno()
        if err not in (errno.EAGAIN, errno.EINTR):
            break
    if err == errno.ENOSYS:
        raise HostError("the kernel has no openat2 system call (Linux 5.6 or later is needed); "
                        "svirt opens guest objects only with it",
                        hint="run svirt on a current kernel")
    raise OSError(err, os.strerror(err), str(path))


@dataclass(frozen=True)
class OpenedObject:
    fd: int
    path: Path  # as the kernel resolved it
    st_mode: int
    key: str  # "dev-ino": identity of the inode
    root: Path | None = None  # the root it was walked from (reopen_beneath)

    def close(self) -> None:
        os.close(self.fd)


class Roots(tuple[Path, ...]):
    """The image roots in force for one launch (a tuple of paths, which is what
    ``Registry.hold`` takes), with the log and block device roots of the host
    config and the console logs pinned by inode (path -> "dev-ino") once
    :func:`open_log` opened them."""

    logs: tuple[Path, ...]
    block_devices: tuple[Path, ...]
    pins: dict[Path, str]

    def __new__(cls, images: Iterable[Path] = (), *, logs: Iterable[Path] = (),
                block_devices: Iterable[Path] = ()) -> Roots:
        self = super().__new__(cls, tuple(_norm(Path(p)) for p in images))
        self.logs = tuple(_norm(Path(p)) for p in logs)
        self.block_devices = tuple(_norm(Path(p)) for p in block_devices)
        self.pins = {}
        return self


def launch_roots(spec_roots: Iterable[Path] = (), host: config.HostConfig | None = None
                 ) -> Roots:
    """The roots for one launch: the host's, narrowed by a spec's
    ``security.image_roots`` (each of which must lie inside a host root)."""
    host = host or config.load()
    wanted = tuple(_norm(Path(p)) for p in spec_roots)
    if not wanted:
        return Roots(host.image_roots, logs=host.log_roots,
                     block_devices=host.block_device_roots)
    images, blocks = [], []
    for root in wanted:
        in_images = any(_under(root, h) for h in host.image_roots)
        in_blocks = any(_under(root, h) for h in host.block_device_roots)
        if not (in_images or in_blocks):
            raise SecurityError(
                f"security.image_roots: {root} is not inside a host image root "
                f"({', '.join(map(str, host.image_roots)) or 'none'}); a spec may only "
                "narrow the roots",
                path=root,
                hint=f"pick a directory under a host image root, or add it: {CONFIG_HINT}",
            )
        if in_images:
            images.append(root)
        if in_blocks:
            blocks.append(root)
    return Roots(images, logs=host.log_roots, block_devices=blocks)


def _norm(path: Path) -> Path:
    return config.normalise(path)


def _under(path: Path, tree: Path) -> bool:
    return path == tree or tree in path.parents


def _pick_root(path: Path, roots: Iterable[Path]) -> tuple[Path, str] | None:
    """The deepest root ``path`` lies under, and the path relative to it."""
    inside = [r for r in roots if _under(path, r)]
    if not inside:
        return None
    root = max(inside, key=lambda r: len(r.parts))
    return root, str(path.relative_to(root)) if path != root else "."


def _deny_listed(real: Path, *, device_ok: bool = False) -> None:
    for tree in DENIED_TREES:
        if _under(real, Path(tree)) and not (device_ok and tree == "/dev"):
            raise RelabelRefused(
                f"{real} is under {tree}, which svirt never relabels",
                path=real,
                hint="copy the file to an image directory (e.g. /var/lib/svirt/images)",
            )


def open_root(root: Path) -> int:
    """An ``O_PATH`` fd on the root directory, reached from / without symlinks."""
    try:
        return openat2(AT_FDCWD, root, os.O_PATH | os.O_DIRECTORY, 0, ROOT_WALK)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise RelabelRefused(f"root {root} is a symbolic link or lies under one",
                                 path=root, hint=f"name the real directory; {CONFIG_HINT}",
                                 ) from None
        if err.errno == errno.ENOENT:
            raise  # FileNotFoundError: the object does not exist either
        raise RelabelRefused(f"root {root}: {err.strerror}", path=root) from None


def _walk_refusal(path: Path, root: Path, err: OSError) -> SvirtError:
    if err.errno == errno.ENOENT:
        return RelabelRefused(f"{path} does not exist", path=path)
    if err.errno == errno.ELOOP:
        return RelabelRefused(
            f"{path}: a directory on its way down from {root} is a symbolic link; "
            "svirt walks its roots without following links",
            path=path, hint="name the real path of the file in the spec")
    if err.errno == errno.EXDEV:
        return RelabelRefused(
            f"{path} leaves {root} or crosses a mount point below it (a bind mount?); "
            "svirt takes objects only from the root's own file system",
            path=path, hint="copy the file into the root, or make its mount a root")
    return RelabelRefused(f"{path}: {err.strerror}", path=path)


def _walk(path: Path, root: Path, rel: str, flags: int, mode: int = 0) -> int:
    try:
        rootfd = open_root(root)
    except FileNotFoundError:
        raise RelabelRefused(f"{path} does not exist (nor does its root {root})",
                             path=path) from None
    try:
        return openat2(rootfd, rel, flags, mode, WALK)
    except OSError as err:
        raise _walk_refusal(path, root, err) from None
    finally:
        os.close(rootfd)


def _outside(path: Path, roots: tuple[Path, ...], what: str) -> RelabelRefused:
    return RelabelRefused(
        f"{path} is outside the {what} ({', '.join(map(str, roots)) or 'none'})",
        path=path,
        hint=f"move it under a root (security.image_roots may only narrow them); {CONFIG_HINT}",
    )


def _check_kind(path: Path, st: os.stat_result, *, block_ok: bool) -> None:
    mode = st.st_mode
    if stat.S_ISLNK(mode):
        raise RelabelRefused(
            f"{path} is a symbolic link; svirt labels only the object itself",
            path=path,
            hint="name the target file in the spec instead of the link",
        )
    if stat.S_ISCHR(mode):
        raise RelabelRefused(f"{path} is a character device; svirt never gives one to a guest",
                             path=path)
    if stat.S_ISBLK(mode) and not block_ok:
        raise RelabelRefused(
            f"{path} is a block device; a disk may be one only under the host's "
            "block_device_roots",
            path=path, hint=f"add its directory to block_device_roots; {CONFIG_HINT}")
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode) or stat.S_ISBLK(mode)):
        raise RelabelRefused(f"{path} is not a regular file, directory or block device",
                             path=path)
    if stat.S_ISREG(mode) and st.st_nlink > 1:
        raise RelabelRefused(
            f"{path} has {st.st_nlink} hard links; relabelling it would relabel the others",
            path=path,
            hint="copy the file (cp --reflink=auto) so it has a single link",
        )


def _check_real(fd: int, path: Path, root: Path, st: os.stat_result) -> Path:
    """Second net: the kernel's own idea of where the fd is."""
    real = Path(os.readlink(proc_fd(fd)))
    _deny_listed(real, device_ok=stat.S_ISBLK(st.st_mode))
    if not _under(real, root):
        raise RelabelRefused(f"{path} resolved to {real}, outside its root {root}", path=path)
    return real


def open_object(
    path: Path,
    *,
    roots: tuple[Path, ...] | None = None,
    block_roots: tuple[Path, ...] = (),
    expect_key: str | None = None,
    what: str = "image roots",
) -> OpenedObject:
    """Open ``path`` for relabelling by walking from the root it lies under
    (``roots``: the host's image roots when None; ``block_roots``: where it may
    be a block device), or raise RelabelRefused saying why not.  With
    ``expect_key`` the object must be that inode (a console log being written)."""
    path = _norm(Path(path))
    if roots is None:
        roots = config.load().image_roots
    roots = tuple(_norm(r) for r in roots)
    block_roots = tuple(_norm(r) for r in block_roots)
    picked = _pick_root(path, roots)
    from_block = False
    if picked is None:
        picked, from_block = _pick_root(path, block_roots), True
    _deny_listed(path, device_ok=from_block)  # before touching anything
    if picked is None:
        raise _outside(path, roots, what)
    root, rel = picked
    fd = _walk(path, root, rel, os.O_PATH | os.O_NOFOLLOW)
    try:
        st = os.fstat(fd)
        _check_kind(path, st, block_ok=from_block)
        if from_block and not stat.S_ISBLK(st.st_mode):
            raise _outside(path, roots, what)
        real = _check_real(fd, path, root, st)
        key = object_key(st, fd)
        if expect_key is not None and key != expect_key:
            raise RelabelRefused(f"{path} was replaced since svirt opened it", path=path)
        return OpenedObject(fd, real, st.st_mode, key, root)
    except BaseException:
        os.close(fd)
        raise


def open_resource(resource: Resource, roots: tuple[Path, ...]) -> OpenedObject:
    """Open one of a guest's resources from the roots for its kind.  ``roots`` is
    the launch's :class:`Roots`, or a plain tuple of spec image roots (``()``:
    the host's) to narrow the host config with."""
    r = roots if isinstance(roots, Roots) else launch_roots(roots)
    path = _norm(resource.path)
    kind = str(resource.kind)
    if kind == "run-dir":  # the launcher's own directory, in the registry
        return open_object(path, roots=(path.parent,), what="registry")
    if kind in ("layer", "seed"):  # an overlay in layers/, a seed: the run directory's (root's)
        return open_object(path, roots=(path.parent,), what="registry")
    if kind == "console-log":
        return open_object(path, roots=(*r.logs, *r), expect_key=r.pins.get(path),
                           what="log and image roots")
    if kind == "disk":
        return open_object(path, roots=tuple(r), block_roots=r.block_devices)
    return open_object(path, roots=tuple(r))


def open_log(path: Path, roots: tuple[Path, ...] = ()) -> int:
    """Open a console log for appending, walking from a log or image root; only
    a regular file with one link (created 0600 if missing).  FIFOs and devices
    are never opened for writing: an existing file is checked through an
    ``O_PATH`` fd first.  Returns a blocking fd; pins the inode in ``roots``."""
    r = roots if isinstance(roots, Roots) else launch_roots(roots)
    path = _norm(Path(path))
    allowed = (*r.logs, *r)
    _deny_listed(path)
    picked = _pick_root(path, allowed)
    if picked is None:
        raise _outside(path, allowed, "log and image roots")
    root, rel = picked
    if rel == ".":
        raise RelabelRefused(f"console log {path} is a root directory", path=path)
    directory, name = os.path.split(rel)
    # every check of the log's directory comes before the file is created:
    # a refused log leaves nothing behind
    dirfd = _walk(path, root, directory or ".", os.O_PATH | os.O_DIRECTORY)
    try:
        _check_real(dirfd, path, root, os.fstat(dirfd))
        fd = _open_log_beneath(path, root, dirfd, name)
    finally:
        os.close(dirfd)
    try:
        st = os.fstat(fd)
        _check_log(path, st)
        _check_real(fd, path, root, st)
        os.set_blocking(fd, True)
        r.pins[path] = object_key(st, fd)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _open_log_beneath(path: Path, root: Path, dirfd: int, name: str) -> int:
    append = os.O_WRONLY | os.O_APPEND | os.O_NONBLOCK
    for _ in range(8):
        try:  # a new file: O_EXCL makes it ours, and a regular file
            return openat2(dirfd, name, append | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW,
                           0o600, WALK)
        except FileExistsError:
            pass
        except OSError as err:
            raise _walk_refusal(path, root, err) from None
        try:
            pfd = openat2(dirfd, name, os.O_PATH | os.O_NOFOLLOW, 0, WALK)
        except FileNotFoundError:
            continue  # removed meanwhile: create it
        except OSError as err:
            raise _walk_refusal(path, root, err) from None
        try:
            _check_log(path, os.fstat(pfd))
            # reopen the checked inode itself: never a FIFO or a device
            return os.open(proc_fd(pfd), append | os.O_CLOEXEC)
        finally:
            os.close(pfd)
    raise RelabelRefused(f"{path} keeps appearing and disappearing", path=path)


def _check_log(path: Path, st: os.stat_result) -> None:
    if not stat.S_ISREG(st.st_mode):
        kind = ("a FIFO" if stat.S_ISFIFO(st.st_mode) else
                "a symbolic link" if stat.S_ISLNK(st.st_mode) else
                "a socket" if stat.S_ISSOCK(st.st_mode) else
                "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else
                "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file")
        raise RelabelRefused(f"console log {path} is {kind}; it must be a regular file",
                             path=path, hint="name a regular file (it is created if missing)")
    _check_kind(path, st, block_ok=False)


def reopen_beneath(root: Path, rel: str, key: str | None) -> OpenedObject | None:
    """Walk from ``root`` to ``rel`` again for restore; None when gone or
    replaced (``key`` None: whatever inode is there now, never a symlink)."""
    try:
        rootfd = open_root(root)
    except (OSError, SvirtError):
        return None
    try:
        fd = openat2(rootfd, rel, os.O_PATH | os.O_NOFOLLOW, 0, WALK)
    except OSError:
        return None
    finally:
        os.close(rootfd)
    return _same(fd, root / rel, key)


def reopen(path: Path, key: str | None) -> OpenedObject | None:
    """Open ``path`` again for restore; None when it is gone or was replaced.

    Walks from the host root it lies under; a path under none (the registry's
    run directory, a root the config no longer lists) or below a mount inside
    it (a spec root that is a mount point) is reached from / with no symlink on
    the way.  Either way it must still be inode ``key`` (the journal does not
    say which root it came from: :attr:`OpenedObject.root` with
    :func:`reopen_beneath` is the exact walk)."""
    path = _norm(Path(path))
    try:
        host = config.load()
        picked = _pick_root(path, (*host.image_roots, *host.log_roots,
                                   *host.block_device_roots))
    except SvirtError:  # a broken config must not stop a restore
        picked = None
    if picked is not None:
        obj = reopen_beneath(picked[0], picked[1], key)
        if obj is not None:
            return obj
        # a spec root that is a mount point below the host root (the walk
        # stops at it): still no symlink, and still the same inode
    try:
        fd = openat2(AT_FDCWD, path, os.O_PATH | os.O_NOFOLLOW, 0, ROOT_WALK)
    except OSError:
        return None
    return _same(fd, path, key)


def _same(fd: int, path: Path, key: str | None) -> OpenedObject | None:
    st = os.fstat(fd)
    if stat.S_ISLNK(st.st_mode) or (key is not None and not same_object(key, st, fd)):
        os.close(fd)
        return None
    return OpenedObject(fd, path, st.st_mode, key if key is not None else object_key(st, fd))


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
