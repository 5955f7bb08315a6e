"""Talk to a registry's supervisor of detached guests, starting it when needed."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from typing import Any

from svirt.deadline import Deadline, connect, recv, send_all
from svirt.errors import (
    ConsoleTimeout,
    ControlError,
    LaunchError,
    ServiceError,
    SpecError,
    StateError,
    SvirtError,
)
from svirt.host import CLEAN_PATH
from svirt.launcher.registry import Registry
from svirt.launcher.supervisor import HARD_SECONDS, SIGKILL_SECONDS, SIGTERM_SECONDS
from svirt.service.entry import stranded
from svirt.service.logs import log_dir
from svirt.service.server import SOCKET_NAME

START_SECONDS = 15.0
#: how long the CLI waits for svirt's supervisor to answer (README: "Bounds"):
#: a stop is the ladder (graceful time, then HARD_SECONDS + SIGTERM_SECONDS +
#: SIGKILL_SECONDS) and a release; a start a launch and its --wait-for
CONNECT_SECONDS = 5.0
LAUNCH_SECONDS = 300.0  # preflight, labels, spawn, settle
RELEASE_SECONDS = 120.0  # undoing every step after the hypervisor ended
ANSWER_SECONDS = 60.0  # status, ping, the first line of a console
MAX_GRACEFUL = 3600.0  # a spec's shutdown_timeout is at most this
#: the largest answer read from the supervisor (a status of every guest with
#: its capped history is far below), and the longest console greeting line
MAX_ANSWER = 16 << 20
MAX_GREETING = 64 << 10
ERRORS: dict[str, type[SvirtError]] = {"SpecError": SpecError, "StateError": StateError}


def _connect(registry: Registry) -> socket.socket | None:
    """A connection to the supervisor, or None (not running; or it has not
    accepted within CONNECT_SECONDS: its backlog is full, it is stuck)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        connect(sock, str(registry.root / SOCKET_NAME),
                Deadline(CONNECT_SECONDS, "svirt's supervisor"))
    except ControlError:
        sock.close()
        return None
    return sock


def answer_bound(request: dict[str, Any]) -> float:
    """The seconds within which the supervisor answers ``request``."""
    op = request.get("op")
    timeout = request.get("timeout")
    # the supervisor's own waits (daemon.LADDER_WAIT, KILL_WAIT) have 5 s of
    # slack after the ladder: the CLI waits at least as long, so that its
    # answer (and the supervisor's reason) comes before the CLI gives up
    ladder = HARD_SECONDS + SIGTERM_SECONDS + SIGKILL_SECONDS + 5.0
    graceful = min(max(float(timeout), 0.0), MAX_GRACEFUL) if timeout is not None \
        else MAX_GRACEFUL
    if op == "stop":
        return graceful + ladder + RELEASE_SECONDS
    if op == "kill":
        return SIGKILL_SECONDS + 5.0 + RELEASE_SECONDS
    if op == "restart":
        return graceful + ladder + RELEASE_SECONDS + LAUNCH_SECONDS
    if op == "start":
        return LAUNCH_SECONDS + (float(timeout or 60) if request.get("wait_for") else 0.0)
    return ANSWER_SECONDS


def orphaned(registry: Registry) -> list[str]:
    """Detached guests whose supervisor is gone (they wait to be adopted), and
    supervised ones in backoff or ended meanwhile (they wait to be resumed)."""
    names = [r.name for r in registry.records()
             if r.detached is not None and r.this_boot() and not r.supervisor.alive()
             and r.hypervisor is not None and r.hypervisor.alive()]
    return names + [n for n in stranded(registry.state) if n not in names]


def running(registry: Registry) -> bool:
    sock = _connect(registry)
    if sock is None:
        return False
    sock.close()
    return True


def ensure(registry: Registry) -> socket.socket:
    """A connection to the registry's supervisor; started if it is not running."""
    sock = _connect(registry)
    if sock is not None:
        return sock
    registry.reconcile()  # makes the registry's directories too
    log = log_dir(registry.state)
    log.mkdir(mode=0o700, exist_ok=True)
    with open(log / "svirtd.log", "ab") as err:
        # setsid -f: a new session, and not our child (no zombie, no signals
        # of this terminal's job control)
        setsid = shutil.which("setsid", path=CLEAN_PATH)
        if setsid is None:
            raise ServiceError("setsid is missing", hint="apt-get install util-linux")
        subprocess.run([setsid, "-f", sys.executable, "-m",  # noqa: S603 - fixed argv
                        "svirt.service.daemon", str(registry.root), str(registry.state)],
                       stdin=subprocess.DEVNULL, stdout=err, stderr=err, cwd="/",
                       check=True, close_fds=True)
    deadline = time.monotonic() + START_SECONDS
    while time.monotonic() < deadline:
        sock = _connect(registry)
        if sock is not None:
            return sock
        time.sleep(0.02)
    raise ServiceError("svirt's supervisor did not start",
                       hint=f"see {log / 'svirtd.log'}")


