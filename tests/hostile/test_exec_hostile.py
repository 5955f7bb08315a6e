"""svirt exec and cp against a hostile agent, a hostile terminal payload, a
second client, a guest that would swap the agent socket, and a guest uid
that would read another guest's seed.

The hypervisor owns the virtio channel, so what answers on the launcher's
agent socket is the guest's: here it is agent_standin.py (a qemu-ga that
floods, stalls and answers garbage), accepted on a socket bound by the
launcher's own :func:`~svirt.launcher.channels.listen_agent` in a run
directory laid out as the registry lays it out, and reached by the real
``svirt exec`` in its own process.  Each attack must end in exit 125 with
one ``svirt: error:`` line (a hint line at most) within the exchange's
deadline.
"""

from __future__ import annotations

import errno
import os
import pty
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from svirt.deadline import Deadline
from svirt.launcher.channels import AGENT_SOCKET, agent_lock, listen_agent
from svirt.launcher.registry import Registry
from svirt.resources import Access
from svirt.security.base import Label
from svirt.security.dac import DacDriver

from ..integration.helpers import as_uid
from .agent_standin import ESCAPES_ERR, ESCAPES_OUT
from .helpers import UID_BASE

STANDIN = Path(__file__).with_name("agent_standin.py")
PYTHON = "/usr/bin/python3"
SVIRT = str(Path(sys.executable).with_name("svirt"))
NAME = "hostile-agent"
#: process start of the CLI (~0.3 s) and scheduling on 2 busy cores
SLACK = 2.5


@dataclass
class Channel:
    run_dir: Path
    scenario: list[str]  # what the next accepted client meets


@pytest.fixture
def channel(dirs: tuple[Path, Path]) -> Iterator[Channel]:
    """A guest's run directory (root's, 0755) with the launcher's agent
    listener; each accepted client gets a stand-in of ``scenario[0]``."""
    run_root, state = dirs
    registry = Registry(run_root, state)
    registry.guests.mkdir(parents=True, exist_ok=True)
    registry.record_path(NAME).write_text("{}")  # exec asks only whether it exists
    run_dir = registry.run_dir(NAME)
    run_dir.mkdir(parents=True, mode=0o755)
    listener, _path = listen_agent(run_dir)
    ch = Channel(run_dir, ["honest"])
    procs: list[subprocess.Popen[bytes]] = []
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            if not select.select([listener], [], [], 0.1)[0]:
                continue
            conn, _ = listener.accept()
            procs.append(subprocess.Popen(  # noqa: S603 - fixed argv
                [PYTHON, "-I", str(STANDIN), ch.scenario[0], str(conn.fileno())],
                pass_fds=(conn.fileno(),), stdin=subprocess.DEVNULL))
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield ch
    stop.set()
    thread.join(5)
    listener.close()
    for p in procs:
        p.kill()  # our own children, by pid
        p.wait(timeout=10)


def svirt(*args: str, **kw: object) -> tuple[subprocess.CompletedProcess[bytes], float]:
    start = time.monotonic()
    done = subprocess.run([SVIRT, *args], capture_output=True, timeout=120,  # noqa: S603
                          check=False, **kw)  # type: ignore[call-overload]
    return done, time.monotonic() - start


def one_error(done: subprocess.CompletedProcess[bytes]) -> str:
    lines = done.stderr.decode(errors="replace").splitlines()
    assert [line for line in lines if line.startswith("svirt: error:")] and len(lines) <= 2, lines
    assert all(line.startswith(("svirt: error:", "svirt: hint:")) for line in lines), lines
    assert b"\x1b" not in done.stderr and len(lines[0]) < 400
    return lines[0]


ATTACKS = {
    # scenario: what the one-line error says
    "sync-flood": "no sync sentinel",
    "sync-sentinels": "sync",
    "status-flood": "a reply over",
    "big-b64": "over",
    "never-exits": "did not exit within",
    "exit-huge": "exitcode",
    "exit-both": "exitcode",
    "pid-str": "pid",
    "bad-b64": "base64",
}


@pytest.mark.parametrize("scenario", sorted(ATTACKS))
def test_hostile_agent_gets_one_line_and_125(channel: Channel, scenario: str) -> None:
    channel.scenario[0] = scenario
    done, elapsed = svirt("exec", "--timeout", "3", NAME, "--", "true",
                          stdin=subprocess.DEVNULL)
    assert done.returncode == 125, done.stderr
    assert done.stdout == b""
    assert ATTACKS[scenario] in one_error(done)
    assert elapsed < 3 + SLACK, elapsed


def test_garbage_before_the_answer_is_skipped(channel: Channel) -> None:
    channel.scenario[0] = "sync-garbage"
    done, _ = svirt("exec", NAME, "--", "true", stdin=subprocess.DEVNULL)
    assert (done.returncode, done.stdout) == (0, b"ok\n")


def test_escapes_raw_to_a_pipe_filtered_on_a_terminal(channel: Channel) -> None:
    channel.scenario[0] = "escapes"
    done, _ = svirt("exec", NAME, "--", "true", stdin=subprocess.DEVNULL)
    assert (done.returncode, done.stdout, done.stderr) == (3, ESCAPES_OUT, ESCAPES_ERR)
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen([SVIRT, "exec", NAME, "--", "true"],  # noqa: S603
                                stdin=subprocess.DEVNULL, stdout=slave, stderr=slave)
        os.close(slave)
        seen = b""
        end = time.monotonic() + 60
        while time.monotonic() < end:
            if select.select([master], [], [], 0.5)[0]:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: the terminal's last writer is gone
                    break
                if not chunk:
                    break
                seen += chunk
        assert proc.wait(timeout=30) == 3
    finally:
        os.close(master)
    for order in (b"\x1b]52", b"\x1b[6n", b"\x1b[c", b"\x1bP", b"\x1b]0;", b"\x9b"):
        assert order not in seen, (order, seen)
    assert b"0c" in seen  # the text around the orders is kept


