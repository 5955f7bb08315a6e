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

``agent.sock``, ``agent.lock``
    The guest agent's port (``agent = true``): a socket the launcher binds
    and listens on, handed to QEMU as a listening fd like ``qmp.sock``, for
    foreground and detached guests alike; ``svirt exec``/``cp`` and
    ``Guest.exec`` connect to it by path, one client at a time: each holds
    an ``flock`` on ``agent.lock`` (0600 root), waited for boundedly.

Every open goes through the run directory's fd with ``O_NOFOLLOW``, and each
object must be root's and of the expected type: a path a guest could change
is never followed.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import stat
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from svirt.agent import AGENT_SECONDS, EXEC_SECONDS, AgentClient, ExecResult
from svirt.deadline import Deadline, connect
from svirt.errors import AgentError, ControlError

CONSOLE_IN = "console.in"
CONSOLE_OUT = "console.out"
QMP_SOCKET = "qmp.sock"
F_SETPIPE_SZ = 1031
PIPE_BYTES = 1 << 20
CONNECT_SECONDS = 5.0  # connecting to a QMP listener (QEMU's to accept)
AGENT_SOCKET = "agent.sock"
AGENT_LOCK = "agent.lock"
#: how long a second agent client waits for the first, at most
AGENT_LOCK_SECONDS = 30.0
NO_AGENT_HINT = ("give the guest an agent (agent = true in its spec, QEMU only, and "
                 "qemu-guest-agent in the guest); svirt run SPEC -- CMD runs a command on "
                 "its console shell instead")


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


def listen_agent(run_dir: Path) -> tuple[socket.socket, Path]:
    """A listening socket at ``run_dir/agent.sock`` (0600 root), for QEMU's
    agent port; backlog 1: one client at a time (the lock orders them)."""
    path = run_dir / AGENT_SOCKET
    return listen_private(path), path


@contextlib.contextmanager
def agent_lock(run_dir: Path, deadline: Deadline, guest: str) -> Iterator[None]:
    """Hold ``run_dir/agent.lock`` (made 0600 root through the directory's
    fd, never followed), waiting for another client at most until
    ``deadline``: then AgentError."""
    dfd = _dir_fd(run_dir)
    try:
        fd = os.open(AGENT_LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
                     | os.O_NONBLOCK, 0o600, dir_fd=dfd)
    except OSError as err:
        raise AgentError(f"guest {guest}: {run_dir / AGENT_LOCK}: {err.strerror}") from err
    finally:
        os.close(dfd)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
            raise AgentError(f"guest {guest}: {AGENT_LOCK}: not a file of root's alone")
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if deadline.expired:
                    raise AgentError(
                        f"guest {guest}: another svirt exec or cp used its agent for "
                        f"{deadline.seconds:g} s", hint="try again when it has ended") \
                        from None
                time.sleep(min(0.02, deadline.left()))
        yield
    finally:
        os.close(fd)  # the lock goes with it


@contextlib.contextmanager
def agent_session(agent_path: Path, guest: str, deadline: Deadline,
                  lock_seconds: float = AGENT_LOCK_SECONDS) -> Iterator[AgentClient]:
    """A client of the guest's agent at ``agent_path`` (``run_dir/agent.sock``),
    alone on it: the lock (waited for until ``deadline``, and at most
    ``lock_seconds``), then a connection through :func:`connect_control`
    within the same deadline.  A guest without an agent socket: AgentError
    with a hint."""
    if not os.path.lexists(agent_path):
        raise AgentError(f"guest {guest} has no guest agent", hint=NO_AGENT_HINT)
    with agent_lock(agent_path.parent, deadline.within(lock_seconds), guest):
        try:
            sock = connect_control(agent_path, deadline.within(CONNECT_SECONDS))
        except ControlError as err:
            raise AgentError(f"guest {guest}: agent: {err.message}") from err
        try:
            yield AgentClient(sock, timeout=max(0.1, min(AGENT_SECONDS, deadline.left())))
        finally:
            sock.close()


def run_in_guest(agent_path: Path | None, guest: str, argv: Sequence[str], *,
                 input: bytes | None = None, timeout: float = EXEC_SECONDS) -> ExecResult:
    """``argv`` run in ``guest`` through its agent socket (None: it has none),
    the lock, the connection and the command within one ``timeout``."""
    if agent_path is None:
        raise AgentError(f"guest {guest} has no guest agent", hint=NO_AGENT_HINT)
    deadline = Deadline(timeout, f"guest {guest}: exec")
    with agent_session(agent_path, guest, deadline) as client:
        return client.exec(argv, input=input, timeout=max(0.0, deadline.left()))
