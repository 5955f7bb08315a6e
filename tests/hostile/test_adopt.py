"""Issue 22 item 6: adoption cannot be refused by the guest.

A detached guest's console input is a FIFO in its run directory; the guest
holds the read side.  A guest that closes it left no reader, and the next
supervisor's write-only open failed with ENXIO: the guest could not be
adopted, so neither stopped nor fenced.  Played here in both shapes (QEMU:
console input on stdin; UML: ``con0=fd:N``) at the channel, and end to end
with the UML stand-in under a killed supervisor.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from svirt.launcher.channels import console_fifos
from svirt.launcher.registry import Registry
from svirt.procfs import is_zombie
from svirt.service.client import supervisor_pid

from .helpers import SVIRT, pids_of_uid, wait_for

CLOSER = ("import os, sys, time\n"
          "os.close(int(sys.argv[1]))\n"
          "print('closed', flush=True)\n"
          "time.sleep(60)\n")


@pytest.mark.parametrize("shape", ["qemu-stdin", "uml-fd"])
def test_console_fifos_open_after_the_guest_closed_its_input(shape: str) -> None:
    """The guest holds its ends, closes its console input (stdin for QEMU,
    fd 3 for UML), the launcher's copies are gone: the next supervisor still
    opens both FIFOs (the old write-only open: ENXIO), and input it types
    waits in the pipe instead of failing or blocking."""
    run_dir = Path(tempfile.mkdtemp(prefix="svirt-adopt-", dir="/run"))
    try:
        hyp_in, hyp_out, sup_read, sup_write = console_fifos(run_dir, create=True)
        os.close(sup_read)
        os.close(sup_write)
        # QEMU: the input is stdin; UML: con0=fd:N (any fd of its own)
        target = 0 if shape == "qemu-stdin" else hyp_in
        kwargs: dict[str, object] = (
            {"stdin": hyp_in} if target == 0 else {"pass_fds": (hyp_in,)})
        guest = subprocess.Popen([sys.executable, "-I", "-c", CLOSER, str(target)],
                                 stdout=subprocess.PIPE, text=True, **kwargs)  # type: ignore[call-overload]
        try:
            os.close(hyp_in)
            assert guest.stdout is not None and guest.stdout.readline() == "closed\n"
            _, _, sup_read, sup_write = console_fifos(run_dir, create=False)
            try:
                assert os.write(sup_write, b"echo hi\n") == 8  # waits in the pipe
            finally:
                os.close(sup_read)
                os.close(sup_write)
        finally:
            guest.kill()
            guest.wait()
            os.close(hyp_out)
    finally:
        for name in ("console.in", "console.out"):
            (run_dir / name).unlink(missing_ok=True)
        run_dir.rmdir()


def _svirt(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([SVIRT, *args], capture_output=True, text=True, timeout=timeout,
                          check=False)


def _holds_console_in(uid: int) -> bool:
    """A process of the stand-in (not the jail's init: tini keeps what it was
    given) holds the console input FIFO."""
    for pid in pids_of_uid(uid):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if argv[0].endswith((b"/tini", b"/.svirt-init")):  # the jail's init copy
                continue
            for fd in os.listdir(f"/proc/{pid}/fd"):
                if os.readlink(f"/proc/{pid}/fd/{fd}").endswith("/console.in"):
                    return True
        except OSError:
            continue
    return False


@pytest.fixture(autouse=True)
def _own_uids(dirs: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """A uid range of these tests' own (see test_leftovers.OWN_UID_BASE)."""
    monkeypatch.setenv("SVIRT_UID_BASE", "1710000")


