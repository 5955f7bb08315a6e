"""Supervise a running hypervisor: drain its console, wait on its pidfd,
stop it with a ladder, and say how it ended.

One background thread per guest waits on the pidfd and the console socket
together (``selectors``), so the console is always drained: a chatty guest
never blocks on a full socket buffer.  Output goes to an in-memory buffer
(for :meth:`Console.expect`) and to the log file, stdout or a pty.  Input
(:meth:`Console.send`, keys typed on the pty) goes back over the same socket,
one writer at a time.
"""

from __future__ import annotations

import enum
import os
import re
import select
import selectors
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from svirt.backends.base import Backend
from svirt.errors import ConsoleClosed, ConsoleTimeout, ControlError, SvirtError

PANIC_PATTERN = re.compile(rb"Kernel panic - not syncing")
BUFFER_LIMIT = 8 * 1024 * 1024
COALESCE_BELOW = 512  # bytes: a read this short means a trickle
COALESCE_SECONDS = 0.003
#: the frame of one Console.shell command: printf joins the two halves, so
#: an echo of the typed line never matches
SHELL_BEGIN = "SVIRT-SH-BEGIN-"
SHELL_END = "SVIRT-SH-END-"
SHELL_READY = "SVIRT-SH-READY-"
SHELL_PROBE_SECONDS = 0.5


def _token() -> str:
    """A fresh token that frames one shell exchange (secrets: imported only here,
    on the first shell command; at module level it costs every svirt run ~3 ms)."""
    import secrets

    return secrets.token_hex(8)


class OutcomeKind(enum.StrEnum):
    POWEROFF = "poweroff"  # the guest powered itself off (or obeyed a graceful request)
    PANIC = "panic"  # the guest kernel panicked
    CRASH = "crash"  # the hypervisor died on its own: non-zero exit or a signal
    KILLED = "killed"  # the shutdown ladder had to force it (quit/halt, SIGTERM, SIGKILL)


class Step(enum.StrEnum):
    NONE = "none"
    GRACEFUL = "graceful"  # QMP system_powerdown / mconsole cad
    HARD = "hard"  # QMP quit / mconsole halt
    SIGTERM = "sigterm"
    SIGKILL = "sigkill"


@dataclass(frozen=True)
class Outcome:
    kind: OutcomeKind
    exit_code: int | None
    signal: int | None
    step: Step
    detail: str

    def __str__(self) -> str:
        return f"{self.kind}: {self.detail}"

    @property
    def ok(self) -> bool:
        return self.kind is OutcomeKind.POWEROFF


def classify(status: int, step: Step, panicked: bool) -> Outcome:
    code = os.waitstatus_to_exitcode(status)
    sig = -code if code < 0 else None
    exit_code = code if code >= 0 else None
    if panicked:
        return Outcome(OutcomeKind.PANIC, exit_code, sig, step, "the guest kernel panicked")
    if step in (Step.HARD, Step.SIGTERM, Step.SIGKILL):
        how = f"signal {signal.Signals(sig).name}" if sig else f"exit code {exit_code}"
        return Outcome(OutcomeKind.KILLED, exit_code, sig, step,
                       f"stopped by the shutdown ladder at step {step} ({how})")
    if exit_code == 0:
        how = "on request" if step is Step.GRACEFUL else "by itself"
        return Outcome(OutcomeKind.POWEROFF, 0, None, step, f"the guest powered off {how}")
    if sig is not None:
        return Outcome(OutcomeKind.CRASH, None, sig, step,
                       f"the hypervisor was killed by signal {signal.Signals(sig).name}")
    return Outcome(OutcomeKind.CRASH, exit_code, None, step,
                   f"the hypervisor exited with code {exit_code}")


