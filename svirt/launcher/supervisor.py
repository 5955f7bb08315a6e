"""Supervise a running hypervisor: drain its console, wait on its pidfd,
stop it with a ladder, and say how it ended.

One background thread per guest waits on the pidfd and the console socket
together (``selectors``), so the console is always drained: a chatty guest
never blocks on a full socket buffer.  Output goes to the guest's
:class:`~svirt.launcher.console.Console` (for :meth:`Console.expect`) and to
its sink: the log file, stdout or a pty.  Input (:meth:`Console.send`, keys
typed on the pty) goes back over the same socket, one writer at a time.
"""

from __future__ import annotations

import enum
import os
import re
import select
import selectors
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from svirt.backends.base import Backend, GuestControl
from svirt.deadline import Deadline
from svirt.errors import ConsoleClosed, ControlError, SvirtError
from svirt.launcher.console import Console
from svirt.termsafe import escape_text

PANIC_PATTERN = re.compile(rb"Kernel panic - not syncing")
COALESCE_BELOW = 512  # bytes: a read this short means a trickle
COALESCE_SECONDS = 0.003
#: the shutdown ladder's steps after the graceful one (request and wait, whole)
HARD_SECONDS = 5.0
SIGTERM_SECONDS = 5.0
SIGKILL_SECONDS = 30.0
STEP_MIN_SECONDS = 0.5  # a graceful step never shorter: its request needs the time
#: after the hypervisor ended, its console is read until empty, at most this long
#: (a helper outside its process group could keep writing)
FINAL_DRAIN_SECONDS = 1.0


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


__all__ = ["FINAL_DRAIN_SECONDS", "HARD_SECONDS", "SIGKILL_SECONDS", "SIGTERM_SECONDS",
           "STEP_MIN_SECONDS", "Outcome", "OutcomeKind", "Step", "Supervisor", "classify"]