@pytest.mark.parametrize("jail", [False, True], ids=["jail-false", "jailed"])
def test_a_guest_that_closed_its_console_input_is_adopted_and_stopped(
    jail: bool, standin: Path, image_dir: Path, hostile_registry: Registry,
    guest_uids: set[int],
) -> None:
    """svirt start; the stand-in closes its console input (every fd of it);
    its supervisor is SIGKILLed; the next one (svirt status) adopts it all
    the same, and svirt stop stops it: nothing of its uid is left, its
    record is released."""
    spec = image_dir / "closein.toml"
    spec.write_text(f'name = "closein"\nbackend = "uml"\nkernel = "{standin}"\n'
                    'memory = 32\ncmdline = "attack=closein"\nshutdown_timeout = 1\n'
                    f'jail = {"true" if jail else "false"}\n')
    started = _svirt("start", str(spec), "--wait-for", "SVIRT-READY", timeout=60)
    assert started.returncode == 0, started.stderr
    try:
        record = next(r for r in hostile_registry.records() if r.name == "closein")
        uid = int(record.labels["dac"].process.split(":")[0])
        guest_uids.add(uid)
        assert wait_for(lambda: not _holds_console_in(uid), 5), \
            "the stand-in did not close its console input"
        daemon = supervisor_pid(hostile_registry)
        assert daemon is not None
        os.kill(daemon, signal.SIGKILL)
        assert wait_for(lambda: is_zombie(daemon), 5)
        status = _svirt("status", "closein", "--json")
        assert status.returncode == 0, status.stderr
        answer = json.loads(status.stdout)
        assert answer.get("state") == "running" and answer.get("adopted"), answer
        # with its console (the fallback without one is a second net, not this)
        assert not answer.get("reason"), answer
        t0 = time.monotonic()
        stopped = _svirt("stop", "closein", "--timeout", "1")
        took = time.monotonic() - t0
        # poweroff (0), or killed by the ladder (5) on a loaded host: stopped either way
        assert stopped.returncode in (0, 5), stopped.stderr
        assert wait_for(lambda: not pids_of_uid(uid), 5), pids_of_uid(uid)
        assert wait_for(lambda: not hostile_registry.records(), 5), hostile_registry.records()
        assert took < 10, f"svirt stop took {took:.1f} s"
    finally:
        _svirt("kill", "closein")


@pytest.mark.parametrize("broken", ["console-fifo-gone", "spec-unloadable"])
def test_a_guest_that_cannot_be_adopted_is_still_stopped(
    broken: str, standin: Path, image_dir: Path, hostile_registry: Registry,
    guest_uids: set[int],
) -> None:
    """Whatever keeps a supervisor from adopting a guest, it never runs on
    unsupervised: without its console FIFO it is adopted without a console
    (svirt status says so) and svirt stop stops it; with a spec that no
    longer loads it is killed through its pidfd and released (svirt status
    says why)."""
    spec = image_dir / "unadoptable.toml"
    spec.write_text(f'name = "unadoptable"\nbackend = "uml"\nkernel = "{standin}"\n'
                    'memory = 32\ncmdline = "attack=none"\nshutdown_timeout = 1\n'
                    'jail = false\n')
    started = _svirt("start", str(spec), "--wait-for", "SVIRT-READY", timeout=60)
    assert started.returncode == 0, started.stderr
    try:
        record = next(r for r in hostile_registry.records() if r.name == "unadoptable")
        uid = int(record.labels["dac"].process.split(":")[0])
        guest_uids.add(uid)
        daemon = supervisor_pid(hostile_registry)
        assert daemon is not None
        os.kill(daemon, signal.SIGKILL)
        assert wait_for(lambda: is_zombie(daemon), 5)
        if broken == "console-fifo-gone":
            (hostile_registry.run_dir("unadoptable") / "console.in").unlink()
        else:
            with hostile_registry.locked():
                record = next(r for r in hostile_registry.records()
                              if r.name == "unadoptable")
                assert record.detached is not None
                record.detached["spec"]["memory"] = "lots"
                hostile_registry.save(record)
        status = _svirt("status", "unadoptable", "--json")
        assert status.returncode == 0, status.stderr
        answer = json.loads(status.stdout)
        if broken == "console-fifo-gone":
            assert answer.get("state") == "running", answer
            assert "adopted without its console" in answer.get("reason", ""), answer
            listed = _svirt("list")
            assert "adopted without its console" in listed.stdout, listed.stdout
            stopped = _svirt("stop", "unadoptable", "--timeout", "1")
            assert stopped.returncode in (0, 5), stopped.stderr
        else:
            assert answer.get("state") == "failed", answer
            assert "could not be adopted" in answer.get("reason", ""), answer
        assert wait_for(lambda: not pids_of_uid(uid), 5), pids_of_uid(uid)
        assert wait_for(lambda: not hostile_registry.records(), 5), hostile_registry.records()
    finally:
        _svirt("kill", "unadoptable")
