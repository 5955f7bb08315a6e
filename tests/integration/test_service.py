"""Detached guests: svirt start / status / logs / stop / kill, one supervisor per
registry that exits when idle, and guests that outlive a SIGKILLed supervisor."""

from __future__ import annotations

import itertools
import json
import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from svirt.errors import ControlError
from svirt.images.build import TinyGuest
from svirt.launcher.channels import CONSOLE_OUT, QMP_SOCKET, connect_control, console_fifos
from svirt.launcher.registry import Registry
from svirt.procfs import is_zombie
from svirt.service.client import supervisor_pid
from svirt.service.logs import RotatingLog, log_path, tail
from svirt.service.server import SOCKET_NAME

from .helpers import svirt_cli, wait_for, write_spec

pytestmark = pytest.mark.integration


def _alive(pid: int) -> bool:
    """Running (a zombie is not: an adopted guest's init is reaped by PID 1)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return not is_zombie(pid)


def _status(name: str | None = None) -> dict[str, Any]:
    out = svirt_cli("status", *([name] if name else []), "--json")
    assert out.returncode == 0, out.stderr
    data: dict[str, Any] = json.loads(out.stdout)
    return data


@pytest.fixture
def registry(run_root: Path) -> Iterator[Registry]:
    reg = Registry(run_root)
    yield reg
    # a test failed half-way (maybe with its supervisor killed): leave nothing running
    pid = supervisor_pid(reg)
    for r in reg.records():
        if r.hypervisor is not None and r.hypervisor.alive():
            os.killpg(r.hypervisor.pid, signal.SIGKILL)
    if pid is not None:
        os.kill(pid, signal.SIGKILL)
    reg.reconcile()


def test_start_status_logs_stop(tiny_uml: TinyGuest, tiny_qemu: TinyGuest, image_dir: Path,
                                registry: Registry) -> None:
    uml = write_spec(image_dir / "u.toml", "svc-uml", "uml", tiny_uml, mode="shell")
    qemu = write_spec(image_dir / "q.toml", "svc-qemu", "qemu", tiny_qemu)
    out = svirt_cli("start", str(uml), "--wait-for", "(?m)^SVIRT-READY", "--json", timeout=120)
    assert out.returncode == 0, out.stderr
    started = json.loads(out.stdout)
    assert started["name"] == "svc-uml" and started["state"] == "running"
    assert _alive(started["pid"]) and started["labels"]
    out = svirt_cli("start", str(qemu), "--wait-for", "(?m)^SVIRT-READY", timeout=120)
    assert out.returncode == 0, out.stderr
    assert "svirt: guest svc-qemu started: pid" in out.stdout
    daemon = supervisor_pid(registry)
    assert daemon is not None
    # the launching commands are gone: the guests are the supervisor's
    names = {g["name"] for g in _status()["guests"]}
    assert names == {"svc-uml", "svc-qemu"}
    one = _status("svc-uml")
    assert one["pid"] == started["pid"] and one["supervisor"] == daemon
    # its process tree's PSS and CPU (psutil): tini + UML and its helpers
    assert one["process"]["pss"] > 1 << 20 and one["process"]["processes"] >= 2, one
    assert one["process"]["cpu_seconds"] > 0
    logs = svirt_cli("logs", "svc-uml", "-n", "30")
    assert logs.returncode == 0 and "SVIRT-READY" in logs.stdout, logs.stdout
    again = svirt_cli("start", str(uml))
    assert again.returncode == 1 and "already running" in again.stderr
    for name in ("svc-uml", "svc-qemu"):
        out = svirt_cli("stop", name, "--timeout", "20", timeout=90)
        assert out.returncode == 0, out.stderr
        assert "powered off on request" in out.stderr
    assert registry.records() == []
    # idle: the supervisor leaves, and with it every svirt process
    assert wait_for(lambda: not _alive(daemon), timeout=15), "the supervisor stayed"
    assert not (registry.root / SOCKET_NAME).exists()
    # the log outlives the guest
    assert b"SVIRT-POWEROFF" in tail(registry.state, "svc-uml", 20)


def test_guests_outlive_a_killed_supervisor(tiny_uml: TinyGuest, tiny_qemu: TinyGuest,
                                            image_dir: Path, registry: Registry) -> None:
    disk = image_dir / "d.img"
    disk.write_bytes(b"\0" * 65536)
    disk.chmod(0o600)
    before = disk.stat()
    uml = write_spec(image_dir / "u.toml", "svc-k-uml", "uml", tiny_uml, mode="shell",
                     extra=f'[[disk]]\npath = "{disk}"\n')
    qemu = write_spec(image_dir / "q.toml", "svc-k-qemu", "qemu", tiny_qemu)
    pids = {}
    for name, spec in (("svc-k-uml", uml), ("svc-k-qemu", qemu)):
        out = svirt_cli("start", str(spec), "--wait-for", "(?m)^SVIRT-READY", "--json",
                        timeout=120)
        assert out.returncode == 0, out.stderr
        pids[name] = json.loads(out.stdout)["pid"]
    assert disk.stat().st_uid != before.st_uid  # labelled for the guest
    daemon = supervisor_pid(registry)
    assert daemon is not None
    os.kill(daemon, signal.SIGKILL)
    assert wait_for(lambda: not _alive(daemon))
    time.sleep(1.0)  # consoles keep flowing into their FIFOs meanwhile
    assert all(_alive(p) for p in pids.values()), "a guest died with its supervisor"
    # the next command brings supervision back: the same guests, adopted
    listed = svirt_cli("list")
    assert listed.returncode == 0 and "svc-k-uml" in listed.stdout, listed.stderr
    status = _status()
    assert {g["name"]: g["pid"] for g in status["guests"]} == pids
    assert all(g["adopted"] for g in status["guests"])
    new = supervisor_pid(registry)
    assert new is not None and new != daemon
    for name in pids:
        out = svirt_cli("stop", name, "--timeout", "20", timeout=90)
        assert out.returncode == 0, out.stderr
    assert registry.records() == []
    after = disk.stat()
    assert (after.st_uid, after.st_gid, after.st_mode) == (before.st_uid, before.st_gid,
                                                             before.st_mode)
    assert not any(_alive(p) for p in pids.values())
    assert wait_for(lambda: not _alive(new), timeout=15)


def test_kill_and_unknown_names(tiny_uml: TinyGuest, image_dir: Path,
                                registry: Registry) -> None:
    spec = write_spec(image_dir / "k.toml", "svc-kill", "uml", tiny_uml)
    out = svirt_cli("start", str(spec), "--json", timeout=120)
    assert out.returncode == 0, out.stderr
    pid = json.loads(out.stdout)["pid"]
    out = svirt_cli("kill", "svc-kill", timeout=60)
    assert out.returncode == 5, out.stderr  # forced, as svirt run's exit codes say
    assert not _alive(pid) and registry.records() == []
    for verb in ("stop", "kill", "status"):
        out = svirt_cli(verb, "nosuch")
        assert out.returncode == 1, (verb, out.stderr)
        assert out.stderr.startswith("svirt: error: no detached guest named nosuch"), out.stderr
    out = svirt_cli("logs", "../../etc/passwd")
    assert out.returncode == 1 and "not a guest name" in out.stderr


def test_bad_spec_starts_nothing(image_dir: Path, registry: Registry) -> None:
    bad = image_dir / "bad.toml"
    bad.write_text('name = "x"\nbackend = "uml"\nmemory = "lots"\n')
    out = svirt_cli("start", str(bad))
    assert out.returncode == 2 and out.stderr.startswith("svirt: error:"), out.stderr
    assert supervisor_pid(registry) is None


def test_only_root_reaches_the_supervisor(tiny_uml: TinyGuest, image_dir: Path,
                                         registry: Registry) -> None:
    """A guest uid (or any user) cannot ask the supervisor to stop, start or
    describe guests: the socket is root's, 0600."""
    spec = write_spec(image_dir / "r.toml", "svc-root", "uml", tiny_uml)
    assert svirt_cli("start", str(spec), timeout=120).returncode == 0
    path = registry.root / SOCKET_NAME
    assert path.stat().st_uid == 0 and path.stat().st_mode & 0o777 == 0o600
    r, w = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - reported through the pipe
        os.close(r)
        try:
            os.setgid(65534)
            os.setuid(65534)
            s = socket.socket(socket.AF_UNIX)
            try:
                s.connect(str(path))
                os.write(w, b"connected")
            except PermissionError:
                os.write(w, b"denied")
        finally:
            os._exit(0)
    os.close(w)
    os.waitpid(child, 0)
    assert os.read(r, 100) == b"denied"
    os.close(r)
    assert svirt_cli("stop", "svc-root", "--timeout", "5", timeout=60).returncode in (0, 5)


