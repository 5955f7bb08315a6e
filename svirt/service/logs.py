"""Console logs of detached guests: ``STATE/logs/NAME.log``, rotated.

The directory is root's (0700), so files are opened by path with
``O_NOFOLLOW`` only as a second guard.  When a write would take the current
file past ``max_bytes`` it becomes ``NAME.log.1`` (``.1`` becomes ``.2`` ...,
the oldest dropped): at most ``keep`` files of ``max_bytes`` each, so a
chatty guest cannot fill the disk.  The defaults match virtlogd's.
"""

from __future__ import annotations

import errno
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

MAX_BYTES = 2 * 1024 * 1024
KEEP = 3


def log_dir(state: Path) -> Path:
    return state / "logs"


def log_path(state: Path, name: str) -> Path:
    return log_dir(state) / f"{name}.log"


def _limits() -> tuple[int, int]:
    """(max_bytes, keep): SVIRT_LOG_MAX_BYTES / SVIRT_LOG_KEEP if set, else the
    host config's console_log_max_bytes / console_log_keep."""
    from svirt.config import load

    config = load()
    try:
        size = int(os.environ.get("SVIRT_LOG_MAX_BYTES", config.console_log_max_bytes))
        keep = int(os.environ.get("SVIRT_LOG_KEEP", config.console_log_keep))
    except ValueError:
        return config.console_log_max_bytes, config.console_log_keep
    return max(4096, size), max(1, keep)


class Fd:
    """One owned file descriptor, closed once and then forgotten.

    The number lives only in here: :meth:`close` drops it before it closes,
    so no later close (or write) can reach whatever the process opens next
    under the same number (another guest's pidfd or FIFO, a client socket,
    the supervisor's lock).  Every use after the close is an ``OSError``
    (EBADF), never a stale number."""

    __slots__ = ("_fd",)

    def __init__(self, fd: int) -> None:
        self._fd = fd

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def fileno(self) -> int:
        if self._fd < 0:
            raise OSError(errno.EBADF, "closed")
        return self._fd

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def __enter__(self) -> Fd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RotatingLog:
    """Append-only writer with size-based rotation (not thread-safe: one pump).

    A rotation that fails (the directory full, a name taken by something
    that is not a file) keeps the current file open and drops what would
    have gone past ``max_bytes`` (:attr:`dropped` counts it; the error is
    raised to the caller); the next write tries again, at most once per
    ``RETRY_SECONDS``.  The log's fd is an :class:`Fd`: no path ever keeps a
    closed number."""

    RETRY_SECONDS = 1.0

    def __init__(self, path: Path, max_bytes: int | None = None, keep: int | None = None) -> None:
        size, count = _limits()
        self.path = path
        self.max_bytes = max_bytes or size
        self.keep = keep or count
        self.dropped = 0
        self._retry_at = 0.0
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._fd = Fd(self._open())
        self._size = os.fstat(self._fd.fileno()).st_size

    def _open(self) -> int:
        return os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW
                       | os.O_CLOEXEC, 0o600)

    def _rotate(self) -> None:
        """Shift the names, open a new current file, then (only then) close
        the old one: a failure at any step leaves the old fd in place."""
        for i in range(self.keep - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{i}")
            if i == self.keep - 1:
                older.unlink(missing_ok=True)
            src = self.path if i == 1 else self.path.with_name(f"{self.path.name}.{i - 1}")
            if src.exists():
                os.replace(src, older)
        if self.keep == 1:
            self.path.unlink(missing_ok=True)
        new = Fd(self._open())
        old, self._fd = self._fd, new
        self._size = 0
        old.close()

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            if self._size >= self.max_bytes:
                now = time.monotonic()
                if now < self._retry_at:
                    self.dropped += len(view)
                    return
                try:
                    self._rotate()
                except OSError:
                    self._retry_at = now + self.RETRY_SECONDS
                    self.dropped += len(view)
                    raise
            room = self.max_bytes - self._size
            n = os.write(self._fd.fileno(), view[:room])
            self._size += n
            view = view[n:]

    def close(self) -> None:
        self._fd.close()


def tail(state: Path, name: str, lines: int) -> bytes:
    """The last ``lines`` lines over the rotated files, oldest first."""
    path = log_path(state, name)
    chunks: list[bytes] = []
    have = 0
    for p in [path, *(path.with_name(f"{path.name}.{i}") for i in range(1, 16))]:
        try:
            data = p.read_bytes()
        except FileNotFoundError:
            if p == path:
                continue
            break
        chunks.insert(0, data)
        have += data.count(b"\n")
        if have > lines:
            break
    text = b"".join(chunks)
    if lines <= 0:
        return b""
    parts = text.split(b"\n")
    ends_open = not text.endswith(b"\n")
    keep = parts[-(lines + 1):] if not ends_open else parts[-lines:]
    return b"\n".join(keep)


def follow(state: Path, name: str, poll: float = 0.2) -> Iterator[bytes]:
    """New bytes of NAME.log as they come, across rotations (``logs -f``)."""
    path = log_path(state, name)
    current = Fd(-1)
    ino = None
    try:
        while True:
            try:
                st = os.stat(path)
            except FileNotFoundError:
                time.sleep(poll)
                continue
            if st.st_ino != ino:  # rotated (or first time): read the new file from 0
                if not current.closed:
                    while chunk := os.read(current.fileno(), 65536):
                        yield chunk
                    current.close()
                try:
                    current = Fd(os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC))
                except FileNotFoundError:  # rotated again meanwhile
                    continue
                if ino is None:  # -f starts at the end, as tail -f
                    os.lseek(current.fileno(), 0, os.SEEK_END)
                ino = os.fstat(current.fileno()).st_ino
            chunk = os.read(current.fileno(), 65536)
            if chunk:
                yield chunk
            else:
                time.sleep(poll)
    finally:
        current.close()


