"""The CLI's waits on svirt's supervisor are bounded: a supervisor that is
stuck (on a guest, or for any reason) must not hold ``svirt stop`` for ever.

Real sockets: a stand-in supervisor that accepts and then trickles a byte at
a time and never ends its answer, and one that never accepts at all."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from svirt.errors import ServiceError, SvirtError
from svirt.launcher.registry import Registry
from svirt.service import client
from svirt.service.server import SOCKET_NAME

BOUND = 1.0


def _ask_within(registry: Registry, request: dict[str, Any], bound: float) -> tuple[float, Any]:
    result: list[Any] = []

    def run() -> None:
        try:
            result.append(client.ask(registry, request, start=False))
        except SvirtError as err:
            result.append(err)

    start = time.monotonic()
    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(bound + 5)
    elapsed = time.monotonic() - start
    assert not worker.is_alive(), f"svirt waits on its supervisor after {elapsed:.0f} s"
    return elapsed, result[0]


def test_a_supervisor_that_trickles_its_answer_cannot_hold_the_cli(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(client, "ANSWER_SECONDS", BOUND, raising=False)
    registry = Registry(tmp_path / "run", tmp_path / "state")
    registry.root.mkdir(mode=0o755)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(registry.root / SOCKET_NAME))
    listener.listen(4)
    stop = threading.Event()

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            end = time.monotonic() + 20  # then silence and EOF: the old client ended here
            while not stop.wait(0.2) and time.monotonic() < end:
                conn.sendall(b" ")

    threading.Thread(target=serve, daemon=True).start()
    try:
        elapsed, result = _ask_within(registry, {"op": "status", "name": None}, BOUND)
    finally:
        stop.set()
        listener.close()
    assert isinstance(result, ServiceError), result
    assert elapsed < BOUND + 1


def test_every_verb_has_a_bound() -> None:
    ladder = 5.0 + 5.0 + 30.0 + 5.0  # the supervisor's LADDER_WAIT, slack included
    assert client.answer_bound({"op": "stop", "timeout": 10}) == 10 + ladder + 120
    assert client.answer_bound({"op": "stop"}) == 3600 + ladder + 120
    assert client.answer_bound({"op": "kill"}) == 30 + 5 + 120
    assert client.answer_bound({"op": "restart", "timeout": 1}) == 1 + ladder + 120 + 300
    assert client.answer_bound({"op": "start", "wait_for": "x", "timeout": 7}) == 307
    assert client.answer_bound({"op": "start"}) == 300
    assert client.answer_bound({"op": "status"}) == 60
