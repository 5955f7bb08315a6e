"""Review i23: svirt/agent.py bounds the BYTES of a reply, not what parsing them costs.

``AgentClient._read_line`` refuses a guest-exec-status line over
``_ascii_b64_len(max_output) + 8 + SMALL_REPLY`` (22.4 MB) and a
guest-file-read line over ``_ascii_b64_len(chunk) + SMALL_REPLY``, then
``json.loads`` the whole line.  A hostile qemu-ga (the guest's) fills the
line with JSON that costs ~25x its size once parsed: ``[{},{},...]`` is one
64-byte dict per 3 bytes.  ``exited`` is false, so nothing else is checked
and the client polls again.  The client's peak RSS grows by ~0.5 GiB per
poll, against the bound test_agent_hostile.py documents (STATUS_GROWTH,
40 MiB) and the module's "never memory beyond the bounds".

The stand-in is its own process (stdlib only), as in test_agent_hostile.py.
"""

from __future__ import annotations

import io
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator

import pytest

from svirt.agent import MAX_OUTPUT, SMALL_REPLY, AgentClient, _ascii_b64_len
from svirt.errors import AgentError

MiB = 1 << 20
#: test_agent_hostile.py's documented bounds
STATUS_GROWTH = 40 * MiB
SMALL_GROWTH = 8 * MiB

STANDIN = r'''
import json, os, socket, sys
sock = socket.socket(fileno=int(sys.argv[2]))
mode, limit = sys.argv[1], int(sys.argv[3])
buf = b""
statuses = 0

def send(obj, pre=b""):
    sock.sendall(pre + json.dumps(obj).encode() + b"\n")

def bomb(req, body):
    # a JSON object line just under the client's byte bound: mostly "{},"
    head = b'{"id": %d, "return": {%s, "pad": [' % (req["id"], body)
    tail = b'{}]}}\n'
    n = (limit - len(head) - len(tail) - 16) // 3
    sock.sendall(head + b"{}," * n + tail)

while True:
    while b"\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            sys.exit(0)
        buf += chunk
    line, buf = buf.split(b"\n", 1)
    line = line.lstrip(b"\xff")
    if not line.strip():
        continue
    req = json.loads(line)
    cmd = req.get("execute")
    if cmd == "guest-sync-delimited":
        send({"return": req["arguments"]["id"]}, b"\xff")
    elif cmd == "guest-exec":
        send({"id": req["id"], "return": {"pid": 7}})
    elif cmd == "guest-exec-status":
        statuses += 1
        if statuses <= 2:
            bomb(req, b'"exited": false')
        else:
            send({"id": req["id"], "return": {"exited": True, "exitcode": 0}})
    elif cmd == "guest-file-open":
        send({"id": req["id"], "return": 5})
    elif cmd == "guest-file-read":
        bomb(req, b'"eof": true, "count": 0, "buf-b64": ""')
    elif cmd == "guest-file-close":
        send({"id": req["id"], "return": {}})
    else:
        send({"id": req.get("id"), "return": {}})
'''


def _vm(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise AssertionError(field)


@pytest.fixture
def bomb_agent() -> Iterator[Callable[[str, int], AgentClient]]:
    procs: list[tuple[subprocess.Popen[bytes], socket.socket]] = []

    def start(mode: str, limit: int) -> AgentClient:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        proc = subprocess.Popen(  # noqa: S603 - fixed argv
            [sys.executable, "-I", "-c", STANDIN, mode, str(theirs.fileno()), str(limit)],
            pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL)
        theirs.close()
        procs.append((proc, ours))
        return AgentClient(ours, timeout=10.0)

    yield start
    for proc, sock in procs:
        sock.close()
        proc.kill()  # our own child, by its pid
        proc.wait(timeout=10)


def _peak_growth(op: Callable[[], object]) -> int:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    before = _vm("VmRSS")
    try:
        op()
    except AgentError:
        pass  # refusing is fine; the memory it took on the way is the finding
    return _vm("VmHWM") - before


def test_review_i23_exec_status_json_amplification(
        bomb_agent: Callable[[str, int], AgentClient]) -> None:
    limit = _ascii_b64_len(MAX_OUTPUT) + 8 + SMALL_REPLY
    client = bomb_agent("exec", limit)
    grown = _peak_growth(lambda: client.exec(["true"], timeout=60.0))
    assert grown < STATUS_GROWTH, (
        f"a guest-exec-status reply of {limit / MiB:.1f} MiB of '{{}},' grew the client's "
        f"peak RSS by {grown / MiB:.0f} MiB (bound {STATUS_GROWTH / MiB:.0f} MiB)")


def test_review_i23_file_read_json_amplification(
        bomb_agent: Callable[[str, int], AgentClient]) -> None:
    chunk = 1 << 20  # FILE_CHUNK, the default
    limit = _ascii_b64_len(chunk) + SMALL_REPLY
    client = bomb_agent("read", limit)
    out = io.BytesIO()
    grown = _peak_growth(lambda: client.copy_from_guest("/etc/hostname", out, timeout=30.0))
    assert grown < SMALL_GROWTH + 4 * MiB, (
        f"a guest-file-read reply of {limit / MiB:.1f} MiB grew the client's peak RSS by "
        f"{grown / MiB:.0f} MiB")
