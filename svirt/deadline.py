"""One deadline for one whole exchange with anything a guest controls.

A hostile hypervisor owns the far end of its QMP socket, its mconsole, its
console FIFOs and the shell on its console.  A time limit per read does not
bound an exchange: a peer that sends one byte just before each read would
time out holds it for days.  So every exchange takes one :class:`Deadline`
at its start, and every wait inside it (connect, send, each read) waits
only for what is left of it; when it has passed, the exchange ends with a
:class:`~svirt.errors.ControlError`, whatever the peer does.

The socket helpers here never block in the kernel: they poll for the time
left, then act with ``MSG_DONTWAIT`` (or on a non-blocking socket).
"""

from __future__ import annotations

import errno
import select
import socket
import time

from svirt.errors import ControlError

#: between two attempts to connect to a listener whose backlog is full (Linux
#: answers EAGAIN at once for a unix socket: there is nothing to poll on)
CONNECT_RETRY_SECONDS = 0.02


class Deadline:
    """A point in time (monotonic) that an exchange must end by."""

    __slots__ = ("end", "seconds", "what")

    def __init__(self, seconds: float, what: str = "the exchange") -> None:
        self.seconds = max(0.0, seconds)
        self.end = time.monotonic() + self.seconds
        self.what = what

    def left(self) -> float:
        """Seconds left (never negative)."""
        return max(0.0, self.end - time.monotonic())

    @property
    def expired(self) -> bool:
        return time.monotonic() >= self.end

    def within(self, seconds: float, what: str | None = None) -> Deadline:
        """A deadline ``seconds`` from now, but never later than this one."""
        sub = Deadline(min(seconds, self.left()), what or self.what)
        return sub

    def check(self) -> float:
        """The seconds left, or ControlError when none are."""
        left = self.end - time.monotonic()
        if left <= 0:
            raise ControlError(f"{self.what}: no answer within {self.seconds:g} s")
        return left

    def wait_for(self, fd: int, events: int) -> None:
        """Wait until ``fd`` has one of ``events`` (poll flags), or raise."""
        poller = select.poll()
        poller.register(fd, events)
        while True:
            left = self.check()
            if poller.poll(max(1, int(left * 1000) + 1)):
                return


def recv(sock: socket.socket, size: int, deadline: Deadline) -> bytes:
    """Up to ``size`` bytes from a stream socket, within ``deadline``; b"" at EOF."""
    while True:
        deadline.wait_for(sock.fileno(), select.POLLIN | select.POLLHUP | select.POLLERR)
        try:
            return sock.recv(size, socket.MSG_DONTWAIT)
        except BlockingIOError:
            continue  # another reader took it: wait again, for what is left
        except OSError as err:
            raise ControlError(f"{deadline.what}: {err.strerror or err}") from err


def recvmsg(sock: socket.socket, size: int, ancsize: int, deadline: Deadline
            ) -> tuple[bytes, list[tuple[int, int, bytes]], int, object]:
    """One datagram and its ancillary data, within ``deadline``."""
    while True:
        deadline.wait_for(sock.fileno(), select.POLLIN | select.POLLERR)
        try:
            return sock.recvmsg(size, ancsize, socket.MSG_DONTWAIT)
        except BlockingIOError:
            continue
        except OSError as err:
            raise ControlError(f"{deadline.what}: {err.strerror or err}") from err


def send_all(sock: socket.socket, data: bytes, deadline: Deadline) -> None:
    """All of ``data`` (a datagram: at once), within ``deadline``: a peer that
    never reads cannot hold the sender once its socket buffer is full."""
    view = memoryview(data)
    while view:
        deadline.wait_for(sock.fileno(), select.POLLOUT | select.POLLERR | select.POLLHUP)
        try:
            sent = sock.send(view, socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
        except BlockingIOError:
            continue
        except OSError as err:
            raise ControlError(f"{deadline.what}: {err.strerror or err}") from err
        if sock.type == socket.SOCK_DGRAM:
            return
        view = view[sent:]


def connect(sock: socket.socket, address: str, deadline: Deadline) -> None:
    """Connect ``sock`` (a unix socket) to ``address`` within ``deadline``.

    A blocking connect() to a listener that never accepts waits for as long
    as its backlog is full, that is for ever; here the socket is non-blocking
    while it connects: EAGAIN (backlog full) is tried again until the
    deadline, EINPROGRESS is polled for.  The socket is blocking again after."""
    sock.setblocking(False)
    try:
        while True:
            try:
                sock.connect(address)
                return
            except BlockingIOError as err:
                if err.errno == errno.EINPROGRESS:
                    deadline.wait_for(sock.fileno(), select.POLLOUT)
                    code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if code:
                        raise ControlError(f"{deadline.what}: {errno.errorcode.get(code, code)}"
                                           ) from None
                    return
                left = deadline.check()  # EAGAIN: the listener's backlog is full
                time.sleep(min(CONNECT_RETRY_SECONDS, left))
            except OSError as err:
                raise ControlError(f"{deadline.what}: {err.strerror or err}") from err
    finally:
        sock.setblocking(True)