def _service_path(state: Path, name: str) -> Path | None:
    from svirt.spec import NAME_RE

    if not NAME_RE.fullmatch(name) or name.startswith("."):
        return None
    return state / "services" / f"{name}.json"


def save_service(state: Path, name: str, data: dict[str, Any]) -> None:
    """How a detached guest's supervision ended (state, reason, restarts, runs),
    for ``svirt status NAME`` after it is gone: STATE/services/NAME.json."""
    path = _service_path(state, name)
    if path is not None:
        _write_json(path, data)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(mode=0o700, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)


def load_service(state: Path, name: str) -> dict[str, Any] | None:
    path = _service_path(state, name)
    return None if path is None else _read_json(path)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        with os.fdopen(fd) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _live_path(state: Path, name: str) -> Path | None:
    path = _service_path(state, name)
    return None if path is None else state / "supervised" / path.name


def save_live(state: Path, name: str, data: dict[str, Any]) -> None:
    """Where a supervised guest stands (running or in backoff, its spec and its
    restart history): STATE/supervised/NAME.json, rewritten at each change so
    that the next supervisor can carry on when this one is killed."""
    path = _live_path(state, name)
    if path is not None:
        _write_json(path, data)


def drop_live(state: Path, name: str) -> None:
    path = _live_path(state, name)
    if path is not None:
        path.unlink(missing_ok=True)


def live_services(state: Path, drop_bad: bool = False) -> dict[str, dict[str, Any]]:
    """Every STATE/supervised/NAME.json that can be read, by name (with
    ``drop_bad``, those that cannot are removed)."""
    try:
        names = sorted(os.listdir(state / "supervised"))
    except OSError:
        return {}
    found = {}
    for entry in names:
        if not entry.endswith(".json") or entry.startswith("."):
            continue
        name = entry[:-len(".json")]
        path = _live_path(state, name)
        data = _read_json(path) if path is not None else None
        if data is not None:
            found[name] = data
        elif drop_bad and path is not None:
            path.unlink(missing_ok=True)
    return found
