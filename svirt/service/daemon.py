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
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import selectors
import signal
import socket
import struct
import sys
import threading
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from svirt.errors import ConsoleTimeout, ServiceError, SvirtError
from svirt.host import probe_host
from svirt.launcher.cgroups import record_usage
from svirt.launcher.channels import listen_private
from svirt.launcher.launch import Guest, launch
from svirt.launcher.state import ProcessId, Record, Registry, boot_id
from svirt.launcher.supervisor import (
    HARD_SECONDS,
    SIGKILL_SECONDS,
    SIGTERM_SECONDS,
    Outcome,
    Step,
)
from svirt.service.adopt import (
    adopt,
    detached_info,
    fence_unadoptable,
    spec_of,
    spec_of_detached,
)
from svirt.service.logs import (
    Fd,
    RotatingLog,
    drop_live,
    live_services,
    load_service,
    log_dir,
    log_path,
    save_live,
    save_service,
)
from svirt.spec import GuestSpec, Restart, spec_from_mapping

SOCKET_NAME = "svirtd.sock"
LOCK_NAME = "svirtd.lock"
IDLE_SECONDS = 2.0
MAX_REQUEST = 1 << 20
#: restart backoff: 1 s doubling to 60 s, back to 1 s after a run this long
BACKOFF_FIRST = 1.0
BACKOFF_MAX = 60.0
STABLE_SECONDS = 60.0
#: the outcome of a run that ended while no supervisor watched it
UNSEEN = ("its hypervisor ended while no supervisor watched it (outcome unknown: "
          "counted as a failure)")
#: a hypervisor that dies before its first console output (or this long) is a
#: LaunchError for svirt start, not a running guest
SETTLE_SECONDS = 2.0
#: bounds (documented in README.rst): the runs kept in a guest's history (the
#: newest; ``runs_total`` counts them all), the length of a reason or an
#: outcome kept, the restart times kept, and svirtd.log (then svirtd.log.1)
MAX_RUNS = 32
MAX_TEXT = 2000
MAX_RESTART_TIMES = 1000
SUPERVISOR_LOG_MAX = 1 << 20


@dataclass
class Entry:
    """One detached guest across its runs (a restart is a new launch)."""

    name: str
    spec: GuestSpec
    detached: dict[str, Any]
    guest: Guest | None
    started: float
    adopted: bool
    state: str = "running"  # running | backoff | stopped | failed
    restarts: int = 0
    reason: str = ""
    last_outcome: str = ""
    runs: list[dict[str, Any]] = field(default_factory=list)  # the newest MAX_RUNS
    runs_total: int = 0
    restart_times: list[float] = field(default_factory=list)  # CLOCK_MONOTONIC: this boot
    backoff: float = BACKOFF_FIRST  # the next delay before a restart
    previous: Record | None = None  # a resumed guest's last run (from its state file)
    stop_requested: threading.Event = field(default_factory=threading.Event)
    restart_requested: threading.Event = field(default_factory=threading.Event)
    relaunched: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)
    final: Outcome | None = None
    #: the run in ``guest`` has been released (closed and its record let go):
    #: nothing of it may be closed or released again (its fds' numbers are
    #: someone else's by then)
    released: bool = False
    ctx: Any = None  # the launch context of the run in ``guest`` (None: adopted)

    def add_run(self, labels: dict[str, str], outcome: str) -> None:
        """One more run in the history, which keeps the newest MAX_RUNS."""
        self.runs.append({"labels": labels, "outcome": bounded(outcome)})
        self.runs_total += 1
        del self.runs[:-MAX_RUNS]
        self.last_outcome = bounded(outcome)


#: how long a stop or restart request waits for the guest's thread (README:
#: "Every wait has a bound"): the ladder after the graceful time, then the release
LADDER_WAIT = HARD_SECONDS + SIGTERM_SECONDS + SIGKILL_SECONDS + 5.0
RELEASE_WAIT = 120.0
KILL_WAIT = SIGKILL_SECONDS + 5.0 + RELEASE_WAIT
LAUNCH_WAIT = 300.0


