"""A hostile guest agent: the client stays bounded in time, memory and words.

The stand-in (agent_standin.py, its own process) answers like qemu-ga 7.2
and attacks where its scenario says: it floods (1 GiB, no newline; 100 MiB
of base64), stalls mid-reply, trickles, closes mid-reply, answers garbage,
another request's id, impossible exit codes, never says ``exited``, and puts
terminal orders in its output and its error text.  Each attack must end in
one :class:`AgentError` of one line, within the exchange's deadline, with the
client's peak RSS (VmHWM, reset through /proc/self/clear_refs) grown by no
more than the documented bound.  No mock: the client is the real one, on a
real socket; only the far end is a stand-in, because qemu-ga cannot be made
to misbehave.
"""

from __future__ import annotations

import io
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from svirt.agent import (
    MAX_OUTPUT,
    SMALL_REPLY,
    AgentClient,
    AgentRefused,
    exit_status,
)
from svirt.errors import AgentError

STANDIN = Path(__file__).with_name("agent_standin.py")
PYTHON = "/usr/bin/python3"
MiB = 1 << 20
#: slack on top of an exchange's deadline: process start, scheduling on 2 busy cores
SLACK = 1.5
#: the client's peak RSS growth for an attack on a small reply: buffers of
#: SMALL_REPLY and one recv of at most 1 MiB
SMALL_GROWTH = 8 * MiB
#: ... on guest-exec-status: a line of at most the base64 of MAX_OUTPUT (21.4
#: MiB) in a bytearray that over-allocates by an eighth, and one recv
STATUS_GROWTH = 40 * MiB


