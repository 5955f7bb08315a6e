"""Console and control channels a later supervisor can open again.

A guest started by ``svirt start`` outlives the process that started it, so
its channels cannot be socketpairs (gone with that process).  Instead, in its
run directory (root's, 0755; never the guest's ``home/``):

``console.out``, ``console.in``
    FIFOs, 0600 root.  The hypervisor holds each open read-write, so it never
    sees EOF or EPIPE while no supervisor is there, and output waits in the
    pipe (1 MiB) until the next supervisor drains it.  The supervisor's ends
    are read-write as well, so nothing the guest does with its side (closing
    it) stops a supervisor from opening them.
``qmp.sock``
    QEMU's QMP: a socket the launcher binds and listens on, handed to QEMU as
    a listening fd (``-chardev socket,fd=N,server=on``); supervisors connect
    by path.

Every open goes through the run directory's fd with ``O_NOFOLLOW``, and each
object must be root's and of the expected type: a path a guest could change
is never followed.
"""

from __future__ import annotations

import fcntl
import os
import socket
import stat
from pathlib import Path

from svirt.deadline import Deadline, connect
from svirt.errors import ControlError

CONSOLE_IN = "console.in"
CONSOLE_OUT = "console.out"
QMP_SOCKET = "qmp.sock"
F_SETPIPE_SZ = 1031
PIPE_BYTES = 1 << 20
CONNECT_SECONDS = 5.0  # connecting to a QMP listener (QEMU's to accept)


def _dir_fd(run_dir: Path) -> int:
    fd = os.open(run_dir, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    st = os.fstat(fd)
    if st.st_uid != 0 and st.st_uid != os.geteuid():
        os.close(fd)
        raise ControlError(f"{run_dir} is not root's: its channels are not trusted")
    return fd


def _open_fifo(dfd: int, name: str, flags: int) -> int:
    fd = os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
    st = os.fstat(fd)
    if not stat.S_ISFIFO(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
        os.close(fd)
        raise ControlError(f"{name}: not a FIFO of root's alone")
    return fd


def console_fifos(run_dir: Path, *, create: bool) -> tuple[int, int, int, int]:
    """(hypervisor in, hypervisor out, supervisor read, supervisor write) when
    creating; with ``create=False`` (adopting) the first two are -1."""
    dfd = _dir_fd(run_dir)
    opened: list[int] = []
    try:
        if create:
            for name in (CONSOLE_IN, CONSOLE_OUT):
                os.mkfifo(name, 0o600, dir_fd=dfd)
            opened.append(_open_fifo(dfd, CONSOLE_IN, os.O_RDWR))
            opened.append(_open_fifo(dfd, CONSOLE_OUT, os.O_RDWR))
            fcntl.fcntl(opened[-1], F_SETPIPE_SZ, PIPE_BYTES)
        else:
            opened += [-1, -1]
        # the supervisor's ends are read-write too: opening a FIFO O_RDWR never
        # waits and never fails with ENXIO (the guest may have closed its
        # side: a write-only open would then be refused, and the guest could
        # not be adopted, stopped or fenced); input then waits in the pipe
        # until the write deadline, output never sees EOF
        for name in (CONSOLE_OUT, CONSOLE_IN):
            try:
                opened.append(_open_fifo(dfd, name, os.O_RDWR | os.O_NONBLOCK))
            except OSError as err:
                raise ControlError(f"{run_dir}/{name}: {err.strerror}") from err
        return opened[0], opened[1], opened[2], opened[3]
    except BaseException:
        for fd in opened:
            if fd >= 0:
                os.close(fd)
        raise
    finally:
        os.close(dfd)


def listen_private(path: Path, backlog: int = 1) -> socket.socket:
    """A unix socket listening at ``path``, 0600 (its directory must be root's)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        old = os.umask(0o177)
        try:
            sock.bind(str(path))
        finally:
            os.umask(old)
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock


def listen_control(run_dir: Path) -> tuple[socket.socket, Path]:
    """A listening socket at ``run_dir/qmp.sock`` (0600 root)."""
    path = run_dir / QMP_SOCKET
    return listen_private(path), path


def connect_control(path: Path, deadline: Deadline | None = None) -> socket.socket:
    """Connect to a detached guest's QMP socket: through an O_PATH fd of the
    checked inode (root's socket in a root directory), never a followed link,
    within ``deadline`` (else :data:`CONNECT_SECONDS`): QEMU holds the
    listening end, and one that never accepts fills its backlog, after
    which a blocking connect() would wait for ever."""
    deadline = deadline or Deadline(CONNECT_SECONDS, "connect")
    dfd = _dir_fd(path.parent)
    try:
        fd = os.open(path.name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
    except OSError as err:
        raise ControlError(f"{path}: {err.strerror}") from err
    finally:
        os.close(dfd)
    try:
        st = os.fstat(fd)
        if not stat.S_ISSOCK(st.st_mode) or st.st_uid != os.geteuid():
            raise ControlError(f"{path}: not a socket of root's")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            connect(sock, f"/proc/self/fd/{fd}", deadline)
        except ControlError as err:
            sock.close()
            raise ControlError(f"{path}: {err.message}") from err
        return sock
    finally:
        os.close(fd)
