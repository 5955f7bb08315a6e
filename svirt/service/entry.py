"""A supervised guest across its runs, and the state file it carries on from.

An :class:`Entry` is one detached guest as its supervisor sees it (a
restart is a new launch of the same entry).  Where it stands is written to
``STATE/supervised/NAME.json`` at each change (:meth:`Entry.live_state`) and
how its supervision ended to ``STATE/services/NAME.json``
(:meth:`Entry.final_state`); the next supervisor reads the first back
(:func:`carry`, :func:`resumable`), and :func:`stranded` names the guests
that wait for one.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from svirt.launcher.record import Record
from svirt.procfs import ProcessId, boot_id
from svirt.service.logs import live_services
from svirt.service.notes import bounded

if TYPE_CHECKING:
    from svirt.launcher.launch import Guest
    from svirt.launcher.supervisor import Outcome
    from svirt.spec import GuestSpec

#: restart backoff: 1 s doubling to 60 s, back to 1 s after a run this long
BACKOFF_FIRST = 1.0
BACKOFF_MAX = 60.0
STABLE_SECONDS = 60.0
#: bounds (documented in README.rst): the runs kept in a guest's history (the
#: newest; ``runs_total`` counts them all) and the restart times kept
MAX_RUNS = 32
MAX_RESTART_TIMES = 1000


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

    def live_state(self, next_restart: float | None = None) -> dict[str, Any]:
        """Where the entry stands, for the next supervisor (see the module)."""
        return {
            "name": self.name, "state": self.state, "detached": self.detached,
            "restarts": self.restarts, "restart_times": self.restart_times,
            "backoff": self.backoff, "next_restart": next_restart, "runs": self.runs,
            "runs_total": self.runs_total,
            "last_outcome": self.last_outcome, "started": self.started,
            "boot": boot_id(), "saved": time.time(),
            "supervisor": {"pid": os.getpid(), "start": ProcessId.of(os.getpid()).start},
            # the last run's slot and labels: the next run must not get them
            "previous": self.guest.record.to_json() if self.guest is not None else None}

    def final_state(self) -> dict[str, Any]:
        """How its supervision ended, for ``svirt status NAME`` afterwards."""
        return {
            "name": self.name, "state": self.state, "reason": self.reason,
            "restarts": self.restarts, "last_outcome": self.last_outcome,
            "runs": self.runs, "runs_total": self.runs_total, "ended": time.time()}


def carry(entry: Entry, data: dict[str, Any]) -> None:
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


def resumable(data: dict[str, Any]) -> tuple[str, dict[str, Any], float, float] | None:
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


def previous_record(data: dict[str, Any]) -> Record | None:
    try:
        return Record.from_json(data["previous"])
    except (KeyError, TypeError, ValueError, AttributeError):
        return None


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
