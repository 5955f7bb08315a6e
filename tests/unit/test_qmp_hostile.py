"""The QMP client against a QEMU that lies (a real socketpair, a thread as QEMU)."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from svirt.backends.qemu import QMP_MAX_LINE, QmpClient
from svirt.errors import ControlError


def _qemu(peer: socket.socket, script: list[bytes], flood: bytes | None = None) -> None:
    def run() -> None:
        try:
            for chunk in script:
                peer.sendall(chunk)
            if flood is not None:
                end = time.monotonic() + 10
                while time.monotonic() < end:
                    peer.sendall(flood)
        except OSError:
            pass

    threading.Thread(target=run, daemon=True).start()


GREETING = b'{"QMP": {"version": {}}}\n'
CAPS_OK = b'{"return": {}}\n'


@pytest.mark.parametrize("script, flood, match", [
    ([GREETING, CAPS_OK, b'{"error": "not a dict"}\n'], None, "not a dict"),
    ([GREETING, CAPS_OK, b'{"error": ["x"]}\n'], None, "x"),
    ([GREETING, CAPS_OK, b"[" * 100000 + b"\n"], None, "not JSON"),
    ([GREETING, CAPS_OK, b"7\n"], None, "unexpected message"),
    ([GREETING, CAPS_OK], b"A" * 65536, "over"),
    ([GREETING, CAPS_OK], b'{"event": "X"}\n' * 100, "no reply"),
    ([b"\xff\xfe garbage\n"], None, "not JSON"),
])
def test_hostile_qmp_ends_in_a_control_error(script: list[bytes], flood: bytes | None,
                                             match: str) -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        _qemu(theirs, script, flood)
        start = time.monotonic()
        with pytest.raises(ControlError, match=match):
            QmpClient(ours, timeout=2).execute("system_powerdown")
        assert time.monotonic() - start < 8
    assert QMP_MAX_LINE == 1 << 20


def _trickle(peer: socket.socket, first: bytes, every: float, stop: threading.Event) -> None:
    """QEMU that answers one byte at a time, each just in time for a per-read
    limit, and never ends a line."""
    def run() -> None:
        try:
            peer.sendall(first)
            end = time.monotonic() + 10  # then silence: the old client ended here
            while not stop.wait(every) and time.monotonic() < end:
                peer.sendall(b" ")
        except OSError:
            pass

    threading.Thread(target=run, daemon=True).start()


@pytest.mark.parametrize("first", [b"", GREETING + CAPS_OK + b"{"])
def test_a_trickling_qmp_peer_cannot_stretch_the_exchange(first: bytes) -> None:
    """One deadline for the whole exchange, not one per read: a byte every
    0.2 s against a 1 s limit held the old client for as long as QEMU liked
    (here 10 s, the trickle's own end)."""
    ours, theirs = socket.socketpair()
    stop = threading.Event()
    with ours, theirs:
        _trickle(theirs, first, 0.2, stop)
        start = time.monotonic()
        try:
            with pytest.raises(ControlError):
                QmpClient(ours, timeout=1).execute("system_powerdown")
        finally:
            elapsed = time.monotonic() - start
            stop.set()
    assert elapsed < 2.0, f"a trickling QMP peer held one exchange {elapsed:.1f} s"


def test_a_qmp_peer_that_never_reads_cannot_hold_the_sender() -> None:
    """QEMU that stops reading its monitor: once the socket buffer is full a
    blocking send would wait for ever; the request shares the deadline."""
    ours, theirs = socket.socketpair()
    with ours, theirs:
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        while True:  # fill both buffers: the peer reads nothing
            try:
                ours.send(b"x" * 4096, socket.MSG_DONTWAIT)
            except BlockingIOError:
                break
        errors: list[Exception] = []

        def ask() -> None:
            try:
                QmpClient(ours, timeout=1).execute("quit")
            except Exception as err:  # noqa: BLE001 - the test looks at its type
                errors.append(err)

        start = time.monotonic()
        worker = threading.Thread(target=ask, daemon=True)
        worker.start()
        worker.join(4)
        assert not worker.is_alive(), "a QMP peer that never reads holds the sender"
        theirs.close()  # frees the old client's blocked send
        assert time.monotonic() - start < 2.0
        assert len(errors) == 1 and isinstance(errors[0], ControlError), errors