def ask(registry: Registry, request: dict[str, Any], *, start: bool = True) -> dict[str, Any]:
    """Send one request; the answer, or the SvirtError it carries."""
    sock = ensure(registry) if start else _connect(registry)
    if sock is None:
        raise StateError(f"no detached guest named {request.get('name')} is running",
                         hint="svirt list shows the guests of this registry")
    bound = answer_bound(request)
    deadline = Deadline(bound, "svirt's supervisor")
    data = b""
    with sock:
        try:
            send_all(sock, json.dumps(request).encode() + b"\n", deadline)
            parts: list[bytes] = []
            size = 0
            while chunk := recv(sock, 65536, deadline):
                parts.append(chunk)
                size += len(chunk)
                if size > MAX_ANSWER:
                    raise ServiceError(f"svirt's supervisor answered more than {MAX_ANSWER} bytes",
                                       hint=f"see {log_dir(registry.state) / 'svirtd.log'}")
            data = b"".join(parts)
        except ControlError:
            raise ServiceError(f"svirt's supervisor did not answer within {bound:g} s",
                               hint=f"see {log_dir(registry.state) / 'svirtd.log'}") from None
    try:
        answer: dict[str, Any] = json.loads(data)
    except ValueError:
        raise ServiceError("svirt's supervisor ended without an answer",
                           hint=f"see {log_dir(registry.state) / 'svirtd.log'}") from None
    if not answer.get("ok"):
        kind = answer.get("kind", "")
        if kind == "ConsoleTimeout":
            raise ConsoleTimeout(answer.get("error", "?"), log_tail=answer.get("log_tail", ""),
                                 hint="the guest is still running: svirt stop it, or "
                                      "svirt logs it")
        if kind == "LaunchError":
            raise LaunchError(answer.get("error", "?"), guest=request.get("name"),
                              log_tail=answer.get("log_tail", ""), hint=answer.get("hint"))
        cls = ERRORS.get(kind, ServiceError)
        raise cls(answer.get("error", "?"), hint=answer.get("hint"))
    return answer


def open_console(registry: Registry, name: str, read_only: bool = False) -> socket.socket:
    """A socket attached to a detached guest's console: its output comes in
    (starting with its last 2 KB), what is sent goes to the guest (unless
    ``read_only``).  Closing it detaches."""
    sock = ensure(registry) if orphaned(registry) else _connect(registry)
    if sock is None:
        raise StateError(f"no detached guest named {name} is running",
                         hint="svirt list shows the guests of this registry")
    deadline = Deadline(ANSWER_SECONDS, "svirt's supervisor")
    line = bytearray()
    try:
        send_all(sock, json.dumps({"op": "console", "name": name, "read_only": read_only}
                                  ).encode() + b"\n", deadline)
        while not line.endswith(b"\n"):
            chunk = recv(sock, 1, deadline)
            if not chunk or len(line) > MAX_GREETING:
                raise ControlError("svirt's supervisor ended without an answer")
            line += chunk
    except ControlError as err:
        sock.close()
        raise ServiceError(err.message) from None
    try:
        answer = json.loads(line)
    except ValueError:
        sock.close()
        raise ServiceError("svirt's supervisor answered something that is not JSON") from None
    if not answer.get("ok"):
        sock.close()
        cls = ERRORS.get(answer.get("kind", ""), ServiceError)
        raise cls(answer.get("error", "?"), hint=answer.get("hint"))
    return sock


def supervisor_pid(registry: Registry) -> int | None:
    """The pid of the running supervisor, if any (for `svirt service`)."""
    if not running(registry):
        return None
    try:
        return int(ask(registry, {"op": "ping"}, start=False)["pid"])
    except SvirtError:
        return None


def bring_back(registry: Registry) -> list[str]:
    """If detached guests lost their supervisor, start one (it adopts them)."""
    names = orphaned(registry)
    if names and os.geteuid() == 0:
        ensure(registry).close()
    return names
