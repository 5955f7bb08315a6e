"""The guest's console as the launcher sees it: a buffer of what the guest
wrote (bounded), :meth:`Console.expect` and :meth:`Console.shell` over it,
input typed back, and the sinks its output is copied to (stdout, a
terminal through a filter, a capped log file).

Everything in the buffer is the guest's: searches run outside the lock, in
time linear in what the guest writes however it writes it, and a shell
answer is found by a frame unique to its call.  The
:class:`~svirt.launcher.supervisor.Supervisor` feeds it (its pump drains
the console socket) and gives it its writer.
"""

from __future__ import annotations

import os
import re
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn, TypeVar

from svirt.deadline import Deadline
from svirt.errors import ConsoleClosed, ConsoleTimeout, ControlError

BUFFER_LIMIT = 8 * 1024 * 1024
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

_T = TypeVar("_T")
_STATUS = re.compile(rb"(\d{1,%d})\r?\n" % SHELL_STATUS_DIGITS)
_STATUS_PREFIX = re.compile(rb"\d{0,%d}\r?" % SHELL_STATUS_DIGITS)


def _token() -> str:
    """A fresh token that frames one shell exchange (secrets: imported only here,
    on the first shell command; at module level it costs every svirt run ~3 ms)."""
    import secrets

    return secrets.token_hex(8)


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
