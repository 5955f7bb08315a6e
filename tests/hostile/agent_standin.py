#!/usr/bin/python3 -I
"""A hostile stand-in for qemu-ga: the agent end of the channel, owned by the guest.

    agent_standin.py SCENARIO FD

FD is a connected stream socket (the host's client holds the other end).
The stand-in answers like qemu-ga 7.2 (0xFF-delimited sync, ``id`` echoed,
guest-exec, guest-exec-status, guest-file-*) except where SCENARIO tells it
to attack; see ``SCENARIOS`` at the end for what each one does.  It runs
under the system python (``-I``), stdlib only.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

MiB = 1 << 20
GiB = 1 << 30


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


class Agent:
    def __init__(self, sock: socket.socket, scenario: str) -> None:
        self.sock = sock
        self.scenario = scenario
        self.buf = b""
        self.files: dict[int, bytes] = {}
        self.reads = 0

    def requests(self) -> Iterator[dict[str, Any]]:
        while True:
            while b"\n" not in self.buf:
                chunk = self.sock.recv(1 << 16)
                if not chunk:
                    return
                self.buf += chunk
            line, self.buf = self.buf.split(b"\n", 1)
            line = line.lstrip(b"\xff")  # the client's flush byte
            if line.strip():
                yield json.loads(line)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self, req: dict[str, Any], value: Any, **extra: Any) -> None:
        msg = {"return": value, **extra}
        if "id" in req:
            msg["id"] = req["id"]
        self.send(json.dumps(msg).encode() + b"\n")

    def flood(self, total: int, byte: bytes = b"a") -> None:
        block = byte * MiB
        for _ in range(total // MiB):
            self.send(block)

    def stall(self) -> None:
        time.sleep(3600)


def honest(agent: Agent, req: dict[str, Any]) -> None:
    """What qemu-ga 7.2 would answer."""
    name, args = req["execute"], req.get("arguments", {})
    if name == "guest-sync-delimited":
        agent.send(b"\xff" + json.dumps({"return": args["id"]}).encode() + b"\n")
    elif name == "guest-exec":
        agent.reply(req, {"pid": 4242})
    elif name == "guest-exec-status":
        agent.reply(req, {"exited": True, "exitcode": 0, "out-data": b64(b"ok\n")})
    elif name == "guest-file-open":
        agent.files[1000] = b""
        agent.reply(req, 1000)
    elif name == "guest-file-read":
        agent.reply(req, {"count": 0, "buf-b64": "", "eof": True})
    elif name == "guest-file-write":
        agent.reply(req, {"count": len(base64.b64decode(args["buf-b64"])), "eof": False})
    else:
        agent.reply(req, {})


def status_reply(**status: Any) -> Callable[[Agent, dict[str, Any]], None]:
    def answer(agent: Agent, req: dict[str, Any]) -> None:
        agent.reply(req, status)
    return answer


def raw(data: bytes, then: str = "stall") -> Callable[[Agent, dict[str, Any]], None]:
    def answer(agent: Agent, req: dict[str, Any]) -> None:
        agent.send(data)
        if then == "close":
            agent.sock.shutdown(socket.SHUT_RDWR)
            agent.sock.close()
            sys.exit(0)
        agent.stall()
    return answer


def garbage_sync(agent: Agent, req: dict[str, Any]) -> None:
    """Garbage, stale replies, a wrong token, a sentinel inside junk, then the
    right answer: the client must find it."""
    token = req["arguments"]["id"]
    agent.send(os.urandom(4096).replace(b"\xff", b"") + b"\n")
    agent.send(b'{"return": 123}\n{"error": {"class": "GenericError", "desc": "x"}}\n')
    agent.send(b"\xff" + json.dumps({"return": token + 1}).encode() + b"\n")
    agent.send(b"\xff[[[[[[[[{{{{\"\n\xffnot json at all\n")
    agent.send(b"junk " + b"[" * 5000 + b"\xff" + json.dumps({"return": token}).encode() + b"\n")


def flood_sentinels(agent: Agent, req: dict[str, Any]) -> None:
    while True:
        agent.send(b'\xff{"return": 1}\n' * 4096)


def trickle(agent: Agent, req: dict[str, Any]) -> None:
    for byte in b'{"return": {}, "id": ' * 1000:
        agent.send(bytes([byte]))
        time.sleep(0.01)


def flood_then_stall(total: int) -> Callable[[Agent, dict[str, Any]], None]:
    def answer(agent: Agent, req: dict[str, Any]) -> None:
        agent.flood(total)
        agent.stall()
    return answer


def sync_flood(agent: Agent, req: dict[str, Any]) -> None:
    agent.flood(GiB)
    agent.stall()


def big_b64(agent: Agent, req: dict[str, Any]) -> None:
    """An exited status whose out-data is 100 MiB of base64, one line."""
    head = b'{"return": {"exited": true, "exitcode": 0, "out-data": "'
    agent.send(head)
    agent.flood(100 * MiB, b"A")
    agent.send(b'"}, "id": ' + json.dumps(req.get("id")).encode() + b"}\n")
    agent.stall()


def wrong_id(agent: Agent, req: dict[str, Any]) -> None:
    agent.send(json.dumps({"return": {}, "id": req["id"] + 1}).encode() + b"\n")


def no_id(agent: Agent, req: dict[str, Any]) -> None:
    agent.send(b'{"return": {}}\n')


def error_escapes(agent: Agent, req: dict[str, Any]) -> None:
    desc = "\x1b]0;pwned\x07\x1b[2J\nsecond line\r\u202egnp.exe" + "x" * 5000
    agent.send(json.dumps({"error": {"class": "GenericError", "desc": desc},
                           "id": req["id"]}).encode() + b"\n")


ESCAPES_OUT = b"\x1b]52;c;cm0gLXJmIH4=\x07\x1b[6n\x1b[c\r\x00\x9b0c\xc2\x9b\x1bP$q\x1b\\\n"
ESCAPES_ERR = b"\x1b]0;title\x07\x08\x7f\xff\xfe\n"


def read_endless(agent: Agent, req: dict[str, Any]) -> None:
    count = req["arguments"]["count"]
    agent.reply(req, {"count": count, "buf-b64": b64(b"z" * count), "eof": False})


def read_empty(agent: Agent, req: dict[str, Any]) -> None:
    agent.reply(req, {"count": 0, "buf-b64": "", "eof": False})


def read_more(agent: Agent, req: dict[str, Any]) -> None:
    count = req["arguments"]["count"] + 3
    agent.reply(req, {"count": count, "buf-b64": b64(b"z" * count), "eof": True})


def read_lies(agent: Agent, req: dict[str, Any]) -> None:
    agent.reply(req, {"count": 10, "buf-b64": b64(b"z" * 4), "eof": True})


def write_short(agent: Agent, req: dict[str, Any]) -> None:
    agent.reply(req, {"count": 1, "eof": False})


Handler = Callable[[Agent, dict[str, Any]], None]
#: scenario -> {command: what the stand-in does instead of answering honestly}
SCENARIOS: dict[str, dict[str, Handler]] = {
    "honest": {},
    "sync-flood": {"guest-sync-delimited": sync_flood},           # 1 GiB, no 0xFF
    "sync-garbage": {"guest-sync-delimited": garbage_sync},       # then valid
    "sync-sentinels": {"guest-sync-delimited": flood_sentinels},  # 0xFF + stale, for ever
    "line-flood": {"guest-ping": flood_then_stall(GiB)},          # 1 GiB, no newline
    "status-flood": {"guest-exec-status": flood_then_stall(GiB)},
    "stall": {"guest-ping": raw(b'{"return": {')},
    "trickle": {"guest-ping": trickle},
    "close-mid": {"guest-ping": raw(b'{"return": {"pi', "close")},
    "close": {"guest-ping": raw(b"", "close")},
    "wrong-id": {"guest-ping": wrong_id},
    "no-id": {"guest-ping": no_id},
    "deep-json": {"guest-ping": raw(b"[" * 60000 + b"\n")},
    "digits": {"guest-ping": raw(b'{"return": ' + b"9" * 50000 + b"}\n")},
    "not-utf8": {"guest-ping": raw(b'{"return": "\xc3\x28\xff"}\n')},
    "error-escapes": {"guest-ping": error_escapes},
    "big-b64": {"guest-exec-status": big_b64},
    "exit-huge": {"guest-exec-status": status_reply(exited=True, exitcode=2**70)},
    "exit-str": {"guest-exec-status": status_reply(exited=True, exitcode="x")},
    "exit-neg": {"guest-exec-status": status_reply(exited=True, exitcode=-1)},
    "exit-bool": {"guest-exec-status": status_reply(exited=True, exitcode=True)},
    "exit-none": {"guest-exec-status": status_reply(exited=True)},
    "exit-both": {"guest-exec-status": status_reply(exited=True, exitcode=0, signal=9)},
    "exited-str": {"guest-exec-status": status_reply(exited="yes", exitcode=0)},
    "never-exits": {"guest-exec-status": status_reply(exited=False)},
    "bad-b64": {"guest-exec-status": status_reply(exited=True, exitcode=0, **{"out-data": "!!"})},
    "escapes": {"guest-exec-status": status_reply(
        exited=True, exitcode=3, **{"out-data": b64(ESCAPES_OUT), "err-data": b64(ESCAPES_ERR)})},
    "pid-neg": {"guest-exec": status_reply(pid=-1)},
    "pid-str": {"guest-exec": status_reply(pid="1; reboot")},
    "read-endless": {"guest-file-read": read_endless},
    "read-empty": {"guest-file-read": read_empty},
    "read-more": {"guest-file-read": read_more},
    "read-lies": {"guest-file-read": read_lies},
    "write-short": {"guest-file-write": write_short},
    "handle-str": {"guest-file-open": status_reply(handle=1)},
}


def main() -> None:
    scenario, fd = sys.argv[1], int(sys.argv[2])
    sock = socket.socket(fileno=fd)
    agent = Agent(sock, scenario)
    attacks = SCENARIOS[scenario]
    try:
        for req in agent.requests():
            attacks.get(req["execute"], honest)(agent, req)
    except (BrokenPipeError, ConnectionResetError):
        pass  # the client gave up on us: what it should do


if __name__ == "__main__":
    main()
