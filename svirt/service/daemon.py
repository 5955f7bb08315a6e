"""The supervisor of a registry's detached guests (see :mod:`svirt.service`).

``python -m svirt.service.daemon RUN_DIR STATE_DIR``: one per registry (an
``flock`` on ``STATE/svirtd.lock``), listening on ``RUN_DIR/svirtd.sock``
(0600, and only root peers are served).  One JSON request per connection,
one JSON answer: ``start``, ``stop``, ``kill``, ``status``, ``ping``.  It
adopts the registry's orphaned detached guests when it starts, and exits
once no guest is left and nobody has asked anything for ``IDLE_SECONDS``.
SIGTERM and SIGKILL alike leave the guests running for the next one, and
supervision carries on: each guest's state (running or in backoff, its spec
and restart history) is kept in ``STATE/supervised/NAME.json``, so the next
supervisor adopts the running ones, restarts a guest in backoff when its
delay is up, and treats a guest whose hypervisor ended while nobody watched
as a run that failed (its outcome went with its parent).

This module is the requests and the process; the rooms it calls on:
:mod:`svirt.service.server` (the lock, the socket, one thread per request),
:mod:`svirt.service.supervision` (a thread per guest, restarts and their
backoff, taking over from a previous supervisor),
:mod:`svirt.service.fanout` (console output to the log and to attached
consoles), :mod:`svirt.service.entry` (a guest across its runs and its state
file) and :mod:`svirt.service.notes` (svirtd.log).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from svirt.errors import (
    ConsoleTimeout,
    LaunchError,
    ServiceError,
    SpecError,
    StateError,
    SvirtError,
)
from svirt.host import probe_host
from svirt.launcher.cgroups import record_usage
from svirt.launcher.registry import Registry
from svirt.launcher.supervisor import HARD_SECONDS, SIGKILL_SECONDS, SIGTERM_SECONDS, Step
from svirt.service.adopt import detached_info
from svirt.service.entry import Entry
from svirt.service.logs import load_service, log_path
from svirt.service.notes import SupervisorLog, bounded
from svirt.service.server import RequestServer, reply
from svirt.service.supervision import Supervision
from svirt.spec import spec_from_mapping

#: how long a stop or restart request waits for the guest's thread (README:
#: "Every wait has a bound"): the ladder after the graceful time, then the release
LADDER_WAIT = HARD_SECONDS + SIGTERM_SECONDS + SIGKILL_SECONDS + 5.0
RELEASE_WAIT = 120.0
KILL_WAIT = SIGKILL_SECONDS + 5.0 + RELEASE_WAIT
LAUNCH_WAIT = 300.0


def _stop_bound(entry: Entry, timeout: Any) -> float:
    graceful = float(timeout) if timeout is not None else float(entry.spec.shutdown_timeout)
    return min(max(graceful, 0.0), 3600.0) + LADDER_WAIT + RELEASE_WAIT


class Daemon:
    """The supervisor: its requests (start, restart, stop, kill, status,
    console, ping) over the :class:`Supervision` of the registry's guests,
    served by a :class:`RequestServer`."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.notes = SupervisorLog.of_state(registry.state)
        self.supervision = Supervision(registry, probe_host(), self.notes)
        # the same dict and lock as the supervision's: a request reads and
        # adds entries under the lock the guests' threads hold
        self.guests = self.supervision.guests
        self.lock = self.supervision.lock

    def serve(self) -> int:
        """Claim the registry, listen, take over what the previous supervisor
        left, and answer until idle (see :mod:`svirt.service.server`)."""
        server = RequestServer(self.registry.root, self.registry.state, self.notes)
        if not server.claim():
            return 0  # another supervisor serves this registry
        server.listen()
        self.supervision.adopt_all()
        server.run(self)
        return 0

    def quiet_since(self) -> float | None:
        """The server's question: when the last guest ended (None: one runs)."""
        return self.supervision.quiet_since()

    # ------------------------------------------------------------ requests
    def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        op = request.get("op")
        try:
            if op == "ping":
                return {"ok": True, "pid": os.getpid()}
            if op == "start":
                return self.start(request)
            if op == "restart":
                return self.restart(str(request.get("name")), request.get("timeout"))
            if op in ("stop", "kill"):
                return self.stop(str(request.get("name")), op == "kill",
                                 request.get("timeout"), bool(request.get("force")))
            if op == "status":
                return self.status(request.get("name"))
            return {"ok": False, "error": f"unknown request {op!r}"}
        except SvirtError as err:
            return {"ok": False, "error": err.message, "hint": err.hint,
                    "kind": type(err).__name__, "log_tail": getattr(err, "log_tail", "")}
        except Exception as err:  # noqa: BLE001 - an answer, never a silent hang-up
            self.notes.note(f"{op} failed: {type(err).__name__}: {err}")
            return {"ok": False, "kind": "ServiceError",
                    "error": bounded(f"svirt's supervisor could not {op}: "
                                     f"{type(err).__name__}: {err}"),
                    "hint": "svirtd.log in the state directory's logs/ has more"}

    def _entry(self, name: str) -> Entry:
        with self.lock:
            entry = self.guests.get(name)
        if entry is None:
            raise StateError(f"no detached guest named {name} is running",
                             hint="svirt list shows the guests of this registry")
        return entry

    def start(self, request: dict[str, Any]) -> dict[str, Any]:
        data = request.get("spec")
        base = request.get("base")
        if not isinstance(data, dict):
            raise SpecError("the request has no spec")
        spec = spec_from_mapping(data, Path(base) if base else None)
        name = spec.name
        supervision = self.supervision
        with self.lock:
            if name in self.guests or name in supervision.starting:
                raise StateError(f"a guest named {name} is already running",
                                 hint="pick another name, or stop it first (svirt list)")
            supervision.starting.add(name)
        entry = Entry(name, spec, detached_info(data, Path(base) if base else None), None,
                      time.time(), adopted=False)
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                ctx, guest = supervision.launch(entry)
        finally:
            with self.lock:
                supervision.starting.discard(name)
        entry.guest = guest
        with self.lock:
            self.guests[name] = entry
        supervision.save(entry)
        supervision.watch(entry, ctx)
        answer = self._describe(entry)
        answer["warnings"] = [str(w.message) for w in caught]
        wait_for = request.get("wait_for")
        if wait_for:
            timeout = float(request.get("timeout") or 60)
            try:
                guest.console.expect(re.compile(str(wait_for).encode()), timeout)
            except ConsoleTimeout as err:
                return {"ok": False, "error": err.message, "log_tail": err.log_tail,
                        "kind": "ConsoleTimeout", "started": answer}
        return {"ok": True, **answer}

    def restart(self, name: str, timeout: Any) -> dict[str, Any]:
        """Stop the guest (the ladder) and start it again as a new instance."""
        entry = self._entry(name)
        entry.relaunched.clear()
        entry.restart_requested.set()
        guest = entry.guest
        if guest is not None and guest.running:
            guest.stop(float(timeout) if timeout is not None else None)
        if not entry.relaunched.wait(_stop_bound(entry, timeout) + LAUNCH_WAIT):
            raise ServiceError(f"guest {name} was not started again within the bound; "
                               "its supervision goes on", hint="svirt status " + name)
        if entry.state == "failed":
            raise LaunchError(entry.reason, guest=name)
        return {"ok": True, **self._describe(entry)}

    def stop(self, name: str, kill: bool, timeout: Any, force: bool) -> dict[str, Any]:
        entry = self._entry(name)
        entry.stop_requested.set()
        guest = entry.guest
        if guest is not None and guest.running:
            if kill or force:
                guest.supervisor.step = Step.SIGKILL
                guest.supervisor.signal(signal.SIGKILL, group=True)
            else:
                guest.stop(float(timeout) if timeout is not None else None)
        # a kill has only SIGKILL's step (the client waits for that much, not
        # for the spec's graceful time)
        bound = KILL_WAIT if kill else _stop_bound(entry, timeout)
        if not entry.done.wait(bound):
            raise ServiceError(f"guest {name} did not end within the bound; "
                               "its supervision goes on", hint="svirt status " + name)
        outcome = entry.final
        if outcome is None:  # resumed, and stopped before its first run here
            return {"ok": True, "name": name, "outcome": "stopped", "kind": "poweroff"}
        return {"ok": True, "name": name, "outcome": str(outcome), "kind": str(outcome.kind)}

    def console(self, conn: socket.socket, name: str, read_only: bool) -> None:
        """Attach ``conn`` to a guest's console (see :meth:`Fanout.attach`)."""
        try:
            entry = self._entry(name)
        except SvirtError as err:
            reply(conn, {"ok": False, "error": err.message, "hint": err.hint,
                         "kind": type(err).__name__})
            return
        with self.lock:
            fan = self.supervision.fanouts.get(name)
        if fan is None:
            reply(conn, {"ok": False, "error": f"guest {name} has no console now"})
            return
        fan.attach(conn, name, lambda: entry.guest, read_only)

    def _describe(self, entry: Entry) -> dict[str, Any]:
        guest = entry.guest
        running = guest is not None and guest.running and entry.state == "running"
        return {"name": entry.name, "state": entry.state if not running else "running",
                "pid": guest.pid if running and guest else None,
                "backend": str(entry.spec.backend),
                "labels": guest.labels if running and guest else {},
                "uptime": round(time.time() - entry.started, 1) if running else 0,
                "adopted": entry.adopted, "supervisor": os.getpid(),
                "restarts": entry.restarts, "last_outcome": entry.last_outcome,
                "reason": entry.reason, "runs": entry.runs, "runs_total": entry.runs_total,
                "usage": record_usage(guest.record.journal) if running and guest else {},
                "process": process_usage(guest.pid) if running and guest else {},
                "log": str(log_path(self.registry.state, entry.name))}

    def status(self, name: Any) -> dict[str, Any]:
        if name is None:
            with self.lock:
                entries = list(self.guests.values())
            return {"ok": True, "guests": [self._describe(e) for e in entries]}
        with self.lock:
            entry = self.guests.get(str(name))
        if entry is None:
            last = load_service(self.registry.state, str(name))
            if last is not None:
                return {"ok": True, **last}
        return {"ok": True, **self._describe(self._entry(str(name)))}


def process_usage(pid: int) -> dict[str, Any]:
    """PSS (bytes) and CPU seconds of a guest's process tree (its init, the
    hypervisor and its helpers), through psutil."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return {}
    pss = 0
    cpu = 0.0
    for proc in procs:
        try:
            pss += proc.memory_full_info().pss
            times = proc.cpu_times()
            cpu += times.user + times.system
        except psutil.Error:
            continue
    return {"pss": pss, "cpu_seconds": round(cpu, 2), "processes": len(procs)}


def main(argv: list[str] | None = None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    if len(args) != 2:
        print("usage: python -m svirt.service.daemon RUN_DIR STATE_DIR", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))  # guests stay, for the next one
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    return Daemon(Registry(Path(args[0]), Path(args[1]))).serve()


if __name__ == "__main__":
    sys.exit(main())
