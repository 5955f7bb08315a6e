"""The mconsole client against a guest that lies: real sockets, real uids.

A stand-in "guest" (a forked process running as a guest uid) owns the home
directory and plays tricks with the mconsole socket path; the launcher side
must talk to that guest's own socket or to nothing.
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from svirt.backends.uml import MCONSOLE_MAGIC, mconsole_command
from svirt.errors import ControlError
from svirt.security.dac import DacDriver

UID = DacDriver().uid_base + 4100
OTHER = UID + 1


@pytest.fixture
def dirs(image_dir: Path) -> Iterator[tuple[Path, Path]]:
    home = image_dir / "home"
    home.mkdir(mode=0o700)
    os.chown(home, UID, UID)
    ctl = image_dir / "ctl"
    ctl.mkdir(mode=0o711)
    yield home, ctl


def _as(uid: int, fn: object) -> int:
    """Fork a child that becomes ``uid`` and runs ``fn``; return its pid."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
            fn()  # type: ignore[operator]
        finally:
            os._exit(0)
    return pid


def _server(path: Path, reply: bytes | None = None, count: int = 1) -> object:
    def serve() -> None:
        path.parent.mkdir(exist_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(str(path))
        os.write(w, b"!")
        sock.settimeout(5)
        for _ in range(count):
            try:
                data, addr = sock.recvfrom(1024)
            except TimeoutError:
                return
            answer = reply if reply is not None else struct.pack(
                "=III512s", 0, 0, 2, b"ok")
            sock.sendto(answer, addr)

    r, w = os.pipe()
    serve.ready = (r, w)  # type: ignore[attr-defined]
    return serve


def _run(uid: int, serve: object) -> int:
    r, w = serve.ready  # type: ignore[attr-defined]
    pid = _as(uid, serve)
    os.close(w)
    ok = os.read(r, 1)
    os.close(r)
    assert ok == b"!", "the stand-in guest could not start its server"
    return pid


def _reap(pid: int) -> None:
    try:
        os.kill(pid, 9)
    except ProcessLookupError:
        pass
    os.waitpid(pid, 0)


def test_talks_to_the_guests_own_socket(dirs: tuple[Path, Path]) -> None:
    home, ctl = dirs
    pid = _run(UID, _server(home / "g" / "mconsole"))
    try:
        assert mconsole_command(home, "g", "version", client_dir=ctl, guest_uid=UID,
                                guest_pid=pid) == "ok"
        assert os.listdir(ctl) == []  # the client socket is gone again
    finally:
        _reap(pid)


def test_symlinked_socket_or_umid_dir_is_refused(dirs: tuple[Path, Path], image_dir: Path
                                                  ) -> None:
    home, ctl = dirs
    elsewhere = image_dir / "elsewhere"
    elsewhere.mkdir()
    elsewhere.chmod(0o777)
    pid = _run(UID, _server(elsewhere / "x" / "mconsole"))
    try:
        (home / "g").mkdir()
        os.symlink(elsewhere / "x" / "mconsole", home / "g" / "mconsole")
        with pytest.raises(ControlError, match="symbolic link"):
            mconsole_command(home, "g", "cad", client_dir=ctl, guest_uid=UID, guest_pid=pid)
        os.symlink(elsewhere / "x", home / "h")
        with pytest.raises(ControlError, match="symbolic link"):
            mconsole_command(home, "h", "cad", client_dir=ctl, guest_uid=UID, guest_pid=pid)
    finally:
        _reap(pid)


def test_another_guests_socket_is_refused(dirs: tuple[Path, Path]) -> None:
    """A socket the guest did not create (another uid's) is never talked to."""
    home, ctl = dirs
    home.chmod(0o777)  # as if the guest had let the other in
    (home / "g").mkdir()
    os.chown(home / "g", OTHER, OTHER)
    (home / "g").chmod(0o777)
    pid = _run(OTHER, _server(home / "g" / "mconsole"))
    try:
        with pytest.raises(ControlError, match=f"belongs to uid {OTHER}"):
            mconsole_command(home, "g", "halt", client_dir=ctl, guest_uid=UID, guest_pid=pid)
    finally:
        _reap(pid)


@pytest.mark.parametrize("reply", [
    b"",
    b"\xff" * 3,
    struct.pack("=III512s", 1, 0, 10**6 % 2**32, b"boom"),
    struct.pack("=III", 0, 1, 600) + b"A" * 600,
    os.urandom(2000),
])
def test_garbage_replies_end_in_a_control_error(dirs: tuple[Path, Path], reply: bytes) -> None:
    home, ctl = dirs
    pid = _run(UID, _server(home / "g" / "mconsole", reply=reply, count=100))
    try:
        try:
            text = mconsole_command(home, "g", "cad", client_dir=ctl, guest_uid=UID,
                                    guest_pid=pid, timeout=2)
        except ControlError as err:
            assert len(err.message) < 400
        else:
            assert len(text) <= 64 * 512
    finally:
        _reap(pid)


def test_reply_from_another_process_of_the_uid_is_refused(dirs: tuple[Path, Path]) -> None:
    home, ctl = dirs
    pid = _run(UID, _server(home / "g" / "mconsole"))
    try:
        # the launcher believes the guest is pid 1: the real sender is not in its session
        with pytest.raises(ControlError, match="not the guest's"):
            mconsole_command(home, "g", "cad", client_dir=ctl, guest_uid=UID, guest_pid=1)
    finally:
        _reap(pid)
    assert MCONSOLE_MAGIC
