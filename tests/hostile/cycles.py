"""One guest lifetime under attack, in each of the ways a guest can end.

``stop``: launched in this process, stopped by the shutdown ladder.
``crash``: launched in this process, the stand-in kills itself.
``gc``: launched by a launcher process (driver.py) that is SIGKILLed; then
``svirt gc`` releases the record.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from svirt.errors import ConsoleTimeout
from svirt.host import HostInfo
from svirt.launcher.launch import launch
from svirt.launcher.registry import Registry

from .helpers import (
    PYTHON,
    ROOT,
    Canaries,
    build_spec,
    pids_of_uid,
    read_info,
    svirt_gc,
    wait_for,
)

SCENARIOS = ("stop", "crash", "gc")


@dataclass
class Tally:
    cycles: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SCENARIOS, 0))
    stop_seconds: list[float] = field(default_factory=list)
    outcomes: dict[str, int] = field(default_factory=dict)
    early_deaths: int = 0  # stand-ins that died before reporting (run again)

    @property
    def total(self) -> int:
        return sum(self.cycles.values())


def run_cycle(scenario: str, spec: dict[str, Any], registry: Registry, host: HostInfo,
              uids: set[int], tally: Tally, *, attack_ms: float = 15,
              stop_limit: float = 30.0) -> dict[str, Any]:
    """One guest lifetime; returns the stand-in's view of itself."""
    if scenario == "gc":
        info = _gc_cycle(spec, registry, uids, attack_ms)
    else:
        if scenario == "crash":
            spec = {**spec, "cmdline": spec["cmdline"] + f" crash={int(attack_ms)} crashsig="
                    + str(int(signal.SIGUSR1 if tally.total % 2 else signal.SIGKILL))}
        for attempt in range(3):
            with launch(build_spec(spec), registry=registry, host=host) as guest:
                try:
                    info = read_info(guest)
                except ConsoleTimeout:
                    # a stand-in that died before it reported itself (its own
                    # attack threads racing its start) is not a result; the
                    # release still ran through the real path: run it again
                    if attempt == 2 or guest.running:
                        raise
                    tally.early_deaths += 1
                    continue
                uids.add(info["uid"])
                if scenario == "crash":
                    assert guest.supervisor.wait(10), "the stand-in did not crash by itself"
                else:
                    time.sleep(attack_ms / 1000)
                    started = time.monotonic()
                    outcome = _stop_with_watchdog(guest, stop_limit, info)
                    tally.stop_seconds.append(time.monotonic() - started)
                    kind = str(outcome.kind)
                    tally.outcomes[kind] = tally.outcomes.get(kind, 0) + 1
            break
    tally.cycles[scenario] += 1
    return info


def _stop_with_watchdog(guest: Any, limit: float, info: dict[str, Any]) -> Any:
    """guest.stop(), which must end within ``limit`` seconds; if it hangs, the
    stand-in is SIGKILLed (so the test can go on) and the test fails."""
    result: list[Any] = []
    thread = threading.Thread(target=lambda: result.append(guest.stop()), daemon=True)
    thread.start()
    thread.join(limit)
    if thread.is_alive():
        os.kill(guest.pid, signal.SIGKILL)
        thread.join(60)
        raise AssertionError(
            f"stopping the guest (attack {info['attack']} variant {info['variant']}) "
            f"did not finish within {limit:g} s: the launcher hung on its control channel")
    return result[0]


def _gc_cycle(spec: dict[str, Any], registry: Registry, uids: set[int],
              attack_ms: float) -> dict[str, Any]:
    spec_file = Path(registry.root) / f"spec-{spec['name']}.json"
    spec_file.write_text(json.dumps(spec))
    proc = subprocess.Popen([PYTHON, "-m", "tests.hostile.driver", str(spec_file), "--hold"],
                            cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line, "the launcher died before its guest was up"
        msg = json.loads(line)
        info: dict[str, Any] = msg["info"]
        host_pid = msg["pid"]  # the stand-in's own pid is its namespace's, not ours
        uids.add(info["uid"])
        time.sleep(attack_ms / 1000)
    finally:
        proc.kill()
        proc.wait(10)
        spec_file.unlink(missing_ok=True)
    # PR_SET_PDEATHSIG: the hypervisor dies with its launcher
    assert wait_for(lambda: not os.path.exists(f"/proc/{host_pid}"), 5), \
        "the hypervisor outlived its SIGKILLed launcher"
    gc = svirt_gc(dict(os.environ))
    assert gc.returncode == 0, gc.stderr
    assert "released guest" in gc.stdout, gc.stdout
    return info


def check_after_cycle(canaries: Canaries, registry: Registry, info: dict[str, Any],
                      scenario: str, cycle: int) -> None:
    where = (f"cycle {cycle} ({scenario}, attack {info['attack']} variant "
             f"{info['variant']})")
    changes = canaries.changes()
    assert not changes, f"{where}: the guest changed things outside itself:\n" + \
        "\n".join(changes)
    assert registry.records() == [], f"{where}: a record was left behind"
    left = pids_of_uid(info["uid"])
    assert not left, (f"{where}: processes of the guest's uid {info['uid']} survived "
                      f"(the stand-in was pid {info['pid']} in session {info['sid']}): "
                      + "; ".join(describe(pid) for pid in left))


def describe(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().replace(b"\0", b" ")[:80]
    except OSError:
        return f"{pid} (gone)"
    fields = data[data.rindex(b")") + 2:].split()
    return (f"{pid} state {fields[0].decode()} ppid {int(fields[1])} pgrp {int(fields[2])} "
            f"session {int(fields[3])} cmd {cmd.decode(errors='replace')}")