def _vm(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise AssertionError(field)


class Standin:
    def __init__(self, scenario: str) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.proc = subprocess.Popen(  # noqa: S603 - fixed argv
            [PYTHON, "-I", str(STANDIN), scenario, str(theirs.fileno())],
            pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL)
        theirs.close()
        self.sock = ours

    def close(self) -> None:
        self.sock.close()
        self.proc.kill()  # our own child, by its pid
        self.proc.wait(timeout=10)


@pytest.fixture
def standin() -> Iterator[Callable[[str], AgentClient]]:
    started: list[Standin] = []

    def start(scenario: str) -> AgentClient:
        s = Standin(scenario)
        started.append(s)
        return AgentClient(s.sock, timeout=2.0)

    yield start
    for s in started:
        s.close()


def attack(op: Callable[[], Any], deadline: float, growth: int) -> AgentError:
    """Run ``op``: it must raise one AgentError of one line within
    ``deadline`` (+ slack), the peak RSS growing by less than ``growth``."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
    before = _vm("VmRSS")
    start = time.monotonic()
    with pytest.raises(AgentError) as info:
        op()
    elapsed = time.monotonic() - start
    grown = _vm("VmHWM") - before
    err = info.value
    text = str(err)
    assert "\n" not in text and "\r" not in text and "\x1b" not in text, text
    assert len(text) < 400, text
    assert elapsed < deadline + SLACK, (elapsed, text)
    assert grown < growth, (grown, text)
    assert exit_status(err) == 125
    return err


SMALL_ATTACKS = {
    # scenario: what the one-line error says
    "sync-flood": "no sync sentinel in",
    "sync-sentinels": "sync",
    "line-flood": f"a reply over {SMALL_REPLY} bytes",
    "stall": "no answer within",
    "trickle": "no answer within",
    "close-mid": "closed the channel mid-reply",
    "close": "closed the channel",
    "wrong-id": "a reply to another request",
    "no-id": "a reply to another request",
    "deep-json": "not JSON",
    "digits": "not JSON",
    "not-utf8": "not JSON",
}


@pytest.mark.parametrize("scenario", sorted(SMALL_ATTACKS))
def test_ping_attacks(standin: Callable[[str], AgentClient], scenario: str) -> None:
    client = standin(scenario)
    err = attack(lambda: client.ping(timeout=2.0), 2.0, SMALL_GROWTH)
    assert SMALL_ATTACKS[scenario] in err.message


def test_sync_finds_the_answer_behind_garbage(standin: Callable[[str], AgentClient]) -> None:
    """Garbage, stale replies, a wrong token and a sentinel inside junk come
    before the real answer: the sync finds it and the next call works."""
    client = standin("sync-garbage")
    client.ping(timeout=2.0)
    assert client.exec(["true"], timeout=2.0).stdout == b"ok\n"


def test_error_text_is_escaped_on_one_line(standin: Callable[[str], AgentClient]) -> None:
    client = standin("error-escapes")
    err = attack(lambda: client.ping(timeout=2.0), 2.0, SMALL_GROWTH)
    assert isinstance(err, AgentRefused)
    assert "\\x1b]0;pwned" in err.message and "\\u202e" in err.message
    assert "\x1b" in err.desc  # the raw words stay available, as data


STATUS_ATTACKS = {
    "status-flood": "a reply over",
    "big-b64": "a reply over",
    "exit-huge": "exitcode is not an integer in [0, 255]",
    "exit-str": "exitcode is not an integer",
    "exit-neg": "exitcode is not an integer",
    "exit-bool": "exitcode is not an integer",
    "exit-none": "need one of exitcode and signal",
    "exit-both": "need one of exitcode and signal",
    "exited-str": "no 'exited'",
    "bad-b64": "stdout is not valid base64",
    "pid-neg": "guest-exec's pid is not an integer",
    "pid-str": "guest-exec's pid is not an integer",
}


@pytest.mark.parametrize("scenario", sorted(STATUS_ATTACKS))
def test_exec_attacks(standin: Callable[[str], AgentClient], scenario: str) -> None:
    client = standin(scenario)
    err = attack(lambda: client.exec(["true"], timeout=5.0), 5.0, STATUS_GROWTH)
    assert STATUS_ATTACKS[scenario] in err.message


def test_never_exits_ends_at_the_deadline(standin: Callable[[str], AgentClient]) -> None:
    client = standin("never-exits")
    start = time.monotonic()
    err = attack(lambda: client.exec(["sleep", "infinity"], timeout=1.5), 1.5, SMALL_GROWTH)
    assert "did not exit within 1.5 s" in err.message
    assert time.monotonic() - start >= 1.4  # it did wait, with backoff, not give up early


def test_output_bound_is_the_callers(standin: Callable[[str], AgentClient]) -> None:
    """A smaller ``max_output`` is a smaller line bound: the 100 MiB reply is
    cut off after the base64 of 1 MiB, and memory follows."""
    client = standin("big-b64")
    err = attack(lambda: client.exec(["true"], timeout=5.0, max_output=MiB), 5.0, SMALL_GROWTH)
    assert "a reply over" in err.message
    assert MAX_OUTPUT > MiB


def test_terminal_orders_in_output_are_bytes(standin: Callable[[str], AgentClient]) -> None:
    """OSC 52, status queries, C1 CSI, DCS and invalid UTF-8 in stdout and
    stderr come back exactly, as bytes, nothing decoded or interpreted."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("agent_standin", STANDIN)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    client = standin("escapes")
    result = client.exec(["cat"], timeout=2.0)
    assert (result.returncode, result.stdout, result.stderr) == (
        3, module.ESCAPES_OUT, module.ESCAPES_ERR)
    assert isinstance(result.stdout, bytes) and exit_status(result) == 3


FILE_ATTACKS: dict[str, tuple[str, str]] = {
    # scenario: (direction, what the error says)
    "read-endless": ("from", "is over 4194304 bytes"),
    "read-empty": ("from", "reads without data or end"),
    "read-more": ("from", "guest-file-read's count is not an integer"),
    "read-lies": ("from", "4 bytes, said 10"),
    "write-short": ("to", "short write (1 of"),
    "handle-str": ("from", "guest-file-open's handle is not an integer"),
}


@pytest.mark.parametrize("scenario", sorted(FILE_ATTACKS))
def test_copy_attacks(standin: Callable[[str], AgentClient], scenario: str) -> None:
    client = standin(scenario)
    direction, words = FILE_ATTACKS[scenario]
    out = io.BytesIO()

    def copy() -> Any:
        if direction == "from":
            return client.copy_from_guest("/etc/hostname", out, timeout=5.0,
                                          max_bytes=4 * MiB, chunk=64 << 10)
        return client.copy_to_guest(io.BytesIO(b"x" * 100), "/tmp/f", timeout=5.0)

    err = attack(copy, 5.0, SMALL_GROWTH + 4 * MiB)
    assert words in err.message
    assert out.tell() <= 4 * MiB  # nothing past the bound reached the host file


def test_refused_arguments_never_reach_the_agent(standin: Callable[[str], AgentClient]) -> None:
    """A NUL would cut a C string short in the guest (argv[1] "a\\0b" runs
    with "a"); a lone surrogate is not UTF-8: both refused before sending."""
    client = standin("honest")
    for argv in (["echo", "a\0b"], ["echo", "\udcff"], [], ["ls\0", "x"]):
        with pytest.raises(AgentError) as info:
            client.exec(argv, timeout=2.0)
        assert exit_status(info.value) == 125
    client.ping(timeout=2.0)
