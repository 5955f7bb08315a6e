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