def test_channels_refuse_what_is_not_roots(tmp_path: Path) -> None:
    """The next supervisor opens console FIFOs and the QMP socket by name:
    a symlink, a plain file or a guest-owned object there is refused."""
    run = tmp_path / "run"
    run.mkdir()
    (run / CONSOLE_OUT).symlink_to("/etc/passwd")
    os.mkfifo(run / "console.in", 0o600)
    with pytest.raises((ControlError, OSError)):
        console_fifos(run, create=False)
    (run / QMP_SOCKET).symlink_to("/run/svirt-nowhere.sock")
    with pytest.raises(ControlError):
        connect_control(run / QMP_SOCKET)
    other = tmp_path / "other"
    other.mkdir()
    os.mkfifo(other / CONSOLE_OUT, 0o600)
    os.mkfifo(other / "console.in", 0o600)
    os.chown(other / CONSOLE_OUT, 1500123, 1500123)
    with pytest.raises(ControlError):
        console_fifos(other, create=False)


def test_rotated_logs_keep_at_most_the_limit(tmp_path: Path) -> None:
    log = RotatingLog(log_path(tmp_path, "chatty"), max_bytes=10_000, keep=3)
    line = b"x" * 99 + b"\n"
    for _ in range(5_000):  # 500 kB through a 3 x 10 kB log
        log.write(line)
    log.close()
    files = sorted((tmp_path / "logs").iterdir())
    assert [f.name for f in files] == ["chatty.log", "chatty.log.1", "chatty.log.2"]
    assert sum(f.stat().st_size for f in files) <= 30_000
    assert all(f.stat().st_mode & 0o777 == 0o600 for f in files)
    assert tail(tmp_path, "chatty", 3) == line * 3
    assert tail(tmp_path, "chatty", 0) == b""


