"""The guest agent client against a REAL qemu-ga (Debian's qemu-guest-agent 7.2).

qemu-ga runs on the host as an unprivileged uid of our own, in a private
home, on a socket root bound in a root-only directory and handed over as a
listening fd (host_agent.py): the same agent a guest runs, minus the
virtio-serial port.  So ``guest-exec`` runs host commands as that uid, and
the exact stdout, stderr, exit status, stdin, not-found and cannot-run
answers, and file copies both ways are qemu-ga's own.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import time
from collections.abc import Iterator

import pytest

from svirt.agent import AgentClient, AgentRefused, exit_status
from svirt.errors import AgentError, GuestCommandNotExecutable, GuestCommandNotFound

from .host_agent import QEMU_GA, HostAgent, host_agent

pytestmark = pytest.mark.skipif(not os.path.exists(QEMU_GA),
                                reason="qemu-ga missing (Debian package qemu-guest-agent)")


@pytest.fixture(scope="module")
def agent() -> Iterator[HostAgent]:
    with host_agent() as running:
        yield running


@pytest.fixture
def client(agent: HostAgent) -> Iterator[AgentClient]:
    sock = agent.connect()
    try:
        yield AgentClient(sock)
    finally:
        sock.close()


def test_ping_and_info(client: AgentClient) -> None:
    client.ping()
    info = client.info()
    assert info.version.startswith("7.")
    assert {"guest-exec", "guest-exec-status", "guest-file-open", "guest-file-read",
            "guest-file-write", "guest-file-close", "guest-sync-delimited"} <= info.commands


def test_stdout_stderr_status_apart(client: AgentClient) -> None:
    result = client.exec(["/bin/sh", "-c", "printf out; printf err >&2; exit 3"])
    assert (result.returncode, result.stdout, result.stderr) == (3, b"out", b"err")
    assert result.args == ["/bin/sh", "-c", "printf out; printf err >&2; exit 3"]
    assert exit_status(result) == 3
    assert not result.stdout_truncated and not result.stderr_truncated


def test_argv_is_argv(client: AgentClient) -> None:
    """Spaces, quotes, $ expansions, ; and newlines reach the command as they
    are: no shell in between."""
    words = ["a b", "'q'", '"d"', "$HOME", "; id", "x\ny", "*", "", "--"]
    result = client.exec(["printf", r"%s\0", *words])
    assert result.returncode == 0
    assert result.stdout == b"".join(w.encode() + b"\0" for w in words)


def test_stdin_binary(client: AgentClient) -> None:
    data = bytes(range(256)) * 4096 + b"\x00tail"  # 1 MiB and a bit, every byte value
    result = client.exec(["cat"], input=data)
    assert result.returncode == 0 and result.stdout == data and result.stderr == b""


def test_no_input_is_empty_stdin(client: AgentClient) -> None:
    result = client.exec(["wc", "-c"], timeout=10)
    assert result.stdout.strip() == b"0"


def test_runs_as_the_agents_uid(client: AgentClient, agent: HostAgent) -> None:
    assert client.exec(["id", "-u"]).stdout == f"{agent.uid}\n".encode()


def test_not_found_is_127(client: AgentClient) -> None:
    for argv in (["no-such-command-svirt"], ["/nonexistent/bin/x", "arg"]):
        with pytest.raises(GuestCommandNotFound) as info:
            client.exec(argv)
        assert exit_status(info.value) == 127
        assert "\n" not in str(info.value)
    client.ping()  # still in sync


def test_cannot_run_is_126(client: AgentClient, agent: HostAgent) -> None:
    client.copy_to_guest(io.BytesIO(b"#!/bin/sh\necho hi\n"), str(agent.home / "noexec"))
    for path in (str(agent.home / "noexec"), "/etc", "/etc/passwd"):
        with pytest.raises(GuestCommandNotExecutable) as info:
            client.exec([path])
        assert exit_status(info.value) == 126


def test_signal_is_128_plus(client: AgentClient) -> None:
    result = client.exec(["/bin/sh", "-c", "echo before; kill -TERM $$"])
    assert result.returncode == -15 and result.stdout == b"before\n"
    assert exit_status(result) == 143


def test_terminal_orders_in_output_stay_bytes(client: AgentClient) -> None:
    orders = b"\x1b]52;c;aGk=\x07\x1b[6n\x9b\xff\r\x00"
    result = client.exec(["cat"], input=orders)
    assert result.stdout == orders


def test_large_output_exact(client: AgentClient) -> None:
    result = client.exec(["head", "-c", str(3 << 20), "/dev/urandom"])
    assert len(result.stdout) == 3 << 20


def test_output_over_the_bound_then_in_sync(client: AgentClient) -> None:
    """An honest reply over the caller's bound is an error; the stale rest
    of it is discarded by the next sync."""
    with pytest.raises(AgentError, match="a reply over"):
        client.exec(["head", "-c", str(2 << 20), "/dev/zero"], max_output=1 << 20)
    assert client.exec(["echo", "next"]).stdout == b"next\n"


def test_timeout_then_in_sync(client: AgentClient) -> None:
    start = time.monotonic()
    with pytest.raises(AgentError, match="did not exit within 0.5 s"):
        client.exec(["sleep", "3"], timeout=0.5)
    assert time.monotonic() - start < 1.5
    assert client.exec(["true"]).returncode == 0


def test_copy_both_ways_binary(client: AgentClient, agent: HostAgent) -> None:
    data = os.urandom((3 << 20) + 12345)  # not a multiple of the chunk
    guest_path = str(agent.home / "blob")
    assert client.copy_to_guest(io.BytesIO(data), guest_path) == len(data)
    st = os.stat(guest_path)
    assert st.st_uid == agent.uid  # written by the agent, not by root
    assert client.exec(["sha256sum", guest_path]).stdout.split()[0] == (
        hashlib.sha256(data).hexdigest().encode())
    out = io.BytesIO()
    assert client.copy_from_guest(guest_path, out) == len(data)
    assert out.getvalue() == data


def test_copy_empty_file(client: AgentClient, agent: HostAgent) -> None:
    path = str(agent.home / "empty")
    assert client.copy_to_guest(io.BytesIO(b""), path) == 0
    out = io.BytesIO()
    assert client.copy_from_guest(path, out) == 0 and out.getvalue() == b""


def test_copy_from_a_missing_or_forbidden_file(client: AgentClient) -> None:
    for path, words in (("/nonexistent/f", "No such file"), ("/etc/shadow", "Permission denied")):
        with pytest.raises(AgentRefused, match=words) as info:
            client.copy_from_guest(path, io.BytesIO())
        assert exit_status(info.value) == 125
    client.ping()


def test_copy_from_over_max_bytes(client: AgentClient, agent: HostAgent) -> None:
    path = agent.home / "big"
    shutil.copyfile("/usr/sbin/qemu-ga", path)
    out = io.BytesIO()
    with pytest.raises(AgentError, match="is over 4096 bytes"):
        client.copy_from_guest(str(path), out, max_bytes=4096)
    assert out.tell() == 0  # the first chunk already passed the bound: nothing written
    client.ping()  # the handle was closed in sync
