"""Connecting to a detached guest's QMP listener, which QEMU (hostile after
exec) holds: a listener that never accepts must not hold the caller.

Real sockets: a unix listener with a full backlog, as QEMU leaves it when it
accepts nothing and earlier supervisors' connections fill the queue."""

from __future__ import annotations

import errno
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from svirt.errors import ControlError
from svirt.launcher import channels

BOUND = 1.0  # the connect deadline for this test (the product's: CONNECT_SECONDS)


@pytest.fixture
def full_listener(tmp_path: Path) -> Iterator[Path]:
    """A root socket in a root directory that listens and never accepts, its
    backlog full of connections nobody took."""
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
            assert len(queued) < 100, "the backlog never filled"
        yield path
    finally:
        for s in queued:
            s.close()
        listener.close()  # frees a connect() the old code left blocked


def test_connect_to_a_listener_that_never_accepts_ends_in_time(
        full_listener: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(channels, "CONNECT_SECONDS", BOUND, raising=False)
    result: list[object] = []

    def attempt() -> None:
        try:
            result.append(channels.connect_control(full_listener))
        except ControlError as err:
            result.append(err)

    start = time.monotonic()
    worker = threading.Thread(target=attempt, daemon=True)
    worker.start()
    worker.join(BOUND + 3)
    assert not worker.is_alive(), "connect() to a never-accepting QMP listener blocks"
    assert time.monotonic() - start < BOUND + 1
    assert len(result) == 1 and isinstance(result[0], ControlError), result


def test_connect_still_reaches_a_listener_that_accepts(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir(mode=0o755)
    path = run / channels.QMP_SOCKET
    with channels.listen_private(path) as listener:
        sock = channels.connect_control(path)
        with sock, listener.accept()[0] as peer:
            peer.sendall(b"hi")
            assert sock.recv(2) == b"hi"
            assert sock.getblocking()  # the caller gets a blocking socket, as before
    assert os.path.exists(path)
