"""The supervisor of detached guests under attack, with real UML guests.

- A console log whose rotation fails (the guest floods its console while
  the oldest name is taken: what a full disk does too) must not leave a
  closed fd number behind: the supervisor's fd table stays exactly what it
  was, its requests keep their answers, and the other guest works.
- A guest's supervising thread that raises must keep the failure in that
  guest's state, stop and release that guest, and leave the supervisor and
  every other guest working.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from svirt.images.build import TinyGuest
from svirt.launcher.registry import Registry
from svirt.service.api import attach
from svirt.service.client import supervisor_pid
from svirt.service.daemon import Daemon
from svirt.service.logs import log_path
from svirt.spec import Backend, spec_to_mapping
from svirt.testing import tiny_spec

from ..integration.helpers import svirt_cli, wait_for, write_spec

FLOOD = ("( i=0; while [ $i -lt 4000 ]; do "
         "echo flood-$i-xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx; i=$((i+1)); done ) "
         ">/dev/console 2>&1 &")


def _fd_table(pid: int) -> dict[int, str]:
    table = {}
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            table[int(name)] = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            continue
    return table


def _idle_fd_table(pid: int) -> dict[int, str]:
    """The table once no client connection is open (sockets of requests
    just served are closed within a moment)."""
    table = _fd_table(pid)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        time.sleep(0.3)
        again = _fd_table(pid)
        if again == table:
            return table
        table = again
    return table


#: a uid range of this file's own: suites of other worktrees running at the
#: same time kill what runs under theirs when they end
UID_BASE = "1730000"


@pytest.fixture
def own_registry(run_root: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Registry]:
    monkeypatch.setenv("SVIRT_UID_BASE", UID_BASE)
    reg = Registry(run_root)
    yield reg
    pid = supervisor_pid(reg)
    for r in reg.records():
        if r.hypervisor is not None and r.hypervisor.alive():
            os.killpg(r.hypervisor.pid, signal.SIGKILL)
    if pid is not None:
        os.kill(pid, signal.SIGKILL)
    reg.reconcile()


def test_a_failed_rotation_leaves_the_supervisors_fds_alone(
        tiny_uml: TinyGuest, image_dir: Path, own_registry: Registry) -> None:
    small = "[console]\nmax_bytes = 4096\nkeep = 2\n"
    for name in ("rot-a", "rot-b"):
        spec = write_spec(image_dir / f"{name}.toml", name, "uml", tiny_uml, mode="shell",
                          extra=small)
        out = svirt_cli("start", str(spec), "--wait-for", "(?m)^SVIRT-READY", timeout=120)
        assert out.returncode == 0, out.stderr
    daemon = supervisor_pid(own_registry)
    assert daemon is not None
    # the oldest name is taken by a non-empty directory: every rotation of A fails
    jam = log_path(own_registry.state, "rot-a").with_name("rot-a.log.1")
    jam.unlink(missing_ok=True)  # the boot has filled one file already
    jam.mkdir()
    (jam / "keep").write_bytes(b"")
    before = _idle_fd_table(daemon)
    a = attach("rot-a", registry=own_registry)
    assert a.shell(FLOOD, timeout=60)[0] == 0
    # requests come in while A floods: each accepted socket takes the lowest free
    # number, which a kept closed log fd would have handed out
    for _ in range(30):
        out = svirt_cli("status", "--json")
        assert out.returncode == 0, out.stderr
        names = {g["name"] for g in json.loads(out.stdout)["guests"]}
        assert names == {"rot-a", "rot-b"}, (out.stdout, _notes(own_registry))
        time.sleep(0.05)
    assert wait_for(lambda: "flood-3999-" in a.console.tail(4096), timeout=90)
    a.detach()
    after = _idle_fd_table(daemon)
    assert after == before, f"the supervisor's fds changed: {before} -> {after}"
    assert log_path(own_registry.state, "rot-a").stat().st_size <= 4096  # the cap held
    # the other guest is untouched
    b = attach("rot-b", registry=own_registry)
    assert b.shell("echo still-here", timeout=30) == (0, "still-here\n")
    b.detach()
    notes = _notes(own_registry)
    assert "console log" in notes and "rot-a.log" in notes
    for name in ("rot-a", "rot-b"):
        out = svirt_cli("stop", name, "--timeout", "20", timeout=90)
        assert out.returncode == 0, out.stderr
    assert own_registry.records() == []


def _notes(registry: Registry) -> str:
    return (registry.state / "logs" / "svirtd.log").read_text(errors="replace")


@pytest.fixture
def inproc(own_registry: Registry) -> Iterator[Daemon]:
    """A supervisor in this process: its fd table is /proc/self/fd, and a
    fault can be put into one guest's thread (the one stand-in here: nothing
    a real guest does is known to raise there, so the test raises itself)."""
    own_registry.reconcile()
    d = Daemon(own_registry)
    yield d
    for entry in list(d.guests.values()):
        g = entry.guest
        if g is not None and g.running:
            g.supervisor.signal(signal.SIGKILL, group=True)
        entry.stop_requested.set()
        entry.done.wait(30)


def test_a_thread_raising_in_one_guest_stays_in_that_guest(
        tiny_uml: TinyGuest, inproc: Daemon, monkeypatch: pytest.MonkeyPatch) -> None:
    d = inproc
    baseline = set(os.listdir("/proc/self/fd"))
    for name in ("thr-a", "thr-b"):
        spec = tiny_spec(tiny_uml, name, Backend.UML, mode="shell")
        answer = d.start({"op": "start", "spec": spec_to_mapping(spec), "base": None,
                          "wait_for": "(?m)^SVIRT-READY", "timeout": 90})
        assert answer["ok"], answer
    a, b = d.guests["thr-a"], d.guests["thr-b"]
    assert a.guest is not None and b.guest is not None
    class Exploding(list[Any]):
        def append(self, item: Any) -> None:
            raise RuntimeError("injected: the bookkeeping of thr-a blew up")

    # A's thread is inside its wait for the run's end; what it does next raises
    a.runs = Exploding(a.runs)
    os.killpg(a.guest.pid, signal.SIGKILL)  # A's run ends: its thread raises
    assert a.done.wait(60), "A's thread never reached its end"
    state = d.handle({"op": "status", "name": "thr-a"})
    assert state["state"] == "failed" and "injected" in state["reason"], state
    assert "thr-a" not in d.guests
    assert d.registry.records() and {r.name for r in d.registry.records()} == {"thr-b"}
    # a stop of A now answers at once instead of waiting for ever
    stop_a: dict[str, Any] = {}
    t = threading.Thread(target=lambda: stop_a.update(d.handle({"op": "stop", "name": "thr-a"})))
    t.start()
    t.join(10)
    assert not t.is_alive() and stop_a.get("ok") is False, stop_a
    # B is untouched: its console answers and it stops cleanly
    assert b.guest.console.shell("echo b-ok", timeout=30) == (0, "b-ok\n")
    answer = d.handle({"op": "stop", "name": "thr-b", "timeout": 20})
    assert answer["ok"] and answer["kind"] == "poweroff", answer
    assert d.registry.records() == []
    # the supervisor holds exactly what it held before: nothing of A or B leaked
    assert wait_for(lambda: set(os.listdir("/proc/self/fd")) <= baseline, timeout=10), (
        set(os.listdir("/proc/self/fd")) - baseline)