def _wait_state(name: str, states: set[str], timeout: float = 90.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    last: dict[str, Any] = {}
    while time.monotonic() < deadline:
        out = svirt_cli("status", name, "--json")
        if out.returncode == 0:
            last = json.loads(out.stdout)
            if last.get("state") in states:
                return last
        time.sleep(0.3)
    raise AssertionError(f"{name} never reached {states}: {last}")


def _uid(labels: dict[str, str]) -> int:
    return int(labels["dac"].split(":")[0])


def test_a_crash_looping_guest_backs_off_then_fails(tiny_uml: TinyGuest, image_dir: Path,
                                                    registry: Registry) -> None:
    """restart = "on-failure": each run is a new sVirt instance (a fresh uid),
    its labels restored in between; after max_restarts the guest is failed."""
    disk = image_dir / "loop.img"
    disk.write_bytes(b"\0" * 65536)
    disk.chmod(0o600)
    before = disk.stat()
    spec = write_spec(image_dir / "loop.toml", "svc-loop", "uml", tiny_uml, mode="panic",
                      extra='restart = "on-failure"\nmax_restarts = 2\nrestart_window = 120\n'
                            f'[[disk]]\npath = "{disk}"\n')
    t0 = time.monotonic()
    assert svirt_cli("start", str(spec), timeout=120).returncode == 0
    final = _wait_state("svc-loop", {"failed"})
    took = time.monotonic() - t0
    assert final["restarts"] == 2 and len(final["runs"]) == 3, final
    assert all("panic" in run["outcome"] for run in final["runs"]), final["runs"]
    uids = [_uid(run["labels"]) for run in final["runs"]]
    assert len(set(uids)) == 3, f"a restart reused a uid: {uids}"
    assert "max_restarts" in final["reason"]
    assert took >= 1 + 2, f"no backoff: {took:.1f} s"  # 1 s, then 2 s
    after = disk.stat()
    assert (after.st_uid, after.st_mode) == (before.st_uid, before.st_mode)
    assert registry.records() == []


def test_restart_policies_and_a_power_off(tiny_uml: TinyGuest, image_dir: Path,
                                          registry: Registry) -> None:
    off = write_spec(image_dir / "off.toml", "svc-off", "uml", tiny_uml, mode="poweroff",
                     extra='restart = "on-failure"\n')
    assert svirt_cli("start", str(off), timeout=120).returncode == 0
    done = _wait_state("svc-off", {"stopped", "failed"})
    assert done["state"] == "stopped" and done["restarts"] == 0, done  # not a failure
    always = write_spec(image_dir / "always.toml", "svc-always", "uml", tiny_uml,
                        mode="poweroff", extra='restart = "always"\nmax_restarts = 1\n')
    assert svirt_cli("start", str(always), timeout=120).returncode == 0
    done = _wait_state("svc-always", {"stopped", "failed"})
    assert done["state"] == "failed" and len(done["runs"]) == 2, done
    # svirt stop during the backoff ends it for good
    loop = write_spec(image_dir / "stop.toml", "svc-stopme", "uml", tiny_uml, mode="panic",
                      extra='restart = "always"\nmax_restarts = 50\n')
    assert svirt_cli("start", str(loop), timeout=120).returncode == 0
    _wait_state("svc-stopme", {"backoff"})
    out = svirt_cli("stop", "svc-stopme", timeout=60)
    assert out.returncode == 3, out.stderr  # the last run's outcome: a panic
    assert svirt_cli("status", "svc-stopme", "--json").returncode == 0
    assert json.loads(svirt_cli("status", "svc-stopme", "--json").stdout)["state"] == "stopped"
    assert registry.records() == []


def _read_until(fd: int, needle: bytes, timeout: float = 30.0) -> bytes:
    import select

    got = b""
    deadline = time.monotonic() + timeout
    while needle not in got:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"{needle!r} not seen; got {got[-500:]!r}")
        if select.select([fd], [], [], left)[0]:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                break
            if not chunk:
                break
            got += chunk
    return got


