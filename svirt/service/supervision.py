"""Supervision of detached guests: one thread per guest that waits for each
run to end, releases it and restarts it per the spec's policy, with
exponential backoff (1 s doubling to 60 s, reset after a stable run;
``max_restarts`` within ``restart_window``).

A new supervisor takes over what the previous one left (:meth:`adopt_all`):
the running detached guests (adopted through their records) and the
supervised ones that were in backoff or ended while nobody watched (resumed
from their state files, see :mod:`svirt.service.entry`).  Whatever one
guest's thread raises stays that guest's (``failed``, and why); the others
go on.
"""

from __future__ import annotations

import signal
import threading
import time
import traceback
from typing import Any

from svirt.errors import SvirtError
from svirt.host import HostInfo
from svirt.launcher.launch import Guest, launch
from svirt.launcher.record import Record
from svirt.launcher.registry import Registry
from svirt.launcher.supervisor import Outcome, Step
from svirt.service.adopt import adopt, fence_unadoptable, spec_of, spec_of_detached
from svirt.service.entry import (
    BACKOFF_FIRST,
    BACKOFF_MAX,
    STABLE_SECONDS,
    Entry,
    carry,
    previous_record,
    resumable,
)
from svirt.service.fanout import Fanout
from svirt.service.logs import (
    RotatingLog,
    drop_live,
    live_services,
    load_service,
    log_path,
    save_live,
    save_service,
)
from svirt.service.notes import SupervisorLog, bounded
from svirt.spec import GuestSpec, Restart

#: the outcome of a run that ended while no supervisor watched it
UNSEEN = ("its hypervisor ended while no supervisor watched it (outcome unknown: "
          "counted as a failure)")
#: a hypervisor that dies before its first console output (or this long) is a
#: LaunchError for svirt start, not a running guest
SETTLE_SECONDS = 2.0


class Supervision:
    """The detached guests of one registry, each watched by its own thread.

    ``lock`` guards ``guests``, ``starting``, ``fanouts`` and ``last_ended``
    together: a guest's entry and its console go in one step, so a new guest
    of the same name never gets the console of the one that just ended."""

    def __init__(self, registry: Registry, host: HostInfo, notes: SupervisorLog) -> None:
        self.registry = registry
        self.host = host
        self.notes = notes
        self.lock = threading.Lock()
        self.guests: dict[str, Entry] = {}
        self.starting: set[str] = set()  # names being launched by a request
        self.fanouts: dict[str, Fanout] = {}
        self.last_ended = time.monotonic()

    def quiet_since(self) -> float | None:
        """When the last guest ended; None while one runs or starts."""
        with self.lock:
            return None if self.guests or self.starting else self.last_ended

    # ------------------------------------------------------------ taking over
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
                      self.sink(record.name, spec_of(record)))
        entry = Entry(record.name, guest.spec, record.detached or {}, guest,
                      record.created, adopted=True,
                      reason=getattr(guest, "adopt_problem", ""))
        if record.name in live:  # its restart history carries over
            carry(entry, live[record.name])
        with self.lock:
            self.guests[record.name] = entry
        self.save(entry)
        self.watch(entry, None)

    def _resume(self, name: str, data: dict[str, Any]) -> None:
        """Carry on supervising ``name`` from its state file (we hold the
        registry's lock: whoever wrote it is gone)."""
        found = resumable(data)
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
        carry(entry, data)
        entry.previous = previous_record(data)
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
        self.watch(entry, None, delay)

    # ------------------------------------------------------------ a guest's run
    def save(self, entry: Entry, next_restart: float | None = None) -> None:
        """Write where ``entry`` stands, for the next supervisor."""
        save_live(self.registry.state, entry.name, entry.live_state(next_restart))

    def sink(self, name: str, spec: GuestSpec) -> Any:
        """Where the console output of guest ``name`` goes: its fan-out."""
        with self.lock:
            fan = self.fanouts.get(name)
            if fan is None:
                log = RotatingLog(log_path(self.registry.state, name), spec.console.max_bytes,
                                  spec.console.keep)
                fan = self.fanouts[name] = Fanout(log, self.notes)
        return fan.write

    def launch(self, entry: Entry, previous: Any = None) -> tuple[Any, Guest]:
        """A new run of ``entry``: its launch context and the guest in it."""
        ctx = launch(entry.spec, registry=self.registry, host=self.host,
                     detached=entry.detached, sink=self.sink(entry.name, entry.spec),
                     previous=previous,
                     settle=SETTLE_SECONDS)
        return ctx, ctx.__enter__()

    def watch(self, entry: Entry, ctx: Any, delay: float | None = None) -> None:
        """Start ``entry``'s supervising thread; if none can be had, the
        guest's own state says so (and it is stopped: nobody would watch it)."""
        try:
            threading.Thread(target=self._supervise, args=(entry, ctx, delay),
                             name=f"svirtd-{entry.name}", daemon=True).start()
        except BaseException as err:  # noqa: BLE001 - the others go on
            entry.ctx = ctx
            self._supervise_failed(entry, err)
            self._end(entry)

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
                outcome, ran = self._wait_run(entry)
                if entry.restart_requested.is_set() and not entry.stop_requested.is_set():
                    entry.restart_requested.clear()  # svirt restart: at once, not counted
                    previous = entry.guest.record if entry.guest is not None else None
                    if not self._relaunch(entry, previous, "svirt restart"):
                        break
                    entry.started = time.time()
                    self.save(entry)
                    entry.relaunched.set()
                    continue
                delay = self._next_delay(entry, outcome.ok, ran)
                if delay is None:
                    break
            entry.state = "backoff"
            self.save(entry, next_restart=time.monotonic() + delay)
            woken = self._backoff(entry, delay)
            if woken == "stop":
                entry.state = "stopped"
                break
            if woken == "up":  # not when svirt restart cut it short
                entry.restart_times.append(time.monotonic())
                entry.restarts += 1
            previous = entry.guest.record if entry.guest is not None else entry.previous
            if not self._relaunch(entry, previous, f"restart {entry.restarts}"):
                break
            entry.state = "running"
            entry.started = time.time()
            self.save(entry)
            entry.relaunched.set()  # a svirt restart asked during the backoff
            delay = None

    def _wait_run(self, entry: Entry) -> tuple[Outcome, float]:
        """Wait for the current run to end and release it: its outcome (in
        the history too) and the seconds waited."""
        assert entry.guest is not None  # noqa: S101 - set before each run
        run_started = time.monotonic()
        outcome = self._finish(entry, entry.guest, entry.ctx)
        entry.released, entry.ctx = True, None
        entry.add_run(entry.guest.labels, str(outcome))
        entry.final = outcome
        return outcome, time.monotonic() - run_started

    def _relaunch(self, entry: Entry, previous: Any, what: str) -> bool:
        """The next run of ``entry`` (False: it could not launch; the entry
        says why and whoever waits for the relaunch is told)."""
        try:
            entry.ctx, entry.guest = self.launch(entry, previous=previous)
            entry.released = False
        except SvirtError as err:
            entry.state = "failed"
            entry.reason = bounded(f"{what} could not launch: {err.message}")
            entry.relaunched.set()
            return False
        return True

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
        save_service(self.registry.state, entry.name, entry.final_state())
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
                self.last_ended = time.monotonic()
            if fan is not None:
                fan.close()
            entry.relaunched.set()
            entry.done.set()