def test_a_second_client_waits_boundedly(channel: Channel) -> None:
    with agent_lock(channel.run_dir, Deadline(5), NAME):  # the first client
        done, elapsed = svirt("exec", "--timeout", "2", NAME, "--", "true",
                              stdin=subprocess.DEVNULL)
    assert done.returncode == 125
    assert "another svirt exec or cp" in one_error(done)
    assert 1.5 < elapsed < 2 + SLACK
    done, _ = svirt("exec", NAME, "--", "true", stdin=subprocess.DEVNULL)  # then it is free
    assert done.returncode == 0


def test_the_guest_cannot_swap_the_agent_socket(channel: Channel, tmp_path: Path) -> None:
    """The socket is in root's run directory: the guest's uid can neither
    remove, rename nor replace it; one that is not root's socket (a symlink,
    another owner's) is refused by exec, never followed."""
    guest = UID_BASE + 3
    sock = channel.run_dir / AGENT_SOCKET
    fake = str(channel.run_dir / "fake")
    assert as_uid(guest, lambda: os.unlink(sock)) == errno.EACCES
    assert as_uid(guest, lambda: os.rename(sock, fake)) == errno.EACCES
    assert as_uid(guest, lambda: os.symlink("/etc/shadow", fake)) == errno.EACCES
    st = sock.lstat()
    assert (st.st_uid, st.st_mode & 0o777) == (0, 0o600)
    os.rename(sock, channel.run_dir / "real")  # what a breach of root's dir would allow
    try:
        os.symlink(channel.run_dir / "real", sock)
        done, _ = svirt("exec", NAME, "--", "true", stdin=subprocess.DEVNULL)
        assert done.returncode == 125 and "not a socket" in one_error(done)
        sock.unlink()
        other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        other.bind(str(sock))
        os.chown(sock, guest, guest)
        done, _ = svirt("exec", NAME, "--", "true", stdin=subprocess.DEVNULL)
        assert done.returncode == 125 and "not a socket of root's" in one_error(done)
        other.close()
    finally:
        sock.unlink(missing_ok=True)


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory every uid may traverse (pytest's tmp is 0700)."""
    path = Path(tempfile.mkdtemp(prefix="svirt-hseed-", dir="/var/tmp"))  # noqa: S108
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_another_guest_uid_cannot_read_the_seed(open_dir: Path) -> None:
    """The seed as the launch leaves it (root's, 0400, DAC's private
    read-only ACL): its guest reads it; another guest's uid cannot read it,
    and its own guest can neither write it nor change its mode."""
    seed = open_dir / "seed.iso"
    seed.write_bytes(b"cidata secret")
    seed.chmod(0o400)
    uid = UID_BASE + 5
    label = Label("dac", f"{uid}:{uid}", f"{uid}:{uid}", f"{uid}:{uid}", f"{uid}:{uid}")
    fd = os.open(seed, os.O_PATH)
    try:
        DacDriver(uid_base=UID_BASE).apply(fd, os.fstat(fd).st_mode, Access.PRIVATE_RO, label)
    finally:
        os.close(fd)

    def read() -> None:
        with open(seed, "rb") as f:
            assert f.read() == b"cidata secret"

    assert as_uid(uid, read) == 0
    for other in (uid + 1, UID_BASE, UID_BASE + 999):
        assert as_uid(other, read) == errno.EACCES
    assert as_uid(uid, lambda: os.close(os.open(seed, os.O_WRONLY))) == errno.EACCES
    assert as_uid(uid, lambda: os.chmod(seed, 0o444)) == errno.EPERM


def test_guest_exec_api_is_bounded_too(channel: Channel) -> None:
    """Guest.exec and GuestHandle.exec share the CLI's session: the same
    deadline holds for a stand-in that never says the command exited."""
    from svirt.errors import AgentError
    from svirt.launcher.channels import run_in_guest

    channel.scenario[0] = "never-exits"
    start = time.monotonic()
    with pytest.raises(AgentError) as err:
        run_in_guest(channel.run_dir / AGENT_SOCKET, NAME, ["true"], timeout=2)
    assert time.monotonic() - start < 2 + SLACK
    assert "\n" not in str(err.value) and err.value.exit_status == 125
    with pytest.raises(AgentError, match="has no guest agent"):
        run_in_guest(None, NAME, ["true"])


def test_cp_bounded_and_never_in_a_guests_directory(channel: Channel, open_dir: Path) -> None:
    """A guest file that never ends: cp stops at its deadline, exit 125, and
    removes what it wrote; a host directory a guest uid owns (it could swap
    the name under root) is refused before anything is opened in it."""
    channel.scenario[0] = "read-endless"
    dst = open_dir / "copy"
    done, elapsed = svirt("cp", "--timeout", "2", f"{NAME}:/dev/zero", str(dst))
    assert done.returncode == 125 and elapsed < 2 + SLACK
    one_error(done)
    assert not dst.exists()
    guests = open_dir / "guest-owned"
    guests.mkdir()
    os.chown(guests, UID_BASE + 3, UID_BASE + 3)
    channel.scenario[0] = "honest"
    for argv in (("cp", f"{NAME}:/etc/hostname", str(guests / "x")),
                 ("cp", str(guests / "x"), f"{NAME}:/tmp/x")):
        done, _ = svirt(*argv)
        assert done.returncode == 125 and "belongs to a guest's uid" in one_error(done)
    assert list(guests.iterdir()) == []