def test_console_attach_type_and_detach(tiny_uml: TinyGuest, image_dir: Path,
                                        registry: Registry) -> None:
    import subprocess

    from .helpers import SVIRT

    spec = write_spec(image_dir / "c.toml", "svc-con", "uml", tiny_uml, mode="shell")
    out = svirt_cli("start", str(spec), "--wait-for", "(?m)^SVIRT-READY", "--json", timeout=120)
    assert out.returncode == 0, out.stderr
    pid = json.loads(out.stdout)["pid"]
    master, slave = os.openpty()
    typist = subprocess.Popen([SVIRT, "console", "svc-con"], stdin=slave, stdout=slave,
                              stderr=slave)
    os.close(slave)
    try:
        _read_until(master, b"Ctrl-] detaches")
        # a watcher alongside; a second typist is refused
        watcher = subprocess.Popen([SVIRT, "console", "--read-only", "svc-con"],
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE)
        second = svirt_cli("console", "svc-con")
        assert second.returncode == 1 and "another console" in second.stderr, second.stderr
        time.sleep(0.5)
        os.write(master, b"echo typed-$((40 + 2))\n")
        _read_until(master, b"typed-42")
        assert watcher.stdin is not None and watcher.stdout is not None
        watcher.stdin.write(b"echo from-the-watcher\n")  # read-only: never typed
        watcher.stdin.flush()
        os.write(master, b"echo after\n")
        seen = _read_until(watcher.stdout.fileno(), b"after")
        assert b"typed-42" in seen and b"from-the-watcher" not in seen
        os.write(master, b"\x1d")  # Ctrl-]
        assert typist.wait(10) == 0
        watcher.stdin.close()  # EOF on its stdin detaches it too
        assert watcher.wait(10) == 0
    finally:
        for p in (typist,):
            if p.poll() is None:
                p.kill()
        os.close(master)
    assert _alive(pid), "detaching stopped the guest"
    log = svirt_cli("logs", "svc-con", "-n", "200").stdout
    assert "typed-42" in log and "from-the-watcher" not in log
    assert svirt_cli("stop", "svc-con", "--timeout", "20", timeout=60).returncode == 0


