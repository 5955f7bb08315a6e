"""The image cache: where kernels and initramfs images live, written whole.

``$SVIRT_CACHE`` or ``/var/cache/svirt``: world-readable files, directories
0755 (guests run as other uids and read from here), every file written
through a temporary file and renamed into place, builds serialised by an
``fcntl`` lock, so that concurrent processes neither build twice nor ever see
half a file.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from svirt.errors import ImageBuildError

__all__ = ["DEFAULT_CACHE", "atomic_write", "cache_dir", "ensure_dir", "locked", "resolve_cache"]

DEFAULT_CACHE = Path("/var/cache/svirt")
"""Where kernels and initramfs images are kept unless ``$SVIRT_CACHE`` says otherwise."""

_WRITABLE_HINT = "run as root or point SVIRT_CACHE at a writable directory"


def cache_dir() -> Path:
    """The cache directory (``$SVIRT_CACHE`` or :data:`DEFAULT_CACHE`), created 0755."""
    env = os.environ.get("SVIRT_CACHE")
    path = Path(env) if env else DEFAULT_CACHE
    ensure_dir(path)
    return path


def resolve_cache(cache: Path | None) -> Path:
    """``cache`` (created if needed), or :func:`cache_dir` when None."""
    if cache is None:
        return cache_dir()
    ensure_dir(cache)
    return cache


def ensure_dir(path: Path) -> None:
    """Create ``path`` (and parents) 0755 unless it is a directory already;
    as root, refuse a cache another user could change (:func:`check_trusted`)."""
    if not path.is_dir():
        try:
            path.mkdir(parents=True, exist_ok=True)
            os.chmod(path, 0o755)  # noqa: S103 - guests (other uids) read the cache
        except OSError as exc:
            raise ImageBuildError(
                f"cannot create cache directory {path}: {exc.strerror or exc}",
                hint=_WRITABLE_HINT) from exc
    if os.geteuid() == 0:
        check_trusted(path)


def check_trusted(path: Path) -> None:
    """ImageBuildError unless every directory from ``/`` to ``path`` is a real
    directory (no symlink) of root's that no one else may write (one on the
    way may be sticky, like /tmp): root writes the cache by name, so a user
    who could rename or replace any of them could point root's writes anywhere."""
    current = Path("/")
    for part in ("", *path.absolute().parts[1:]):
        current = current / part
        st = os.lstat(current)
        shared = st.st_mode & 0o022 and (current == path or not st.st_mode & stat.S_ISVTX)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != 0 or shared:
            raise ImageBuildError(
                f"{path}: {current} is not a directory only root may change, so root "
                "will not build images there",
                hint="point SVIRT_CACHE at a directory of root's (mode 0755)")


@contextlib.contextmanager
def locked(cache: Path, name: str) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``cache/.NAME.lock``."""
    path = cache / f".{name}.lock"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise ImageBuildError(
            f"cannot open lock file {path}: {exc.strerror or exc}", hint=_WRITABLE_HINT
        ) from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def atomic_write(dest: Path, fill: Callable[[BinaryIO], None]) -> None:
    """Write ``dest`` (mode 0644) through a temporary file in the same directory.

    The temporary file is ``.NAME.*.tmp``; one left by a killed writer is for
    the caller to remove while it holds the lock.
    """
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            fill(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp_name, 0o644)
        os.replace(tmp_name, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        raise
