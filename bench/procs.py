"""Start commands and time them to a console marker and to their exit.

One selector watches every process's stdout pipe and pidfd, so many
processes started at once are timed without threads: the marker time is
when the marker line arrived on the pipe, the exit time when the pidfd
said the process ended.
"""

from __future__ import annotations

import os
import re
import selectors
import signal
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench.util import CLEANUP, kill_tree, now

BUFFER_LIMIT = 4 * 1024 * 1024


def marker_regex(marker: str) -> re.Pattern[bytes]:
    """The marker alone on a line (the kernel also echoes it inside its command line)."""
    return re.compile(rb"(?m)^" + re.escape(marker.encode()) + rb"\r?$")


@dataclass
class Watched:
    argv: Sequence[str]
    popen: subprocess.Popen[bytes]
    t0: float
    marker: re.Pattern[bytes] | None
    stop: Callable[[subprocess.Popen[bytes]], None]
    stderr_path: Path | None
    marker_at: float | None = None
    exit_at: float | None = None
    returncode: int | None = None
    eof: bool = False
    buf: bytearray = field(default_factory=bytearray)
    _pidfd: int = -1
    _cleanup: int = 0

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def marker_s(self) -> float | None:
        return None if self.marker_at is None else self.marker_at - self.t0

    @property
    def exit_s(self) -> float | None:
        return None if self.exit_at is None else self.exit_at - self.t0

    @property
    def finished(self) -> bool:
        return self.exit_at is not None and self.eof

    def tail(self, n: int = 1500) -> str:
        text = bytes(self.buf[-n:]).decode(errors="replace")
        if self.stderr_path is not None:
            try:
                err = self.stderr_path.read_text(errors="replace")[-n:]
            except OSError:
                err = ""
            if err:
                text += "\n--- stderr ---\n" + err
        return text


def stop_gently(proc: subprocess.Popen[bytes]) -> None:
    """svirt run: SIGTERM starts its shutdown ladder; SIGKILL after 30 s."""
    kill_tree(proc, grace=30.0)


def stop_hard(proc: subprocess.Popen[bytes]) -> None:
    """A raw hypervisor (group leader): SIGKILL its whole process group."""
    kill_tree(proc)