class Console:
    """The guest's console output, kept for expect() and copied to a sink."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._buf = bytearray()
        self._dropped = 0  # bytes trimmed from the front of _buf
        self._pos = 0  # absolute offset where the next expect() starts
        self._cond = threading.Condition()
        self._closed = False
        self.total = 0
        self._writer: Callable[[bytes, float], None] | None = None
        self._shell_lock = threading.Lock()
        self._shell_ready = False

    def feed(self, data: bytes) -> None:
        with self._cond:
            self._buf += data
            self.total += len(data)
            if len(self._buf) > BUFFER_LIMIT:
                cut = len(self._buf) - BUFFER_LIMIT // 2
                del self._buf[:cut]
                self._dropped += cut
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def send(self, data: bytes, timeout: float = 10.0) -> None:
        """Type ``data`` into the guest's console (its serial line or UML con0)."""
        if self._writer is None:
            raise ConsoleClosed(f"guest {self.name}: its console takes no input")
        self._writer(data, timeout)

    def sendline(self, line: str, timeout: float = 10.0) -> None:
        """Type ``line`` and Enter."""
        self.send(line.encode() + b"\n", timeout)

    def shell(self, command: str, timeout: float = 60.0) -> tuple[int, str]:
        """Run ``command`` in the shell the guest reads from its console (the
        tiny guest's ``svirt.mode=shell``, or any ``sh`` on the console) and
        return its exit status and its output (stdout and stderr, ``\n``
        line ends).  The command runs in a subshell with stdin from
        /dev/null, framed by markers unique to this call, so its output is
        exact even when other text reaches the console before or after it.
        Waits (up to ``timeout``) for the shell to answer first."""
        deadline = time.monotonic() + timeout
        with self._shell_lock:
            if not self._shell_ready:
                self._wait_for_shell(deadline)
            token = _token()
            frame = re.compile(
                re.escape(f"{SHELL_BEGIN}{token}".encode()) + rb"\r?\n(.*?)\r?\n"
                + re.escape(f"{SHELL_END}{token}:".encode()) + rb"(\d+)\r?\n", re.DOTALL)
            self.send(f"printf '\\n%s%s\\n' {SHELL_BEGIN} {token}\n(\n{command}\n) </dev/null\n"
                      f"printf '\\n%s%s:%s\\n' {SHELL_END} {token} \"$?\"\n".encode(),
                      max(0.1, deadline - time.monotonic()))
            m = frame.fullmatch(self.expect(frame, max(0.0, deadline - time.monotonic())))
            assert m is not None  # noqa: S101 - expect returned a match of frame
            return int(m.group(2)), m.group(1).replace(b"\r\n", b"\n").decode(errors="replace")

    def _wait_for_shell(self, deadline: float) -> None:
        """Ask until the shell answers: a probe typed before it reads is not lost
        (the tty keeps it) but may be answered late, so each probe is harmless.
        The probe has no quote: the first ones typed may reach the shell with
        their start cut off, and a cut quote would leave it in a quoted
        string forever (every later probe adding an even number)."""
        token = _token()
        answer = re.compile(re.escape(f"{SHELL_READY}{token}".encode()) + rb"\r?\n")
        while True:
            self.send(f"printf %s%s\\\\n {SHELL_READY} {token}\n".encode(),
                      max(0.1, deadline - time.monotonic()))
            left = deadline - time.monotonic()
            try:
                self.expect(answer, min(SHELL_PROBE_SECONDS, max(0.0, left)))
            except ConsoleTimeout as err:
                if self._closed or time.monotonic() >= deadline:
                    raise ConsoleTimeout(f"guest {self.name}: no shell answers on its console",
                                         log_tail=err.log_tail,
                                         hint="the guest must run a shell on its console "
                                              "(the tiny guest: svirt.mode=shell)") from None
                continue
            self._shell_ready = True
            return

    def text(self) -> str:
        with self._cond:
            return self._buf.decode(errors="replace")

    def tail(self, n: int = 2000) -> str:
        with self._cond:
            return bytes(self._buf[-n:]).decode(errors="replace")

    def expect(self, pattern: str | bytes | re.Pattern[bytes], timeout: float = 30.0) -> bytes:
        """Wait for ``pattern`` after the previous match; return the match."""
        if isinstance(pattern, str):
            pattern = pattern.encode()
        regex = pattern if isinstance(pattern, re.Pattern) else re.compile(re.escape(pattern))
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                start = max(0, self._pos - self._dropped)
                m = regex.search(self._buf, start)
                if m:
                    self._pos = self._dropped + m.end()
                    return m.group(0)
                left = deadline - time.monotonic()
                if self._closed or left <= 0:
                    why = "the guest ended" if self._closed else f"{timeout:g} s passed"
                    raise ConsoleTimeout(
                        f"guest {self.name}: {regex.pattern!r} did not appear ({why})",
                        log_tail=self.tail(),
                    )
                self._cond.wait(left)


    def expect_line(self, line: str, timeout: float = 30.0) -> bytes:
        """Wait for ``line`` alone on a console line (not inside another, such
        as the kernel's echo of its own command line)."""
        regex = re.compile(rb"(?m)^" + re.escape(line.encode()) + rb"\r?$")
        return self.expect(regex, timeout)