def test_python_api_start_attach_stop(tiny_uml: TinyGuest, registry: Registry) -> None:
    from svirt import attach, start
    from svirt.errors import StateError
    from svirt.spec import Backend, spec_from_mapping, spec_to_mapping
    from svirt.testing import tiny_spec

    spec = tiny_spec(tiny_uml, "svc-api", Backend.UML, mode="shell", restart="on-failure")
    assert spec_from_mapping(spec_to_mapping(spec)) == spec  # what start sends is the spec
    handle = start(spec, registry=registry, wait_for="(?m)^SVIRT-READY")
    assert handle.pid is not None and _alive(handle.pid)
    assert handle.shell("echo api-$((1 + 1))", timeout=30) == (0, "api-2\n")
    again = attach("svc-api", registry=registry)
    assert again.status()["pid"] == handle.pid and again.status()["state"] == "running"
    with pytest.raises(StateError, match="another console"):
        again.console.sendline("echo refused")  # the first handle is the typist
    handle.detach()

    def typist() -> bool:
        try:
            again.console.sendline("echo via-attach")
        except StateError:
            return False
        return True

    assert wait_for(typist, timeout=5)
    again.console.expect_line("via-attach", timeout=20)
    assert again.stop(timeout=20).startswith("poweroff")
    assert not _alive(handle.pid) and registry.records() == []
    with pytest.raises(StateError):
        attach("svc-nosuch", registry=registry)


def test_a_hypervisor_that_dies_at_once_is_a_launch_error(tiny_uml: TinyGuest, image_dir: Path,
                                                          registry: Registry) -> None:
    """svirt start returns only for a guest that runs: a 'hypervisor' that
    exits before saying anything is an error with its outcome, and nothing
    of it is left (record, supervisor)."""
    import shutil

    fake = image_dir / "linux-false"
    shutil.copy("/usr/bin/false", fake)
    fake.chmod(0o755)
    spec = image_dir / "dead.toml"
    spec.write_text(f'name = "svc-dead"\nbackend = "uml"\nkernel = "{fake}"\n'
                    f'initrd = "{tiny_uml.initrd}"\nmemory = 128\nrestart = "always"\n')
    out = svirt_cli("start", str(spec), timeout=120)
    assert out.returncode == 1, out.stderr
    assert "ended at once" in out.stderr and "exited with code 1" in out.stderr, out.stderr
    assert registry.records() == []
    # (asking it would keep it busy: watch its socket go instead)
    assert wait_for(lambda: not (registry.root / SOCKET_NAME).exists(), timeout=15)


def test_restart_is_a_new_instance(tiny_uml: TinyGuest, image_dir: Path,
                                   registry: Registry) -> None:
    spec = write_spec(image_dir / "re.toml", "svc-re", "uml", tiny_uml)
    out = svirt_cli("start", str(spec), "--wait-for", "(?m)^SVIRT-READY", "--json", timeout=120)
    first = json.loads(out.stdout)
    out = svirt_cli("restart", "svc-re", "--timeout", "20", "--json", timeout=120)
    assert out.returncode == 0, out.stderr
    second = json.loads(out.stdout)
    assert second["pid"] != first["pid"] and not _alive(first["pid"])
    assert _uid(second["labels"]) != _uid(first["labels"])
    assert second["restarts"] == 0 and len(second["runs"]) == 1  # asked for: not a failure
    # booted again (its marker a second time in the log) before it is asked to stop
    assert wait_for(lambda: tail(registry.state, "svc-re", 400).count(b"\nSVIRT-READY") >= 2,
                    timeout=60)
    out = svirt_cli("stop", "svc-re", "--timeout", "20", timeout=60)
    assert out.returncode == 0, out.stderr
    assert registry.records() == []
    assert svirt_cli("restart", "svc-re").returncode == 1