class Watcher:
    """Start processes and pump their output until a condition holds."""

    def __init__(self) -> None:
        self.sel = selectors.DefaultSelector()
        self.procs: list[Watched] = []

    def start(self, argv: Sequence[str], *, marker: str | None,
              env: Mapping[str, str] | None = None, cwd: str | None = None,
              stderr_path: Path | None = None,
              stop: Callable[[subprocess.Popen[bytes]], None] = stop_hard,
              preexec: Callable[[], None] | None = None) -> Watched:
        stderr_f = open(stderr_path, "wb") if stderr_path is not None else None
        try:
            t0 = now()
            popen = subprocess.Popen(
                list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=stderr_f if stderr_f is not None else subprocess.STDOUT,
                env=dict(env) if env is not None else None, cwd=cwd, start_new_session=True,
                preexec_fn=preexec)  # noqa: PLW1509 - the bench runs no threads
        finally:
            if stderr_f is not None:
                stderr_f.close()
        w = Watched(argv, popen, t0, marker_regex(marker) if marker else None, stop, stderr_path)
        w._cleanup = CLEANUP.push(f"process {popen.pid} ({argv[0]})", lambda: stop(popen))
        assert popen.stdout is not None
        os.set_blocking(popen.stdout.fileno(), False)
        self.sel.register(popen.stdout, selectors.EVENT_READ, (w, "out"))
        w._pidfd = os.pidfd_open(popen.pid)
        self.sel.register(w._pidfd, selectors.EVENT_READ, (w, "pid"))
        self.procs.append(w)
        return w

    def pump(self, until: Callable[[], bool], timeout: float) -> bool:
        """Process events until ``until()`` is true (True) or ``timeout`` passes (False)."""
        deadline = now() + timeout
        while not until():
            left = deadline - now()
            if left <= 0:
                return False
            if not self.sel.get_map():
                return until()
            for key, _ in self.sel.select(min(left, 1.0)):
                w, kind = key.data
                if kind == "out":
                    self._read(w, key.fileobj)
                else:
                    self._reaped(w)
        return True

    def _read(self, w: Watched, fileobj: object) -> None:
        assert w.popen.stdout is not None
        try:
            data = os.read(w.popen.stdout.fileno(), 65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        t = now()
        if not data:
            w.eof = True
            self.sel.unregister(w.popen.stdout)
            w.popen.stdout.close()
            return
        start = w.buf.rfind(b"\n") + 1  # a marker line may straddle two reads
        w.buf += data
        if w.marker is not None and w.marker_at is None and w.marker.search(w.buf, start):
            w.marker_at = t
        if len(w.buf) > BUFFER_LIMIT:
            del w.buf[: len(w.buf) - BUFFER_LIMIT // 2]

    def _reaped(self, w: Watched) -> None:
        w.exit_at = now()
        self.sel.unregister(w._pidfd)
        os.close(w._pidfd)
        w._pidfd = -1
        w.returncode = w.popen.wait()

    def wait_markers(self, procs: Sequence[Watched], timeout: float) -> bool:
        return self.pump(lambda: all(p.marker_at is not None or p.finished for p in procs),
                         timeout)

    def wait_finished(self, procs: Sequence[Watched], timeout: float) -> bool:
        return self.pump(lambda: all(p.finished for p in procs), timeout)

    def signal(self, w: Watched, sig: int = signal.SIGTERM) -> None:
        if w.exit_at is None:
            try:
                os.kill(w.pid, sig)
            except OSError:
                pass

    def close(self) -> None:
        """Stop whatever still runs (the way each was told to stop) and forget it."""
        for w in self.procs:
            if w.exit_at is None or w.popen.poll() is None:
                w.stop(w.popen)
            CLEANUP.done(w._cleanup)
            if w._pidfd >= 0:
                try:
                    self.sel.unregister(w._pidfd)
                except (KeyError, ValueError):
                    pass
                os.close(w._pidfd)
                w._pidfd = -1
            if w.popen.stdout is not None and not w.popen.stdout.closed:
                try:
                    self.sel.unregister(w.popen.stdout)
                except (KeyError, ValueError):
                    pass
                w.popen.stdout.close()
        self.procs = []
        self.sel.close()


def run_once(argv: Sequence[str], *, marker: str, env: Mapping[str, str] | None = None,
             cwd: str | None = None, stderr_path: Path | None = None,
             stop: Callable[[subprocess.Popen[bytes]], None] = stop_hard,
             timeout: float = 180.0, preexec: Callable[[], None] | None = None) -> Watched:
    """Start one command; return it once it has exited (or timed out and been stopped)."""
    watcher = Watcher()
    try:
        w = watcher.start(argv, marker=marker, env=env, cwd=cwd, stderr_path=stderr_path,
                          stop=stop, preexec=preexec)
        watcher.wait_finished([w], timeout)
        return w
    finally:
        watcher.close()


def run_file_console(argv: Sequence[str], *, console: Path, marker: str,
                     env: Mapping[str, str] | None = None, cwd: str | None = None,
                     timeout: float = 180.0, poll: float = 0.002) -> Watched:
    """Like run_once for a hypervisor writing its console to ``console`` (a file):
    the file is polled every ``poll`` seconds, as for libvirt's file console."""
    import time

    regex = marker_regex(marker)
    console.unlink(missing_ok=True)
    t0 = now()
    popen = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, env=dict(env) if env is not None else None,
                             cwd=cwd, start_new_session=True)
    handle = CLEANUP.push(f"process {popen.pid} ({argv[0]})", lambda: stop_hard(popen))
    w = Watched(argv, popen, t0, regex, stop_hard, None)
    fd = -1
    try:
        while True:
            if fd < 0:
                try:
                    fd = os.open(console, os.O_RDONLY | os.O_CLOEXEC)
                except FileNotFoundError:
                    pass
            if fd >= 0 and w.marker_at is None:
                start = w.buf.rfind(b"\n") + 1
                while chunk := os.read(fd, 65536):
                    w.buf += chunk
                if regex.search(w.buf, start):
                    w.marker_at = now()
            if popen.poll() is not None:
                w.exit_at = now()
                w.returncode = popen.returncode
                w.eof = True
                if fd >= 0 and w.marker_at is None:
                    while chunk := os.read(fd, 65536):
                        w.buf += chunk
                    if regex.search(w.buf):
                        w.marker_at = w.exit_at
                return w
            if now() - t0 > timeout:
                stop_hard(popen)
                continue
            time.sleep(poll)
    finally:
        if fd >= 0:
            os.close(fd)
        if popen.poll() is None:
            stop_hard(popen)
        CLEANUP.done(handle)