class Supervisor:
    """Owns the hypervisor process from spawn to reap.

    The console is a socket (one end of a socketpair, both ways) or, for a
    detached guest, a pair of fds (the read end of its output FIFO, the
    write end of its input FIFO) that a later supervisor can open again.
    An ``adopted`` hypervisor is not this process's child: its end is seen
    on its pidfd, its exit status is unknown."""

    def __init__(
        self,
        name: str,
        pid: int,
        console_io: socket.socket | tuple[int, int],
        console: Console,
        sink: Callable[[bytes], None] | None,
        pty_master: int | None = None,
        init_wrapped: bool = False,
        pidfd: int | None = None,
        adopted: bool = False,
    ) -> None:
        self.name = name
        # an init (tini, PID 1 of the jail) reports a signal death as 128 + signo
        self._init_wrapped = init_wrapped
        self._pty = pty_master
        self.pid = pid
        self.pidfd = pidfd if pidfd is not None else os.pidfd_open(pid)
        self.adopted = adopted
        self._sock: socket.socket | None = None
        if isinstance(console_io, socket.socket):
            self._sock = console_io
            self._rfd = self._wfd = console_io.fileno()
        else:
            self._rfd, self._wfd = console_io
        for fd in {self._rfd, self._wfd}:
            os.set_blocking(fd, False)  # the pump reads, _write waits for room
        self.console = console
        self._sink = sink
        self.step = Step.NONE
        self.panicked = False
        self._status: int | None = None
        self._done = threading.Event()
        self._tail = b""
        self._last_read = 0
        self._write_lock = threading.Lock()
        console._writer = self._write
        self._thread = threading.Thread(target=self._run, name=f"svirt-{name}", daemon=True)
        self._thread.start()

    def _reap(self) -> int:
        """The wait status; an adopted hypervisor's is unknown: 0 if the ladder
        or the guest ended it, else a SIGKILL (it died on its own)."""
        if not self.adopted:
            return os.waitpid(self.pid, 0)[1]
        return 0 if self.step is not Step.NONE else signal.SIGKILL

    def _unwrap(self, status: int) -> int:
        if self._init_wrapped and os.WIFEXITED(status) and 128 < os.WEXITSTATUS(status) < 193:
            return os.WEXITSTATUS(status) - 128  # the wait status of that signal
        return status

    # ------------------------------------------------------------ the pump
    def _run(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self._rfd, selectors.EVENT_READ, "console")
        sel.register(self.pidfd, selectors.EVENT_READ, "pid")
        if self._pty is not None:
            sel.register(self._pty, selectors.EVENT_READ, "pty")
        console_open = True
        try:
            while True:
                for key, _ in sel.select():
                    if key.data == "console":
                        got = self._drain()
                        console_open = got is not None
                        if not console_open:
                            sel.unregister(self._rfd)
                        elif got and self._last_read < COALESCE_BELOW:
                            # QEMU's serial port writes a byte at a time: let a
                            # few ms of output gather instead of waking per byte
                            time.sleep(COALESCE_SECONDS)
                    elif key.data == "pty":
                        self._from_pty(sel)
                    else:
                        status = self._reap()
                        # helpers of the hypervisor (UML forks host processes for
                        # guest userspace) die with it: kill its process group
                        try:
                            os.killpg(self.pid, signal.SIGKILL)
                        except OSError:
                            pass
                        while console_open and self._drain():
                            pass
                        self._status = self._unwrap(status)
                        return
        finally:
            sel.close()
            self.console.close()
            self._done.set()

    def _from_pty(self, sel: selectors.BaseSelector) -> None:
        """Keys typed on the pty go to the guest's console."""
        assert self._pty is not None  # noqa: S101 - registered only with a pty
        try:
            data = os.read(self._pty, 4096)
        except BlockingIOError:
            return
        except OSError:  # EIO: nobody has the pty open right now
            data = b""
        if not data:
            sel.unregister(self._pty)
            return
        try:
            self._write(data, 5.0)
        except SvirtError:
            pass  # the guest stopped reading: a keystroke is not worth a stall

    def _write(self, data: bytes, timeout: float) -> None:
        """All of ``data`` to the guest, or ConsoleClosed.  The socket stays
        non-blocking (the pump reads it): wait for room with select."""
        deadline = time.monotonic() + timeout
        view = memoryview(data)
        with self._write_lock:
            while view:
                if self._done.is_set():
                    raise ConsoleClosed(f"guest {self.name}: it has ended")
                try:
                    view = view[os.write(self._wfd, view):]
                    continue
                except BlockingIOError:
                    pass
                except OSError as err:
                    raise ConsoleClosed(f"guest {self.name}: console closed ({err})") from None
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ConsoleClosed(f"guest {self.name}: its console took no input for "
                                        f"{timeout:g} s")
                select.select([], [self._wfd], [], min(left, 0.5))

    def _drain(self) -> bool | None:
        """Read what is there: True (got data), False (nothing now), None (closed)."""
        try:
            data = os.read(self._rfd, 65536)
        except BlockingIOError:
            return False
        except OSError:
            return None
        if not data:
            return None
        self._last_read = len(data)
        scan = self._tail + data
        if not self.panicked and PANIC_PATTERN.search(scan):
            self.panicked = True
        self._tail = scan[-64:]
        self.console.feed(data)
        if self._sink is not None:
            try:
                self._sink(data)
            except OSError:
                self._sink = None
        return True

    # ------------------------------------------------------------- control
    @property
    def running(self) -> bool:
        return not self._done.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """True when the hypervisor has ended (within ``timeout``)."""
        return self._done.wait(timeout)

    def outcome(self) -> Outcome | None:
        if self._status is None:
            return None
        if self.adopted and self.step is Step.NONE and not self.panicked:
            return Outcome(OutcomeKind.CRASH, None, None, self.step,
                           "the hypervisor ended on its own while re-adopted "
                           "(its exit status went to the supervisor that started it)")
        return classify(self._status, self.step, self.panicked)

    def signal(self, sig: int, *, group: bool = False) -> None:
        if self.running:
            try:
                signal.pidfd_send_signal(self.pidfd, sig)
                if group:
                    os.killpg(self.pid, sig)
            except ProcessLookupError:
                pass

    def stop(self, backend: Backend, guest: object, graceful_timeout: float) -> Outcome:
        """The shutdown ladder: graceful, hard, SIGTERM, SIGKILL."""
        ladder: list[tuple[Step, Callable[[], None], float]] = [
            (Step.GRACEFUL, lambda: backend.request_shutdown(guest, hard=False),  # type: ignore[arg-type]
             graceful_timeout),
            (Step.HARD, lambda: backend.request_shutdown(guest, hard=True), 5.0),  # type: ignore[arg-type]
            (Step.SIGTERM, lambda: self.signal(signal.SIGTERM), 5.0),
            (Step.SIGKILL, lambda: self.signal(signal.SIGKILL, group=True), 30.0),
        ]
        for step, action, timeout in ladder:
            if not self.running:
                break
            self.step = step
            try:
                action()
            except (ControlError, SvirtError):
                continue
            if self.wait(timeout):
                break
        self.wait()
        outcome = self.outcome()
        assert outcome is not None  # noqa: S101 - wait() returned: the status is set
        return outcome

    def close(self) -> None:
        self.wait()
        self._thread.join()
        os.close(self.pidfd)
        if self._sock is not None:
            self._sock.close()
        else:
            for fd in {self._rfd, self._wfd}:
                os.close(fd)
        if self._pty is not None:
            os.close(self._pty)


def stdout_sink(data: bytes) -> None:
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()


def file_sink(path: Path, roots: tuple[Path, ...] = (), max_bytes: int | None = None
              ) -> tuple[Callable[[bytes], None], Callable[[], None]]:
    """Append to a console log under a log or image root (a regular file only:
    a FIFO is refused at once, never waited on); ``roots`` (the launch's
    :class:`~svirt.security.files.Roots`) pins its inode for labelling.  The
    log holds at most ``max_bytes`` (default: the host config's
    ``console_log_max_mib``); a failed write drops and counts, never stalls
    or raises (:class:`svirt.launcher.bounds.CappedLog`)."""
    from svirt.launcher.bounds import CappedLog, console_log_cap
    from svirt.security.files import open_log

    log = CappedLog(open_log(path, roots), max_bytes or console_log_cap())
    return log.write, log.close
