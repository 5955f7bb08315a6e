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
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NoReturn, TypeVar

from svirt.backends.base import Backend, GuestControl
from svirt.deadline import Deadline
from svirt.errors import ConsoleClosed, ConsoleTimeout, ControlError, SvirtError
from svirt.termsafe import escape_text

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
SHELL_STATUS_DIGITS = 3  # sh's $? is 0..255: more digits is a forged frame
#: expect() searches only new output and this much before it again: a match
#: longer than this that began before the previous search is not found
EXPECT_OVERLAP = 64 * 1024
EXPECT_CONTEXT = 256  # bytes before the search start that ^ and lookbehind see
#: a search that found nothing is repeated when the new output is an eighth of
#: what it read, or after this long: a guest that writes a byte at a time
#: cannot make each byte cost a search of EXPECT_OVERLAP bytes
SEARCH_INTERVAL = 0.005
#: the shutdown ladder's steps after the graceful one (request and wait, whole)
HARD_SECONDS = 5.0
SIGTERM_SECONDS = 5.0
SIGKILL_SECONDS = 30.0
STEP_MIN_SECONDS = 0.5  # a graceful step never shorter: its request needs the time
#: after the hypervisor ended, its console is read until empty, at most this long
#: (a helper outside its process group could keep writing)
FINAL_DRAIN_SECONDS = 1.0


