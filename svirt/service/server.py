"""The supervisor's request server: one per registry, on a root-only socket.

It holds ``STATE/svirtd.lock`` (an ``flock``: a second supervisor of the
same registry leaves at once) and listens on ``RUN_DIR/svirtd.sock`` (0600;
a peer that is not root gets a refusal, checked with ``SO_PEERCRED``).  One
JSON request per connection, one JSON answer, each connection on its own
thread; what a request means is the :class:`Handler`'s business.  It stops
listening (the socket gone first, so nobody can reach it) once nothing was
asked for ``IDLE_SECONDS`` and the handler has nothing left to watch.
"""

from __future__ import annotations

import fcntl
import json
import os
import selectors
import socket
import struct
import threading
import time
from pathlib import Path
from typing import Any, Protocol

from svirt.launcher.channels import listen_private
from svirt.service.notes import SupervisorLog

SOCKET_NAME = "svirtd.sock"
LOCK_NAME = "svirtd.lock"
IDLE_SECONDS = 2.0
MAX_REQUEST = 1 << 20


class Handler(Protocol):
    """What answers the requests (:class:`svirt.service.daemon.Daemon`)."""

    def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        """The answer to one request (never raises)."""

    def console(self, conn: socket.socket, name: str, read_only: bool) -> None:
        """Keep ``conn`` attached to a guest's console until either side ends."""

    def quiet_since(self) -> float | None:
        """When (CLOCK_MONOTONIC) the handler last had something to watch;
        None while it still has."""


def reply(conn: socket.socket, answer: dict[str, Any]) -> None:
    """One JSON answer on one line."""
    conn.sendall(json.dumps(answer).encode() + b"\n")


class RequestServer:
    """The lock, the socket and the connections of one registry's supervisor."""

    def __init__(self, root: Path, state: Path, notes: SupervisorLog) -> None:
        self.path = root / SOCKET_NAME
        self.lock_path = state / LOCK_NAME
        self.notes = notes
        self.lock = threading.Lock()
        self.busy = 0  # requests being served
        self.last_request = time.monotonic()
        self.listener: socket.socket | None = None

    def claim(self) -> bool:
        """Take the registry's supervisor lock (kept until this process
        ends); False when another supervisor serves the registry."""
        lock_fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                          0o600)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # another supervisor serves this registry
        return True

    def listen(self) -> None:
        self.path.unlink(missing_ok=True)
        self.listener = listen_private(self.path, 64)

    def run(self, handler: Handler) -> None:
        """Serve until idle (see the module); the socket is gone on return."""
        assert self.listener is not None  # noqa: S101 - listen() comes first
        sel = selectors.DefaultSelector()
        sel.register(self.listener, selectors.EVENT_READ)
        while True:
            if sel.select(timeout=0.2):
                self._accept(self.listener, handler)
            if self._idle(handler):
                # nobody can reach us once the socket is gone: exit cleanly
                self.path.unlink(missing_ok=True)
                return

    def _idle(self, handler: Handler) -> bool:
        """Only this thread starts requests, so once none is being served
        none starts before the handler is asked (and a request that ended
        meanwhile has moved ``last_request``)."""
        with self.lock:
            if self.busy:
                return False
            last = self.last_request
        quiet = handler.quiet_since()
        return quiet is not None and time.monotonic() - max(last, quiet) > IDLE_SECONDS

    def _accept(self, listener: socket.socket, handler: Handler) -> None:
        """One connection, served on its own thread; no failure here (EMFILE,
        no thread to be had) ends the supervisor."""
        try:
            conn, _ = listener.accept()
        except OSError as err:
            self.notes.note(f"accept: {err.strerror}", subject="accept")
            time.sleep(0.05)
            return
        with self.lock:
            self.busy += 1
        try:
            threading.Thread(target=self._serve_one, args=(conn, handler), daemon=True).start()
        except BaseException as err:  # noqa: BLE001 - RuntimeError: no thread to be had
            with self.lock:
                self.busy -= 1
            conn.close()
            self.notes.note(f"cannot serve a request: {err}", subject="thread")

    def _serve_one(self, conn: socket.socket, handler: Handler) -> None:
        try:
            creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                    struct.calcsize("3i"))
            _pid, uid, _gid = struct.unpack("3i", creds)
            if uid != os.geteuid():
                reply(conn, {"ok": False, "error": "only root may ask svirt's supervisor"})
                return
            request = _read_request(conn)
            if isinstance(request, str):
                reply(conn, {"ok": False, "error": f"bad request: {request}"})
            elif request.get("op") == "console":
                handler.console(conn, str(request.get("name")), bool(request.get("read_only")))
            else:
                reply(conn, handler.handle(request))
        except OSError:
            pass  # the client went away
        except Exception as err:  # noqa: BLE001 - one request's failure is its own
            self.notes.note(f"a request failed: {type(err).__name__}: {err}")
        finally:
            conn.close()
            with self.lock:
                self.busy -= 1
                self.last_request = time.monotonic()


def _read_request(conn: socket.socket) -> dict[str, Any] | str:
    """The request (one JSON object on a line, at most MAX_REQUEST bytes), or
    why it is not one."""
    data = b""
    while not data.endswith(b"\n") and len(data) < MAX_REQUEST:
        chunk = conn.recv(65536)
        if not chunk:
            break
        data += chunk
    try:
        request = json.loads(data)
        if not isinstance(request, dict):
            raise ValueError("not an object")
    except ValueError as err:
        return str(err)
    return request
