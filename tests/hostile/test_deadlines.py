"""Attack: a hypervisor that stalls its control channel or its console.

A guest owns the far end of its QMP socket, its mconsole and the shell on its
console.  Here each plays the hostile side for real (real sockets, real
processes, the real Supervisor and backends): a QMP peer that trickles one
byte at a time, a QMP listener that never accepts, an mconsole that trickles
``more`` fragments, a shell that floods forged frame markers or an exit
status of 100,000 digits.  Every exchange must end within its one deadline,
every stop within the ladder's bound, and the frame search must cost time
linear in what the guest wrote.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from svirt.backends import qemu, uml
from svirt.backends.qemu import QemuBackend
from svirt.errors import ControlError, SvirtError
from svirt.launcher import channels, supervisor
from svirt.launcher.console import Console
from svirt.launcher.supervisor import OutcomeKind, Step, Supervisor

# the ladder's times, shortened for the test (the product's are 5/5/30 s)
STEP = 1.0
# graceful + hard (each one control deadline), SIGTERM ignored, SIGKILL at once
LADDER_BOUND = 3 * STEP + 2.0

DEAF_TO_SIGTERM = ("import signal, time\n"
                   "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                   "time.sleep(600)\n")


def _spawn(code: str, *args: str, stdio: int | None = None) -> int:
    """A real process: ``python3 -I -c code args`` (stdin/stdout on ``stdio``)."""
    actions: list[tuple[Any, ...]] = []
    if stdio is not None:
        actions = [(os.POSIX_SPAWN_DUP2, stdio, 0), (os.POSIX_SPAWN_DUP2, stdio, 1)]
    return os.posix_spawn(sys.executable, [sys.executable, "-I", "-c", code, *args],
                          {"PATH": "/usr/bin:/bin"}, file_actions=actions, setsid=True)


@contextmanager
def _supervised(code: str, *args: str, stdio: bool = False) -> Iterator[Supervisor]:
    """A real process under a real Supervisor (its console a socketpair)."""
    ours, theirs = socket.socketpair()
    pid = _spawn(code, *args, stdio=theirs.fileno() if stdio else None)
    theirs.close()
    sup = Supervisor("hostile", pid, ours, Console("hostile"), None)
    try:
        yield sup
    finally:
        sup.signal(signal.SIGKILL, group=True)
        sup.close()


class _Control:
    """The GuestControl a QEMU backend needs: the QMP socket (connected one,
    or a detached guest's listener, connected to as Guest does)."""

    name = "hostile"

    def __init__(self, sock: socket.socket | None = None, path: Path | None = None) -> None:
        self.sock, self.path = sock, path

    def control_socket(self, deadline: Any = None) -> object:
        if self.sock is None and self.path is not None:
            self.sock = (channels.connect_control(self.path, deadline) if deadline is not None
                         else channels.connect_control(self.path))
        return self.sock


@pytest.fixture
def short_ladder(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HARD_SECONDS", "SIGTERM_SECONDS"):
        monkeypatch.setattr(supervisor, name, STEP, raising=False)
    monkeypatch.setattr(qemu, "QMP_SECONDS", STEP, raising=False)
    monkeypatch.setattr(channels, "CONNECT_SECONDS", STEP, raising=False)
    monkeypatch.setattr(uml, "MCONSOLE_TIMEOUT", STEP)


def _stop_within(sup: Supervisor, guest: _Control, bound: float) -> tuple[float, Any]:
    """Run the ladder in a thread: the old code could hold it for days."""
    result: list[Any] = []
    worker = threading.Thread(
        target=lambda: result.append(sup.stop(QemuBackend(), guest, STEP)),  # type: ignore[arg-type]
        daemon=True)
    start = time.monotonic()
    worker.start()
    worker.join(bound + 5)
    elapsed = time.monotonic() - start
    assert not worker.is_alive(), f"the shutdown ladder is still held after {elapsed:.0f} s"
    assert result, "the ladder ended without an outcome"
    return elapsed, result[0]


def test_a_trickling_qmp_peer_cannot_hold_the_shutdown_ladder(short_ladder: None) -> None:
    """QEMU greets, then answers one byte every 0.2 s and never ends a line:
    each read is quick, the exchange never ends.  graceful and hard must each
    give up at their deadline, SIGTERM (ignored) at its own, SIGKILL ends it."""
    ours, theirs = socket.socketpair()
    stop = threading.Event()

    def trickle() -> None:
        try:
            theirs.sendall(b'{"QMP": {"version": {}}}\n')
            end = time.monotonic() + 60
            while not stop.wait(0.2) and time.monotonic() < end:
                theirs.sendall(b" ")
        except OSError:
            pass

    threading.Thread(target=trickle, daemon=True).start()
    try:
        with ours, theirs, _supervised(DEAF_TO_SIGTERM) as sup:
            elapsed, outcome = _stop_within(sup, _Control(sock=ours), LADDER_BOUND)
    finally:
        stop.set()
    assert elapsed < LADDER_BOUND, f"stop took {elapsed:.1f} s"
    assert outcome.kind is OutcomeKind.KILLED and outcome.step is Step.SIGKILL


def test_a_qmp_listener_that_never_accepts_cannot_hold_the_shutdown_ladder(
        short_ladder: None, tmp_path: Path) -> None:
    """A detached QEMU accepts nothing on its QMP listener, whose backlog is
    full: connect() must give up within the step's deadline."""
    run = tmp_path / "run"
    run.mkdir(mode=0o755)
    path = run / channels.QMP_SOCKET
    listener = channels.listen_private(path, backlog=0)
    queued: list[socket.socket] = []
    try:
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.setblocking(False)
            try:
                s.connect(str(path))
            except BlockingIOError as err:
                assert err.errno == errno.EAGAIN
                s.close()
                break
            queued.append(s)
        with _supervised(DEAF_TO_SIGTERM) as sup:
            elapsed, outcome = _stop_within(sup, _Control(path=path), LADDER_BOUND)
    finally:
        for s in queued:
            s.close()
        listener.close()
    assert elapsed < LADDER_BOUND, f"stop took {elapsed:.1f} s"
    assert outcome.kind is OutcomeKind.KILLED and outcome.step is Step.SIGKILL


# ------------------------------------------------------------------ mconsole
MORE = struct.pack("=III512s", 0, 1, 512, b"M" * 512)  # "more to come", each time


def test_an_mconsole_that_trickles_fragments_ends_within_one_deadline(tmp_path: Path) -> None:
    """UML answers ``more`` fragments, one every 0.3 s, just under the old
    per-read limit: 63 of them held one command about 19 s; the whole
    exchange now has one deadline (1 s here)."""
    home = tmp_path / "home"
    (home / "g").mkdir(parents=True)
    ctl = tmp_path / "ctl"
    ctl.mkdir(mode=0o711)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(str(home / "g" / "mconsole"))
    stop = threading.Event()

    def trickle() -> None:
        try:
            _data, addr = server.recvfrom(1024)
            for _ in range(63):  # the old client's cap was 64 fragments
                server.sendto(MORE, addr)
                if stop.wait(0.3):
                    return
        except OSError:
            pass

    threading.Thread(target=trickle, daemon=True).start()
    start = time.monotonic()
    try:
        with pytest.raises(ControlError):
            uml.mconsole_command(home, "g", "cad", client_dir=ctl, guest_uid=None,
                                 guest_pid=None, timeout=1.0)
    finally:
        elapsed = time.monotonic() - start
        stop.set()
        server.close()
    assert elapsed < 2.0, f"a trickling mconsole held one command {elapsed:.1f} s"
    assert os.listdir(ctl) == []


# --------------------------------------------------------------- shell frames
#: a "shell" on the console that answers the ready probe, and answers every
#: framed command with SIZE bytes of lines first (in 16 parts, 20 ms apart):
#: harmless ones ("plain"),
#: forged BEGIN markers with the call's token ("forged"), then the real frame
#: (its exit status 100,000 digits long with "digits"); the first command
#: (a warm-up) gets a plain answer
HOSTILE_SHELL = r"""
import os, re, sys, time
mode, size = sys.argv[1], int(sys.argv[2])
def out(data):
    view = memoryview(data)
    while view:
        view = view[os.write(1, view):]
buf = b""
commands = 0
while True:
    chunk = os.read(0, 65536)
    if not chunk:
        break
    buf += chunk
    while b"\n" in buf:
        line, buf = buf.split(b"\n", 1)
        m = re.search(rb"SVIRT-SH-READY- (\w+)", line)
        if m:
            out(b"SVIRT-SH-READY-" + m.group(1) + b"\n")
            continue
        m = re.search(rb"SVIRT-SH-BEGIN- (\w+)", line)
        if not m:
            continue
        token = m.group(1)
        begin = b"SVIRT-SH-BEGIN-" + token
        commands += 1
        if commands == 1:  # the first one is the test's warm-up: a plain answer
            out(b"\n" + begin + b"\n\nSVIRT-SH-END-" + token + b":0\n")
            continue
        fill = (begin if mode == "forged" else b"x" * len(begin)) + b"\n"
        n = size // len(fill)
        step = max(1, n // 16)
        for i in range(0, n, step):  # in 16 parts: each one wakes the waiter
            out(fill * min(step, n - i))
            time.sleep(0.02)
        status = b"9" * 100000 if mode == "digits" else b"0"
        out(b"\n" + begin + b"\nhello\n\nSVIRT-SH-END-" + token + b":" + status + b"\n")
"""


def _shell_run(mode: str, size: int, bound: float) -> tuple[float, Any]:
    """One Console.shell() against the hostile shell: (seconds, its result or
    the exception); a thread, since the old search could run for minutes."""
    with _supervised(HOSTILE_SHELL, mode, str(size), stdio=True) as sup:
        sup.console.shell("true", timeout=30)  # the shell is up; not timed
        result: list[Any] = []

        def run() -> None:
            try:
                result.append(sup.console.shell("echo hello", timeout=bound))
            except SvirtError as err:
                result.append(err)
            except Exception as err:  # noqa: BLE001 - the old code crashed with ValueError
                result.append(err)

        start = time.monotonic()
        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        worker.join(bound + 10)
        elapsed = time.monotonic() - start
        assert not worker.is_alive(), (f"{mode}, {size} bytes: the frame search still "
                                       f"runs after {elapsed:.0f} s")
        return elapsed, result[0]


@pytest.mark.parametrize("size", [100 * 1024, 1024 * 1024])
def test_forged_begin_lines_cost_linear_time(size: int) -> None:
    """The old frame regex tried each forged BEGIN against the whole rest of
    the buffer on every wakeup, under the console's lock: quadratic (100 KiB
    of forged lines cost seconds per search).  Now the forged flood must cost
    about what the same bytes of plain lines cost, in this same run."""
    base_seconds, base = _shell_run("plain", size, 30)
    forged_seconds, forged = _shell_run("forged", size, 30)
    bound = 2 * base_seconds + 0.3
    print(f"{size} bytes: plain lines {base_seconds:.3f} s, forged BEGIN lines "
          f"{forged_seconds:.3f} s")
    assert forged_seconds < bound, (f"{size} bytes of forged BEGIN lines: "
                                    f"{forged_seconds:.2f} s, plain lines {base_seconds:.2f} s")
    # the frame is the last BEGIN before the END: forged lines are not output
    assert base == (0, "hello\n") and forged == (0, "hello\n"), (base, forged)


def test_an_exit_status_of_100000_digits_is_refused_at_once() -> None:
    seconds, result = _shell_run("digits", 1024, 10)
    assert isinstance(result, ControlError), repr(result)
    assert "digits" in result.message
    assert seconds < 2.0


def test_a_supervisor_closed_twice_closes_nothing_reused() -> None:
    """``Supervisor.close`` owns its pidfd and console fds: a second call
    (a daemon path that ends a guest twice) must not close the numbers again,
    which by then may belong to another guest's pidfd or a client socket."""
    ours, theirs = socket.socketpair()
    pid = _spawn("import time\ntime.sleep(600)\n")
    theirs.close()
    sup = Supervisor("twice", pid, ours, Console("twice"), None)
    sup.signal(signal.SIGKILL, group=True)
    numbers = {sup.pidfd, ours.fileno()}
    sup.close()
    reused = [os.open("/dev/null", os.O_RDONLY) for _ in range(4)]
    try:
        assert numbers & set(reused), "the closed numbers were not reused (test setup)"
        sup.close()
        for fd in reused:
            os.fstat(fd)  # EBADF here: the second close closed someone else's fd
    finally:
        for fd in reused:
            with contextlib.suppress(OSError):
                os.close(fd)