def test_a_flooding_guest_is_capped_and_stalls_no_one(tiny_uml: TinyGuest, image_dir: Path,
                                                      registry: Registry) -> None:
    """A hostile guest writes its console as fast as it can (1 MiB, then
    powers off, restarted once): its log never holds more than the cap, and
    a neighbour under the same supervisor answers its shell meanwhile."""
    env = {**os.environ, "SVIRT_LOG_MAX_BYTES": "65536", "SVIRT_LOG_KEEP": "3"}
    quiet = write_spec(image_dir / "quiet.toml", "svc-quiet", "uml", tiny_uml, mode="shell")
    flood = write_spec(image_dir / "flood.toml", "svc-flood", "uml", tiny_uml, mode="chatty",
                       extra='restart = "always"\nmax_restarts = 1\n')
    out = svirt_cli("start", str(quiet), "--wait-for", "(?m)^SVIRT-READY", env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert svirt_cli("start", str(flood), env=env, timeout=120).returncode == 0
    from svirt.service.api import attach

    neighbour = attach("svc-quiet", registry=registry)
    for i in range(5):  # while the flood runs
        assert neighbour.shell(f"echo still-{i}", timeout=30) == (0, f"still-{i}\n")
    final = _wait_state("svc-flood", {"failed"})
    assert len(final["runs"]) == 2
    logs = sorted((registry.state / "logs").glob("svc-flood.log*"))
    assert 1 <= len(logs) <= 3, logs
    assert sum(p.stat().st_size for p in logs) <= 3 * 65536
    assert b"SVIRT-READY" in logs[0].read_bytes()  # the newest file ends the last run
    neighbour.detach()
    assert svirt_cli("stop", "svc-quiet", "--timeout", "20", timeout=60).returncode == 0


def _kill_supervisor(registry: Registry) -> None:
    daemon = supervisor_pid(registry)
    assert daemon is not None
    os.kill(daemon, signal.SIGKILL)
    assert wait_for(lambda: not _alive(daemon))


def test_a_guest_in_backoff_is_resumed_by_the_next_supervisor(tiny_uml: TinyGuest,
                                                              image_dir: Path,
                                                              registry: Registry) -> None:
    """The supervisor is SIGKILLed while a crash-looping guest waits out its
    backoff (no hypervisor, no record): nothing restarts it meanwhile, the
    next svirt command's supervisor does, and its restart history carries
    over, so max_restarts still bounds the loop (a supervisor kill does not
    reset it)."""
    from svirt.service.entry import stranded
    from svirt.service.logs import live_services

    spec = write_spec(image_dir / "res.toml", "svc-res", "uml", tiny_uml, mode="panic",
                      extra='restart = "always"\nmax_restarts = 3\nrestart_window = 300\n')
    assert svirt_cli("start", str(spec), timeout=120).returncode == 0

    def in_third_backoff() -> bool:  # restarts 1 and 2 done: a 4 s wait
        live = live_services(registry.state).get("svc-res", {})
        return live.get("state") == "backoff" and live.get("restarts") == 2

    assert wait_for(in_third_backoff, timeout=60), live_services(registry.state)
    _kill_supervisor(registry)
    live = live_services(registry.state)["svc-res"]
    assert live["state"] == "backoff" and registry.records() == []
    time.sleep(max(0.0, live["next_restart"] - time.monotonic()) + 1.0)
    assert registry.records() == [], "a guest ran with no supervisor"
    assert stranded(registry.state) == ["svc-res"]
    assert svirt_cli("list").returncode == 0  # any command brings supervision back
    final = _wait_state("svc-res", {"failed", "stopped"})
    assert final["state"] == "failed" and "max_restarts" in final["reason"], final
    assert final["restarts"] == 3 and len(final["runs"]) == 4, final
    assert all("panic" in run["outcome"] for run in final["runs"]), final["runs"]
    uids = [_uid(run["labels"]) for run in final["runs"]]
    assert all(a != b for a, b in itertools.pairwise(uids)), f"a restart reused a uid: {uids}"
    assert live_services(registry.state) == {} and stranded(registry.state) == []
    assert registry.records() == []


def test_a_run_that_ended_unseen_counts_as_a_failure(tiny_uml: TinyGuest, image_dir: Path,
                                                     registry: Registry) -> None:
    """Supervisor and hypervisors are killed: the next supervisor releases the
    runs it never saw end, restarts the on-failure guest as a new instance
    and leaves the restart = "no" one stopped, both saying why."""
    disk = image_dir / "un.img"
    disk.write_bytes(b"\0" * 65536)
    disk.chmod(0o600)
    before = disk.stat()
    again = write_spec(image_dir / "on.toml", "svc-un-on", "uml", tiny_uml, mode="shell",
                       extra=f'restart = "on-failure"\n[[disk]]\npath = "{disk}"\n')
    once = write_spec(image_dir / "no.toml", "svc-un-no", "uml", tiny_uml, mode="shell")
    firsts = {}
    for name, spec in (("svc-un-on", again), ("svc-un-no", once)):
        out = svirt_cli("start", str(spec), "--wait-for", "(?m)^SVIRT-READY", "--json",
                        timeout=120)
        assert out.returncode == 0, out.stderr
        firsts[name] = json.loads(out.stdout)
    _kill_supervisor(registry)
    for r in registry.records():
        assert r.hypervisor is not None
        os.killpg(r.hypervisor.pid, signal.SIGKILL)
    assert wait_for(lambda: not any(_alive(f["pid"]) for f in firsts.values()), timeout=20)
    assert svirt_cli("gc").returncode == 0
    back = _wait_state("svc-un-on", {"running"})
    assert back["pid"] != firsts["svc-un-on"]["pid"]
    assert _uid(back["labels"]) != _uid(firsts["svc-un-on"]["labels"])
    assert back["restarts"] == 1 and "no supervisor watched it" in back["runs"][0]["outcome"]
    gone = _wait_state("svc-un-no", {"stopped", "failed"})
    assert gone["state"] == "stopped" and "no supervisor watched it" in gone["last_outcome"]
    assert [r.name for r in registry.records()] == ["svc-un-on"]
    # booted again (its marker a second time in the log) before it is asked to stop
    assert wait_for(lambda: tail(registry.state, "svc-un-on", 400).count(b"\nSVIRT-READY") >= 2,
                    timeout=60)
    assert svirt_cli("stop", "svc-un-on", "--timeout", "20", timeout=90).returncode == 0
    after = disk.stat()
    assert (after.st_uid, after.st_gid, after.st_mode) == (before.st_uid, before.st_gid,
                                                             before.st_mode)
    assert registry.records() == []


JUNK_STATE: list[dict[str, Any]] = [
    {"state": "backoff", "detached": "not a table"},
    {"state": "backoff", "detached": {"spec": {"name": "svc-junk1", "backend": "nope"}}},
    {"state": "backoff", "detached": {"spec": {}}, "next_restart": "soon"},
    {"state": "running", "detached": {"spec": {}}, "boot": "another boot"},
    {"state": "exploded", "detached": {"spec": {}}},
]


def test_bad_state_files_are_dropped_and_harm_nothing(tiny_uml: TinyGuest, image_dir: Path,
                                                      registry: Registry) -> None:
    """State files the supervisor cannot use (an older svirt's, a spec that no
    longer parses, another boot's) are dropped; it still serves."""
    from svirt.procfs import boot_id
    from svirt.service.logs import live_services, save_live

    registry.reconcile()  # makes the registry's directories
    for i, junk in enumerate(JUNK_STATE):
        save_live(registry.state, f"svc-junk{i}", {
            "boot": boot_id(), "saved": time.time(), "supervisor": {"pid": 1, "start": 0},
            **junk})
    (registry.state / "supervised" / "svc-junk5.json").write_text("[1, 2")
    spec = write_spec(image_dir / "ok.toml", "svc-ok", "uml", tiny_uml)
    out = svirt_cli("start", str(spec), "--wait-for", "(?m)^SVIRT-READY", timeout=120)
    assert out.returncode == 0, out.stderr
    assert live_services(registry.state).keys() == {"svc-ok"}
    assert [g["name"] for g in _status()["guests"]] == ["svc-ok"]
    assert svirt_cli("stop", "svc-ok", "--timeout", "20", timeout=60).returncode == 0
    assert registry.records() == []
    assert list((registry.state / "supervised").iterdir()) == []


def test_restart_during_a_backoff_starts_it_at_once(tiny_uml: TinyGuest, image_dir: Path,
                                                    registry: Registry) -> None:
    """svirt restart cuts a backoff short (it used to wait it out, then one more
    run) and, being asked for, is not counted as a restart."""
    from svirt.service.logs import live_services

    spec = write_spec(image_dir / "rb.toml", "svc-rb", "uml", tiny_uml, mode="panic",
                      extra='restart = "always"\nmax_restarts = 50\n')
    assert svirt_cli("start", str(spec), timeout=120).returncode == 0

    def in_third_backoff() -> bool:  # a 4 s wait
        live = live_services(registry.state).get("svc-rb", {})
        return live.get("state") == "backoff" and live.get("restarts") == 2

    assert wait_for(in_third_backoff, timeout=60), live_services(registry.state)
    t0 = time.monotonic()
    out = svirt_cli("restart", "svc-rb", "--json", timeout=60)
    took = time.monotonic() - t0
    assert out.returncode == 0, out.stderr
    answer = json.loads(out.stdout)
    assert answer["restarts"] == 2 and len(answer["runs"]) == 3, answer
    assert took < 3.5, f"svirt restart waited out the backoff: {took:.1f} s"
    svirt_cli("stop", "svc-rb", timeout=60)
    assert registry.records() == []