_T = TypeVar("_T")
_STATUS = re.compile(rb"(\d{1,%d})\r?\n" % SHELL_STATUS_DIGITS)
_STATUS_PREFIX = re.compile(rb"\d{0,%d}\r?" % SHELL_STATUS_DIGITS)


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
    # the panic line is the guest's own text: it counts only when the guest
    # ended by itself, never against a stop svirt asked for (a guest printing it
    # would turn a clean stop into a "panic" and set off a restart policy)
    if panicked and step is Step.NONE:
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
        One deadline (``timeout``) covers the whole exchange: waiting for
        another shell command to finish, for the shell to answer, typing the
        command and its framed answer.

        What the shell prints is the guest's: the frame is found in time
        linear in the output (the END marker first, then the last BEGIN
        before it), searched outside the console's lock, and an exit status
        of more than :data:`SHELL_STATUS_DIGITS` digits is a ControlError."""
        deadline = Deadline(timeout, f"guest {self.name}: shell")
        if not self._shell_lock.acquire(timeout=deadline.left()):  # never -1: for ever
            raise ConsoleTimeout(f"guest {self.name}: another shell command held its console "
                                 f"for {timeout:g} s", log_tail=self.tail())
        try:
            if not self._shell_ready:
                self._wait_for_shell(deadline.end)
            token = _token()
            find = self._frame_finder(token)
            self.send(f"printf '\\n%s%s\\n' {SHELL_BEGIN} {token}\n(\n{command}\n) </dev/null\n"
                      f"printf '\\n%s%s:%s\\n' {SHELL_END} {token} \"$?\"\n".encode(),
                      deadline.left())
            return self._search(find, len(SHELL_END) + len(token) + SHELL_STATUS_DIGITS + 4,
                                deadline.left(), "the framed answer of the shell")
        finally:
            self._shell_lock.release()

    def _frame_finder(self, token: str) -> Callable[[bytes, int, int],
                                                     tuple[int, tuple[int, str]] | None]:
        """The search for one shell frame, for :meth:`_search`: the first END
        line after the previous match, then the last BEGIN line before it."""
        begin = f"{SHELL_BEGIN}{token}".encode()
        end = f"{SHELL_END}{token}:".encode()

        def find(window: bytes, base: int, lo: int) -> tuple[int, tuple[int, str]] | None:
            at = window.find(end, lo - base)
            if at < 0:
                return None
            status_at = at + len(end)
            m = _STATUS.match(window, status_at)
            if m is None:
                rest = window[status_at:status_at + SHELL_STATUS_DIGITS + 2]
                if len(rest) < SHELL_STATUS_DIGITS + 2 and _STATUS_PREFIX.fullmatch(rest):
                    return None  # the rest of the line is still to come
                raise ControlError(f"guest {self.name}: the shell's exit status is not a "
                                   f"number of up to {SHELL_STATUS_DIGITS} digits: "
                                   f"{bytes(rest)!r}...")
            with self._cond:  # the output is before the END: copy once, search outside
                first = max(self._pos, self._dropped)
                head = bytes(self._buf[first - self._dropped:max(0, base + at - self._dropped)])
            start = head.rfind(begin)
            if start < 0:
                raise ControlError(f"guest {self.name}: the shell's answer has an END but no "
                                   f"BEGIN (over {BUFFER_LIMIT // 2} bytes of output, or a "
                                   "forged frame)")
            output = head[start + len(begin):]
            output = output[2:] if output.startswith(b"\r\n") else output.removeprefix(b"\n")
            output = output.removesuffix(b"\n").removesuffix(b"\r")
            return base + m.end(), (int(m.group(1)),
                                    output.replace(b"\r\n", b"\n").decode(errors="replace"))

        return find

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
        """Wait for ``pattern`` after the previous match; return the match.
        Each wait searches only the new output (and :data:`EXPECT_OVERLAP`
        bytes before it), outside the console's lock."""
        if isinstance(pattern, str):
            pattern = pattern.encode()
        regex = pattern if isinstance(pattern, re.Pattern) else re.compile(re.escape(pattern))

        def find(window: bytes, base: int, lo: int) -> tuple[int, bytes] | None:
            m = regex.search(window, lo - base)
            return None if m is None else (base + m.end(), m.group(0))

        return self._search(find, EXPECT_OVERLAP, timeout, repr(regex.pattern))

    def _search(self, find: Callable[[bytes, int, int], tuple[int, _T] | None], overlap: int,
                timeout: float, what: str) -> _T:
        """Wait until ``find`` finds a match in the output after the previous
        match; move past it and return what ``find`` made of it.

        ``find(window, base, lo)`` gets a copy of the output from the absolute
        offset ``base`` and looks for a match that starts at ``lo`` or later
        (the bytes before are context: ``^``, lookbehind); it returns (the
        absolute end of the match, a result) or None.  The copy is taken
        under the console's lock and searched outside it, so the pump keeps
        draining the guest; each search covers only what came since the one
        before plus ``overlap`` bytes, so a wait costs time linear in what
        the guest writes, however it writes it."""
        deadline = time.monotonic() + timeout
        scanned = -1  # the absolute end of the output searched so far
        enough = 0  # new bytes that call for a search at once (else SEARCH_INTERVAL)
        searched_at = -SEARCH_INTERVAL
        while True:
            with self._cond:
                while True:
                    now = time.monotonic()
                    fresh = self._dropped + len(self._buf) - scanned
                    if fresh > 0 and (fresh >= enough or self._closed or now >= deadline
                                      or now >= searched_at + SEARCH_INTERVAL):
                        break  # (at the deadline: what came is searched once more)
                    left = deadline - now
                    if left <= 0 or (self._closed and fresh <= 0):
                        self._timed_out(what, timeout)
                    # a trickle (a byte per write) waits for the interval: each
                    # search re-reads ``overlap`` bytes, never once per byte
                    self._cond.wait(left if fresh <= 0
                                    else min(left, searched_at + SEARCH_INTERVAL - now))
                end = self._dropped + len(self._buf)
                lo = max(self._pos, self._dropped, scanned - overlap)
                base = max(self._dropped, lo - EXPECT_CONTEXT)
                window = bytes(self._buf[base - self._dropped:])
            searched_at = time.monotonic()
            enough = len(window) // 8
            found = find(window, base, lo)
            if found is not None:
                with self._cond:
                    self._pos = max(self._pos, found[0])
                return found[1]
            scanned = end
            if time.monotonic() >= deadline:
                with self._cond:
                    self._timed_out(what, timeout)

    def _timed_out(self, what: str, timeout: float) -> NoReturn:
        why = "the guest ended" if self._closed else f"{timeout:g} s passed"
        raise ConsoleTimeout(f"guest {self.name}: {what} did not appear ({why})",
                             log_tail=self.tail())

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
        self._close_lock = threading.Lock()
        self._fds_closed = False
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
                        drain_until = time.monotonic() + FINAL_DRAIN_SECONDS
                        while (console_open and time.monotonic() < drain_until
                               and self._drain()):
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
                poller = select.poll()  # not select(): fds above 1023 in a busy supervisor
                poller.register(self._wfd, select.POLLOUT)
                poller.poll(int(min(left, 0.5) * 1000) + 1)

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

    def stop(self, backend: Backend, guest: GuestControl, graceful_timeout: float) -> Outcome:
        """The shutdown ladder: graceful, hard, SIGTERM, SIGKILL.

        Each step has one deadline for its request and the wait after it
        (the graceful one ``graceful_timeout``, at least
        :data:`STEP_MIN_SECONDS`; then :data:`HARD_SECONDS`,
        :data:`SIGTERM_SECONDS`, :data:`SIGKILL_SECONDS`): a control channel
        that stalls, trickles or refuses only moves the ladder on.  A
        hypervisor still there after SIGKILL's time is a ControlError."""
        ladder: list[tuple[Step, Callable[[Deadline], None], float]] = [
            (Step.GRACEFUL, lambda d: backend.request_shutdown(guest, hard=False, deadline=d),
             graceful_timeout),
            (Step.HARD, lambda d: backend.request_shutdown(guest, hard=True, deadline=d),
             HARD_SECONDS),
            (Step.SIGTERM, lambda d: self.signal(signal.SIGTERM), SIGTERM_SECONDS),
            (Step.SIGKILL, lambda d: self.signal(signal.SIGKILL, group=True), SIGKILL_SECONDS),
        ]
        failed: list[str] = []  # why a step was passed over: kept in the outcome
        for step, action, seconds in ladder:
            if not self.running:
                break
            self.step = step
            deadline = Deadline(max(seconds, STEP_MIN_SECONDS),
                                f"guest {self.name}: shutdown step {step}")
            try:
                action(deadline)
            except SvirtError as err:  # the channel failed or stalled: the next step, at once
                # its message may quote the guest's reply (an mconsole error's
                # text, QMP's desc): data, escaped before it reaches a terminal
                failed.append(f"{step}: {escape_text(err.message)[:200]}")
                continue
            if self.wait(deadline.left()):
                break
        if not self.wait(0):
            raise ControlError(f"guest {self.name}: pid {self.pid} still runs "
                               f"{SIGKILL_SECONDS:g} s after SIGKILL")
        outcome = self.outcome()
        assert outcome is not None  # noqa: S101 - wait() returned: the status is set
        if failed and outcome.kind is not OutcomeKind.POWEROFF:
            outcome = replace(outcome, detail=f"{outcome.detail}; {'; '.join(failed)}")
        return outcome

    def close(self) -> None:
        """Close the pidfd and console fds once: a second call does nothing
        (a number closed twice would close whatever reused it)."""
        self.wait()
        self._thread.join()
        with self._close_lock:
            if self._fds_closed:
                return
            self._fds_closed = True
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


def terminal_sink() -> Callable[[bytes], None]:
    """The console to stdout (``svirt run``): on a terminal through
    :class:`~svirt.termsafe.ConsoleFilter` (the guest's bytes are data: no
    OSC 52 clipboard, no query whose answer the terminal would type, no
    title), piped as they are."""
    try:
        tty = os.isatty(sys.stdout.fileno())
    except (OSError, ValueError):  # no real stdout (a test's capture)
        tty = False
    if not tty:
        return stdout_sink
    from svirt.termsafe import ConsoleFilter

    screen = ConsoleFilter()

    def write(data: bytes) -> None:
        stdout_sink(screen.feed(data))

    return write


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
