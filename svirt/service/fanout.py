"""Console fan-out: a detached guest's console output to its rotated log and
to every attached ``svirt console``, and one attached console's keys back to
the guest.  The guest's console pump never waits for a reader: a reader that
cannot keep up loses output."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from svirt.errors import SvirtError
from svirt.service.logs import RotatingLog
from svirt.service.notes import SupervisorLog
from svirt.service.server import reply

if TYPE_CHECKING:
    from svirt.launcher.launch import Guest

#: what a console sees of the guest's output when it attaches
GREETING_TAIL = 2048


class Fanout:
    """A guest's console output: to its rotated log and to every attached
    ``svirt console`` (never blocking the pump: a reader that cannot keep up
    loses output, the guest never waits)."""

    def __init__(self, log: RotatingLog, notes: SupervisorLog) -> None:
        self.log = log
        self.notes = notes
        self.readers: list[socket.socket] = []
        self.lock = threading.Lock()
        self.writer = threading.Lock()  # one attached console may type at a time

    def write(self, data: bytes) -> None:
        """Never raises: this runs on the guest's console pump."""
        try:
            self.log.write(data)
        except Exception as err:  # noqa: BLE001 - a full disk must not stop the console
            why = err.strerror if isinstance(err, OSError) else repr(err)
            self.notes.note(f"console log {self.log.path}: {why} (output past the cap "
                            f"is dropped: {self.log.dropped} bytes so far)",
                            subject=f"log:{self.log.path}")
        with self.lock:
            for reader in list(self.readers):
                try:
                    reader.send(data, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    pass
                except OSError:
                    self.readers.remove(reader)

    def add(self, reader: socket.socket) -> None:
        with self.lock:
            self.readers.append(reader)

    def remove(self, reader: socket.socket) -> None:
        with self.lock:
            if reader in self.readers:
                self.readers.remove(reader)

    def close(self) -> None:
        with self.lock:
            for reader in self.readers:
                try:
                    reader.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            self.readers.clear()
        try:
            self.log.close()
        except OSError as err:
            self.notes.note(f"console log {self.log.path}: {err.strerror}")

    def attach(self, conn: socket.socket, name: str, guest: Callable[[], Guest | None],
               read_only: bool) -> None:
        """Attach ``conn`` until either side ends: the output (after the last
        GREETING_TAIL bytes) to conn, conn's bytes to the current run of the
        guest (``guest()``: a restart is a new one) unless ``read_only``;
        one writer at a time, any number of readers."""
        first = guest()
        if first is None:
            reply(conn, {"ok": False, "error": f"guest {name} has no console now"})
            return
        if not read_only and not self.writer.acquire(blocking=False):
            reply(conn, {"ok": False, "kind": "StateError",
                         "error": f"another console is attached to {name} for typing",
                         "hint": "svirt console --read-only NAME watches alongside it"})
            return
        try:
            reply(conn, {"ok": True, "name": name, "read_only": read_only})
            conn.sendall(first.console.tail(GREETING_TAIL).encode())
            self.add(conn)
            while data := conn.recv(4096):
                now = guest()
                if read_only or now is None or not now.running:
                    continue
                try:
                    now.console.send(data, 5.0)
                except SvirtError:
                    pass
        finally:
            self.remove(conn)
            if not read_only:
                self.writer.release()