def _stop_bound(entry: Entry, timeout: Any) -> float:
    graceful = float(timeout) if timeout is not None else float(entry.spec.shutdown_timeout)
    return min(max(graceful, 0.0), 3600.0) + LADDER_WAIT + RELEASE_WAIT


def bounded(text: object, limit: int = MAX_TEXT) -> str:
    """``text`` on one line, control characters escaped, at most ``limit``
    characters: what the supervisor keeps or logs of anything a guest may
    have shaped (an error carrying its reply, an outcome)."""
    from svirt.termsafe import escape_text

    out = escape_text(str(text))
    return out if len(out) <= limit else out[:limit - 3] + "..."


class SupervisorLog:
    """svirtd.log: the supervisor's own lines (its stderr), rotated to
    svirtd.log.1 past SUPERVISOR_LOG_MAX and rate-limited per subject, so
    a guest that makes it complain in a loop cannot fill the disk."""

    QUIET_SECONDS = 60.0

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.lock = threading.Lock()
        self.last: dict[str, tuple[float, int]] = {}  # subject -> (last printed, held back)

    def note(self, text: str, subject: str | None = None) -> None:
        """One line; with ``subject``, at most one line per QUIET_SECONDS for
        it (the next says how many were held back)."""
        now = time.monotonic()
        with self.lock:
            if subject is not None:
                last, held = self.last.get(subject, (-self.QUIET_SECONDS, 0))
                if now - last < self.QUIET_SECONDS:
                    self.last[subject] = (last, held + 1)
                    return
                if held:
                    text += f" (and {held} more like it)"
                self.last[subject] = (now, 0)
                if len(self.last) > 4096:  # subjects are guest names: bounded too
                    self.last.clear()
            try:
                self._rotate()
                os.write(2, f"svirtd: {bounded(text)}\n".encode())
            except OSError:
                pass  # nowhere left to say it

    def _rotate(self) -> None:
        if self.path is None:
            return
        st = os.fstat(2)
        if st.st_size <= SUPERVISOR_LOG_MAX:
            return
        try:
            here = os.stat(self.path)
        except FileNotFoundError:
            here = None
        if here is None or (here.st_dev, here.st_ino) != (st.st_dev, st.st_ino):
            return  # stderr is not svirtd.log: not ours to rotate
        os.replace(self.path, self.path.with_name(self.path.name + ".1"))
        with Fd(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW
                        | os.O_CLOEXEC, 0o600)) as fresh:
            os.dup2(fresh.fileno(), 2)


