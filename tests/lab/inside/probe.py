"""The isolation probe: runs inside the lab *as a guest* and tries to reach guests.

It is started by ``runner.run_probe`` with a guest's SELinux context (its
executable is a copy of python3 labelled ``qemu_exec_t``, an entrypoint of
``svirt_t`` and ``svirt_web_t``) and a uid/gid, and tries, against each
target guest: reading and writing its disk and console log, talking to its
control channel (UML: a datagram to the mconsole socket in its run dir; QEMU:
``pidfd_getfd`` of the QMP socket, fd 4, out of the hypervisor), listing
``/proc/PID/fd``, signalling (SIGCONT; signal 0) and ptracing
(``PTRACE_ATTACH``, then detach) its hypervisor.  Given a /dev/net/tun fd (``tun_fd``) and
a tap name (``tap``) it tries to attach that fd to the tap (``TUNSETIFF``).
Given ``reads`` (paths) it only opens each for reading: one denial each, for
``svirt explain`` to name; ``opens_rw`` (paths): opens each read-write and
writes nothing; ``connects`` (paths): connects a stream socket to each
(a guest agent's port) and sends nothing.

Standalone (stdlib only, run with ``python3 -I -S``): one JSON argument, one
JSON line out: ``{target: {action: "ok" | errno name}}``.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
import signal
import socket
import struct
import sys
from collections.abc import Callable
from functools import partial
from typing import Any

PTRACE_ATTACH, PTRACE_CONT, PTRACE_DETACH = 16, 7, 17
WALL = 0x40000000
SYS_PIDFD_GETFD = 438
QMP_FD = 4
TUNSETIFF = 0x400454CA
IFF_TAP, IFF_NO_PI, IFF_VNET_HDR = 0x0002, 0x1000, 0x4000
MCONSOLE = struct.Struct("=III512s")
MCONSOLE_MAGIC, MCONSOLE_VERSION = 0xCAFEBABE, 2

_libc = ctypes.CDLL(None, use_errno=True)


def _check(rc: int) -> int:
    if rc < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return rc


def attempt(action: Callable[[], object]) -> str:
    try:
        action()
    except TimeoutError:
        return "ETIMEDOUT"
    except OSError as err:
        return errno.errorcode.get(err.errno or 0, str(err.errno))
    return "ok"


def read_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.read(fd, 1)
    finally:
        os.close(fd)


def open_rw(path: str) -> None:
    os.close(os.open(path, os.O_RDWR | os.O_CLOEXEC))


def connect_unix(path: str, timeout: float = 5.0) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)


def write_disk(path: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.pwrite(fd, b"P", 8192)  # the tiny guests never look at their disk
    finally:
        os.close(fd)


def append_log(path: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
    try:
        os.write(fd, b"probe\n")
    finally:
        os.close(fd)


def mconsole_version(path: str, timeout: float = 5.0) -> None:
    request = MCONSOLE.pack(MCONSOLE_MAGIC, MCONSOLE_VERSION, 7, b"version")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        # a path beside the target (the guest is jailed in a network namespace
        # of its own, where an abstract address of ours does not exist); where
        # the probe may not write (another guest's directory), autobind
        mine = os.path.join(os.path.dirname(path), f"probe.{os.getpid()}")
        try:
            sock.bind(mine)
        except OSError:
            mine = ""
            sock.bind("")
        sock.settimeout(timeout)
        try:
            sock.sendto(request, path)
            reply = sock.recv(MCONSOLE.size)
        finally:
            if mine:
                os.unlink(mine)
        code, _more, length, data = MCONSOLE.unpack(reply.ljust(MCONSOLE.size, b"\0"))
        if code:
            raise OSError(errno.EPROTO, data[:length].decode(errors="replace"))


def qmp_fd(pid: int) -> None:
    pidfd = os.pidfd_open(pid)
    try:
        os.close(_check(_libc.syscall(SYS_PIDFD_GETFD, pidfd, QMP_FD, 0)))
    finally:
        os.close(pidfd)


def ptrace_attach(pid: int) -> None:
    """PTRACE_ATTACH, wait for its SIGSTOP (passing on any other signal), detach."""
    _check(_libc.ptrace(PTRACE_ATTACH, pid, None, None))
    while True:
        _, status = os.waitpid(pid, WALL)
        if not os.WIFSTOPPED(status):
            return  # it ended meanwhile
        sig = os.WSTOPSIG(status)
        if sig == signal.SIGSTOP:
            _check(_libc.ptrace(PTRACE_DETACH, pid, None, None))
            return
        _check(_libc.ptrace(PTRACE_CONT, pid, None, ctypes.c_void_p(sig)))


def tunsetiff(fd: int, name: str) -> None:
    ifr = struct.pack("16sH22x", name.encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR)
    fcntl.ioctl(fd, TUNSETIFF, ifr)


def probe_target(t: dict[str, Any]) -> dict[str, str]:
    pid = int(t["pid"])
    out: dict[str, str] = {}
    if t.get("disk"):
        out["disk.read"] = attempt(lambda: read_file(t["disk"]))
        out["disk.write"] = attempt(lambda: write_disk(t["disk"]))
    if t.get("log"):
        out["log.read"] = attempt(lambda: read_file(t["log"]))
        out["log.write"] = attempt(lambda: append_log(t["log"]))
    if t.get("mconsole"):
        out["control"] = attempt(lambda: mconsole_version(t["mconsole"],
                                                          t.get("mconsole_timeout", 5.0)))
    elif t.get("backend") == "qemu":
        out["control"] = attempt(lambda: qmp_fd(pid))
    out["proc.fd"] = attempt(lambda: os.listdir(f"/proc/{pid}/fd"))
    out["signal"] = attempt(lambda: os.kill(pid, signal.SIGCONT))
    out["signull"] = attempt(lambda: os.kill(pid, 0))
    out["ptrace"] = attempt(lambda: ptrace_attach(pid))
    return out


def main() -> None:
    args = json.loads(sys.argv[1])
    context = ""
    if args.get("read_context", True):  # the AppArmor lab: a guest's profile may not
        with open("/proc/self/attr/current") as f:
            context = f.read().rstrip("\0\n")
    result: dict[str, Any] = {"context": context, "uid": os.getuid()}
    for target in args.get("targets", []):
        result[target["name"]] = probe_target(target)
    if args.get("reads"):
        result["reads"] = {p: attempt(partial(read_file, p)) for p in args["reads"]}
    if args.get("opens_rw"):
        result["opens_rw"] = {p: attempt(partial(open_rw, p)) for p in args["opens_rw"]}
    if args.get("connects"):
        result["connects"] = {p: attempt(partial(connect_unix, p)) for p in args["connects"]}
    if args.get("tap"):
        result["tap"] = attempt(lambda: tunsetiff(int(args["tun_fd"]), args["tap"]))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