class Fanout:
    """A guest's console output: to its rotated log and to every attached
    ``svirt console`` (never blocking the pump: a reader that cannot keep up
    loses output, the guest never waits)."""

    def __init__(self, log: RotatingLog, notes: SupervisorLog) -> None:
        self.log = log
        self.notes = notes
        self.readers: list[socket.socket] = []
        self.lock = threading.Lock()
        self.writer = threading.Lock()  # one attached console may type at a time

    def write(self, data: bytes) -> None:
        """Never raises: this runs on the guest's console pump."""
        try:
            self.log.write(data)
        except Exception as err:  # noqa: BLE001 - a full disk must not stop the console
            why = err.strerror if isinstance(err, OSError) else repr(err)
            self.notes.note(f"console log {self.log.path}: {why} (output past the cap "
                            f"is dropped: {self.log.dropped} bytes so far)",
                            subject=f"log:{self.log.path}")
        with self.lock:
            for reader in list(self.readers):
                try:
                    reader.send(data, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    pass
                except OSError:
                    self.readers.remove(reader)

    def add(self, reader: socket.socket) -> None:
        with self.lock:
            self.readers.append(reader)

    def remove(self, reader: socket.socket) -> None:
        with self.lock:
            if reader in self.readers:
                self.readers.remove(reader)

    def close(self) -> None:
        with self.lock:
            for reader in self.readers:
                try:
                    reader.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            self.readers.clear()
        try:
            self.log.close()
        except OSError as err:
            self.notes.note(f"console log {self.log.path}: {err.strerror}")


class Daemon:
    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.host = probe_host()
        self.guests: dict[str, Entry] = {}
        self.fanouts: dict[str, Fanout] = {}
        self.starting: set[str] = set()
        self.lock = threading.Lock()
        self.busy = 0  # requests being served
        self.last_activity = time.monotonic()
        own_log = log_dir(registry.state) / "svirtd.log"
        try:
            same = os.path.samestat(os.fstat(2), os.stat(own_log))
        except OSError:
            same = False
        self.notes = SupervisorLog(own_log if same else None)

    # ------------------------------------------------------------ lifetime
    def serve(self) -> int:
        lock_fd = os.open(self.registry.state / LOCK_NAME,
                          os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return 0  # another supervisor serves this registry
        path = self.registry.root / SOCKET_NAME
        path.unlink(missing_ok=True)
        listener = listen_private(path, 64)
        self.adopt_all()
        sel = selectors.DefaultSelector()
        sel.register(listener, selectors.EVENT_READ)
        while True:
            if sel.select(timeout=0.2):
                self._accept(listener)
            with self.lock:
                idle = (not self.guests and not self.starting and not self.busy
                        and time.monotonic() - self.last_activity > IDLE_SECONDS)
                if idle:
                    # nobody can reach us once the socket is gone: exit cleanly
                    path.unlink(missing_ok=True)
                    return 0

    def _accept(self, listener: socket.socket) -> None:
        """One connection, served on its own thread; no failure here (EMFILE,
        no thread to be had) ends the supervisor."""
        try:
            conn, _ = listener.accept()
        except OSError as err:
            self.notes.note(f"accept: {err.strerror}", subject="accept")
            time.sleep(0.05)
            return
        with self.lock:
            self.busy += 1
        try:
            threading.Thread(target=self._serve_one, args=(conn,), daemon=True).start()
        except BaseException as err:  # noqa: BLE001 - RuntimeError: no thread to be had
            with self.lock:
                self.busy -= 1
            conn.close()
            self.notes.note(f"cannot serve a request: {err}", subject="thread")

    def _thread(self, entry: Entry, ctx: Any, delay: float | None = None) -> None:
        """Start ``entry``'s supervising thread; if none can be had, the
        guest's own state says so (and it is stopped: nobody would watch it)."""
        try:
            threading.Thread(target=self._supervise, args=(entry, ctx, delay),
                             name=f"svirtd-{entry.name}", daemon=True).start()
        except BaseException as err:  # noqa: BLE001 - the others go on
            entry.ctx = ctx
            self._supervise_failed(entry, err)
            self._end(entry)

    def adopt_all(self) -> None:
        """Take over what the previous supervisor left: the running detached
        guests (adopted) and the supervised ones that are not running (in
        backoff, or ended unseen), resumed where its state file says.  One
        guest that cannot be taken over is noted and left; the others go on."""
        try:
            self.registry.reconcile()
        except Exception as err:  # noqa: BLE001 - reconcile's own failures are per record
            self.notes.note(f"reconcile: {err}")
        live = live_services(self.registry.state, drop_bad=True)
        records = self.registry.records()
        for record in records:
            if (record.detached is None or not record.this_boot()
                    or record.supervisor.alive() or record.name in self.guests):
                continue
            try:
                self._adopt_one(record, live)
            except Exception as err:  # noqa: BLE001 - one guest's failure stays its own
                self._fence(record, err)
        held = {r.name for r in records}
        for name, data in live.items():
            if name not in held:  # a guest still registered is adopted, or left alone
                try:
                    self._resume(name, data)
                except Exception as err:  # noqa: BLE001 - likewise
                    self.notes.note(f"cannot resume {name}: {err}")

    def _fence(self, record: Record, err: BaseException) -> None:
        """A guest no supervisor can take over is never left running
        unsupervised: killed through its pidfd and cgroup, then released;
        its state says why."""
        try:
            why = fence_unadoptable(self.registry, record, str(err))
        except Exception as fence_err:  # noqa: BLE001 - the others go on
            why = f"could not be adopted ({err}); fencing failed: {fence_err}"
        self.notes.note(f"{record.name} {why}")
        try:
            save_service(self.registry.state, record.name, {
                "name": record.name, "state": "failed", "reason": bounded(why),
                "ended": time.time()})
            drop_live(self.registry.state, record.name)
        except Exception as save_err:  # noqa: BLE001
            self.notes.note(f"{record.name}: cannot save its state: {save_err}")

    def _adopt_one(self, record: Record, live: dict[str, dict[str, Any]]) -> None:
        guest = adopt(self.registry, record, self.host,
                      self._sink(record.name, spec_of(record)))
        entry = Entry(record.name, guest.spec, record.detached or {}, guest,
                      record.created, adopted=True,
                      reason=getattr(guest, "adopt_problem", ""))
        if record.name in live:  # its restart history carries over
            _carry(entry, live[record.name])
        with self.lock:
            self.guests[record.name] = entry
        self._save(entry)
        self._thread(entry, None)

    def _resume(self, name: str, data: dict[str, Any]) -> None:
        """Carry on supervising ``name`` from its state file (we hold the
        registry's lock: whoever wrote it is gone)."""
        found = _resumable(data)
        last = load_service(self.registry.state, name) or {}
        ended = last.get("ended")
        if (found is None or (isinstance(ended, (int, float)) and ended >= found[3])):
            drop_live(self.registry.state, name)  # another boot's or junk, or ended meanwhile
            return
        state, detached, next_restart, _saved = found
        try:
            spec = spec_of_detached(detached)
        except SvirtError as err:
            self.notes.note(f"cannot resume {name}: {err}")
            drop_live(self.registry.state, name)
            return
        entry = Entry(name, spec, detached, None, time.time(), adopted=False, state="backoff")
        _carry(entry, data)
        entry.previous = _previous_record(data)
        if state == "backoff":
            delay: float | None = min(max(0.0, next_restart - time.monotonic()), BACKOFF_MAX)
        else:
            entry.add_run({}, UNSEEN)
            delay = self._next_delay(entry, ok=False, ran=time.time() - entry.started)
            if delay is None:
                self._ended(entry)
                return
        with self.lock:
            self.guests[name] = entry
        self._thread(entry, None, delay)

    def _save(self, entry: Entry, next_restart: float | None = None) -> None:
        """Write where ``entry`` stands, for the next supervisor (see the module)."""
        save_live(self.registry.state, entry.name, {
            "name": entry.name, "state": entry.state, "detached": entry.detached,
            "restarts": entry.restarts, "restart_times": entry.restart_times,
            "backoff": entry.backoff, "next_restart": next_restart, "runs": entry.runs,
            "runs_total": entry.runs_total,
            "last_outcome": entry.last_outcome, "started": entry.started,
            "boot": boot_id(), "saved": time.time(),
            "supervisor": {"pid": os.getpid(), "start": _own_start()},
            # the last run's slot and labels: the next run must not get them
            "previous": entry.guest.record.to_json() if entry.guest is not None else None})

    def _sink(self, name: str, spec: GuestSpec) -> Any:
        with self.lock:
            fan = self.fanouts.get(name)
            if fan is None:
                log = RotatingLog(log_path(self.registry.state, name), spec.console.max_bytes,
                                  spec.console.keep)
                fan = self.fanouts[name] = Fanout(log, self.notes)
        return fan.write

    def _supervise(self, entry: Entry, ctx: Any, delay: float | None = None) -> None:
        """A guest's thread: always reaches its end.  Whatever it raises is
        kept in that guest's state (``failed``, and why); the guest is then
        stopped and released (nobody would watch it), and the supervisor
        and every other guest go on."""
        entry.ctx = ctx
        try:
            self._supervise_runs(entry, delay)
        except BaseException as err:  # noqa: BLE001 - a thread must reach its end
            self._supervise_failed(entry, err)
        finally:
            self._end(entry)

    def _supervise_failed(self, entry: Entry, err: BaseException) -> None:
        entry.state = "failed"
        entry.reason = bounded(f"svirt's supervisor failed on this guest: "
                               f"{type(err).__name__}: {err}")
        where = "".join(traceback.format_exception(err)[-3:]).replace("\n", " | ")
        self.notes.note(f"{entry.name}: {entry.reason} ({where})")
        guest = entry.guest
        if guest is None or entry.released:
            return
        entry.released = True  # whatever happens below: never twice
        try:
            if guest.running:
                guest.supervisor.step = Step.SIGKILL
                guest.supervisor.signal(signal.SIGKILL, group=True)
                guest.supervisor.wait(30.0)
            if entry.ctx is not None:
                entry.ctx.__exit__(None, None, None)
            else:
                guest.supervisor.close()
                self.registry.release(guest.record)
        except BaseException as again:  # noqa: BLE001 - its record keeps what is left
            self.notes.note(f"{entry.name}: release after the failure: "
                            f"{type(again).__name__}: {again}")

    def _supervise_runs(self, entry: Entry, delay: float | None) -> None:
        """Wait for each run to end, release it, and restart per the spec's
        policy with exponential backoff; ``entry.ctx`` is the launch context
        of the run (None for an adopted guest).  A ``delay`` means there is
        no run (a resumed guest): the next one starts after it."""
        while True:
            if delay is None:
                assert entry.guest is not None  # noqa: S101 - set before each run
                run_started = time.monotonic()
                outcome = self._finish(entry, entry.guest, entry.ctx)
                entry.released, entry.ctx = True, None
                entry.add_run(entry.guest.labels, str(outcome))
                entry.final = outcome
                if entry.restart_requested.is_set() and not entry.stop_requested.is_set():
                    entry.restart_requested.clear()  # svirt restart: at once, not counted
                    try:
                        entry.ctx, entry.guest = self._launch(entry,
                                                              previous=entry.guest.record)
                        entry.released = False
                    except SvirtError as err:
                        entry.state = "failed"
                        entry.reason = bounded(f"svirt restart could not launch: "
                                               f"{err.message}")
                        entry.relaunched.set()
                        break
                    entry.started = time.time()
                    self._save(entry)
                    entry.relaunched.set()
                    continue
                delay = self._next_delay(entry, outcome.ok, time.monotonic() - run_started)
                if delay is None:
                    break
            entry.state = "backoff"
            self._save(entry, next_restart=time.monotonic() + delay)
            woken = self._backoff(entry, delay)
            if woken == "stop":
                entry.state = "stopped"
                break
            if woken == "up":  # not when svirt restart cut it short
                entry.restart_times.append(time.monotonic())
                entry.restarts += 1
            previous = entry.guest.record if entry.guest is not None else entry.previous
            try:
                entry.ctx, entry.guest = self._launch(entry, previous=previous)
                entry.released = False
            except SvirtError as err:
                entry.state = "failed"
                entry.reason = bounded(f"restart {entry.restarts} could not launch: "
                                       f"{err.message}")
                entry.relaunched.set()
                break
            entry.state = "running"
            entry.started = time.time()
            self._save(entry)
            entry.relaunched.set()  # a svirt restart asked during the backoff
            delay = None

    @staticmethod
    def _backoff(entry: Entry, delay: float) -> str:
        """Wait out a backoff: "up", or "stop" (svirt stop ended it) or
        "restart" (svirt restart cut it short)."""
        deadline = time.monotonic() + delay
        while (left := deadline - time.monotonic()) > 0:
            if entry.stop_requested.wait(min(left, 0.1)):
                return "stop"
            if entry.restart_requested.is_set():
                entry.restart_requested.clear()
                return "restart"
        return "stop" if entry.stop_requested.is_set() else "up"

    def _next_delay(self, entry: Entry, ok: bool, ran: float) -> float | None:
        """How long to wait before the next run, after one that ran ``ran``
        seconds; None when there is none (the state says why)."""
        policy = entry.spec.restart
        if (entry.stop_requested.is_set() or policy is Restart.NO
                or (policy is Restart.ON_FAILURE and ok)):
            entry.state = "stopped"
            return None
        if ran >= STABLE_SECONDS:
            entry.backoff = BACKOFF_FIRST
        now = time.monotonic()
        window = entry.spec.restart_window
        entry.restart_times = [t for t in entry.restart_times if now - t < window]
        if len(entry.restart_times) >= entry.spec.max_restarts:
            entry.state = "failed"
            entry.reason = bounded(f"{len(entry.restart_times)} restarts within "
                                   f"{window:g} s (max_restarts); last run: "
                                   f"{entry.last_outcome}")
            return None
        delay = entry.backoff
        entry.backoff = min(BACKOFF_MAX, delay * 2)
        return delay

    def _launch(self, entry: Entry, previous: Any = None) -> tuple[Any, Guest]:
        ctx = launch(entry.spec, registry=self.registry, host=self.host,
                     detached=entry.detached, sink=self._sink(entry.name, entry.spec),
                     previous=previous,
                     settle=SETTLE_SECONDS)
        return ctx, ctx.__enter__()

    def _finish(self, entry: Entry, guest: Guest, ctx: Any) -> Outcome:
        """Wait for the run to end; its outcome once it is released."""
        guest.wait()
        outcome = guest.stop()  # ended already: the outcome only
        try:
            if ctx is not None:
                ctx.__exit__(None, None, None)
            else:  # adopted: release here
                guest.supervisor.close()
                self.registry.release(guest.record)
        except Exception as err:  # noqa: BLE001 - the record keeps what is left to undo
            self.notes.note(f"release of {guest.name}: {type(err).__name__}: {err}")
        return outcome

    def _ended(self, entry: Entry) -> None:
        save_service(self.registry.state, entry.name, {
            "name": entry.name, "state": entry.state, "reason": entry.reason,
            "restarts": entry.restarts, "last_outcome": entry.last_outcome,
            "runs": entry.runs, "runs_total": entry.runs_total, "ended": time.time()})
        drop_live(self.registry.state, entry.name)  # after: a kill in between resumes nothing

    def _end(self, entry: Entry) -> None:
        """The end of a guest's thread, whatever happened before: its last
        state written if it can be, the entry and its console let go, and
        every request waiting on it answered."""
        try:
            self._ended(entry)
        except Exception as err:  # noqa: BLE001 - ENOSPC on the state dir, say
            self.notes.note(f"{entry.name}: cannot write its last state: {err}")
        finally:
            with self.lock:
                if self.guests.get(entry.name) is entry:
                    del self.guests[entry.name]
                fan = self.fanouts.pop(entry.name, None)
                self.last_activity = time.monotonic()
            if fan is not None:
                fan.close()
            entry.relaunched.set()
            entry.done.set()

    # ------------------------------------------------------------ requests
    def _serve_one(self, conn: socket.socket) -> None:
        try:
            creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                    struct.calcsize("3i"))
            _pid, uid, _gid = struct.unpack("3i", creds)
            if uid != os.geteuid():
                self._reply(conn, {"ok": False, "error": "only root may ask svirt's supervisor"})
                return
            data = b""
            while not data.endswith(b"\n") and len(data) < MAX_REQUEST:
                chunk = conn.recv(65536)
                if not chunk:
                    break
                data += chunk
            try:
                request = json.loads(data)
                if not isinstance(request, dict):
                    raise ValueError("not an object")
            except ValueError as err:
                self._reply(conn, {"ok": False, "error": f"bad request: {err}"})
                return
            if request.get("op") == "console":
                self.console(conn, str(request.get("name")), bool(request.get("read_only")))
            else:
                self._reply(conn, self.handle(request))
        except OSError:
            pass  # the client went away
        except Exception as err:  # noqa: BLE001 - one request's failure is its own
            self.notes.note(f"a request failed: {type(err).__name__}: {err}")
        finally:
            conn.close()
            with self.lock:
                self.busy -= 1
                self.last_activity = time.monotonic()

    @staticmethod
    def _reply(conn: socket.socket, answer: dict[str, Any]) -> None:
        conn.sendall(json.dumps(answer).encode() + b"\n")

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
            from svirt.errors import StateError

            raise StateError(f"no detached guest named {name} is running",
                             hint="svirt list shows the guests of this registry")
        return entry

    def start(self, request: dict[str, Any]) -> dict[str, Any]:
        data = request.get("spec")
        base = request.get("base")
        if not isinstance(data, dict):
            from svirt.errors import SpecError

            raise SpecError("the request has no spec")
        spec = spec_from_mapping(data, Path(base) if base else None)
        name = spec.name
        with self.lock:
            if name in self.guests or name in self.starting:
                from svirt.errors import StateError

                raise StateError(f"a guest named {name} is already running",
                                 hint="pick another name, or stop it first (svirt list)")
            self.starting.add(name)
        entry = Entry(name, spec, detached_info(data, Path(base) if base else None), None,
                      time.time(), adopted=False)
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                ctx, guest = self._launch(entry)
        finally:
            with self.lock:
                self.starting.discard(name)
        entry.guest = guest
        with self.lock:
            self.guests[name] = entry
        self._save(entry)
        self._thread(entry, ctx)
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
            from svirt.errors import LaunchError

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
        """Attach ``conn`` to a guest's console until either side ends: its
        output (after the last 2 KB) to conn, conn's bytes to the guest
        unless ``read_only``; one writer at a time, any number of readers."""
        try:
            entry = self._entry(name)
        except SvirtError as err:
            self._reply(conn, {"ok": False, "error": err.message, "hint": err.hint,
                               "kind": type(err).__name__})
            return
        with self.lock:
            fan = self.fanouts.get(name)
        if fan is None or entry.guest is None:
            self._reply(conn, {"ok": False, "error": f"guest {name} has no console now"})
            return
        if not read_only and not fan.writer.acquire(blocking=False):
            self._reply(conn, {"ok": False, "kind": "StateError",
                               "error": f"another console is attached to {name} for typing",
                               "hint": "svirt console --read-only NAME watches alongside it"})
            return
        try:
            self._reply(conn, {"ok": True, "name": name, "read_only": read_only})
            conn.sendall(entry.guest.console.tail(2048).encode())
            fan.add(conn)
            while data := conn.recv(4096):
                guest = entry.guest
                if read_only or guest is None or not guest.running:
                    continue
                try:
                    guest.console.send(data, 5.0)
                except SvirtError:
                    pass
        finally:
            fan.remove(conn)
            if not read_only:
                fan.writer.release()

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


def _carry(entry: Entry, data: dict[str, Any]) -> None:
    """An entry's restart history from its state file (values checked: the
    file is root's, but may be from an older svirt; lists cut to their caps)."""
    own = entry.runs_total
    try:
        entry.restarts = int(data.get("restarts", 0))
        entry.restart_times = [float(t) for t in data.get("restart_times", [])
                               ][-MAX_RESTART_TIMES:]
        entry.backoff = min(BACKOFF_MAX, max(BACKOFF_FIRST, float(data.get("backoff",
                                                                           BACKOFF_FIRST))))
        entry.started = float(data.get("started", entry.started))
        saved_total = int(data.get("runs_total", 0))
    except (TypeError, ValueError):
        return
    runs = data.get("runs")
    if isinstance(runs, list):
        kept = [r for r in runs if isinstance(r, dict)]
        entry.runs = (kept + entry.runs)[-MAX_RUNS:]
        entry.runs_total = max(saved_total, len(kept)) + own
    entry.last_outcome = bounded(data.get("last_outcome", entry.last_outcome))


def _resumable(data: dict[str, Any]) -> tuple[str, dict[str, Any], float, float] | None:
    """(state, detached, next_restart, saved) of a state file this boot's
    supervisor should carry on, or None."""
    state = data.get("state")
    detached = data.get("detached")
    if (data.get("boot") != boot_id() or state not in ("running", "backoff")
            or not isinstance(detached, dict)):
        return None
    try:
        next_restart = float(data.get("next_restart") or 0.0)
        saved = float(data.get("saved") or 0.0)
    except (TypeError, ValueError):
        return None
    return str(state), detached, next_restart, saved


def _previous_record(data: dict[str, Any]) -> Record | None:
    try:
        return Record.from_json(data["previous"])
    except (KeyError, TypeError, ValueError, AttributeError):
        return None


def _own_start() -> int:
    return ProcessId.of(os.getpid()).start


def stranded(state: Path) -> list[str]:
    """Supervised guests of this boot whose supervisor is gone (they wait for
    the next one: see the module)."""
    names = []
    for name, data in live_services(state).items():
        sup = data.get("supervisor")
        if (data.get("boot") != boot_id() or data.get("state") not in ("running", "backoff")
                or not isinstance(sup, dict)):
            continue
        try:
            alive = ProcessId(int(sup["pid"]), int(sup["start"])).alive()
        except (KeyError, TypeError, ValueError):
            alive = False
        if not alive:
            names.append(name)
    return names


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
