"""Found by the chaos suite: a launcher SIGKILLed during an mconsole
exchange leaves its reply socket ``RUN/ctl/mc.PID.*`` behind, chowned to the
guest's uid (the guest must be able to answer to it).  Nothing ever removed
it: root's control directory collected sockets of released guests' uids,
one per killed launcher.  ``svirt gc`` now sweeps the reply sockets of
launchers that are gone (by pid and start time, so a reused pid does not
keep one), through a descriptor of the control directory, never following
a symlink; a live launcher's socket stays.

The guest's side is real here: a silent mconsole socket owned by the guest
uid (a UML that never answers), and a real launcher process that talks to
it with svirt's own code and is SIGKILLed mid-exchange.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from svirt.launcher.registry import Registry

from .helpers import UID_BASE, svirt_gc, wait_for

GUEST_UID = UID_BASE + 64_400  # no other test's guests get it

LAUNCHER = """
import sys
from pathlib import Path
from svirt.backends import uml
print("exchanging", flush=True)
try:
    uml.mconsole_command(Path(sys.argv[1]), "g", "cad", client_dir=Path(sys.argv[2]),
                         guest_uid=int(sys.argv[3]), guest_pid=None, timeout=600.0)
except Exception as err:
    print(err, flush=True)
"""


@pytest.fixture
def silent_guest(dirs: tuple[Path, Path], hostile_registry: Registry
                 ) -> Iterator[tuple[Path, Path]]:
    """(home, control dir): the guest's home holds its mconsole, which never
    answers; the registry's control directory is root's."""
    run_root, _state = dirs
    hostile_registry.reconcile()  # makes RUN/ctl
    home = run_root / "guest-home"
    (home / "g").mkdir(parents=True)
    os.chown(home, GUEST_UID, GUEST_UID)
    os.chown(home / "g", GUEST_UID, GUEST_UID)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(str(home / "g" / "mconsole"))
    os.chown(home / "g" / "mconsole", GUEST_UID, GUEST_UID)
    try:
        yield home, hostile_registry.control_dir
    finally:
        server.close()


def _launcher(home: Path, ctl: Path) -> tuple[subprocess.Popen[str], list[str]]:
    """A launcher mid-exchange: its reply socket exists, it waits for the guest."""
    before = set(os.listdir(ctl))
    proc = subprocess.Popen([sys.executable, "-c", LAUNCHER, str(home), str(ctl),
                             str(GUEST_UID)], stdout=subprocess.PIPE, text=True)
    assert wait_for(lambda: set(os.listdir(ctl)) - before, 20), "the exchange never began"
    return proc, sorted(set(os.listdir(ctl)) - before)


def test_gc_sweeps_the_reply_sockets_of_dead_launchers(
        silent_guest: tuple[Path, Path], tmp_path: Path) -> None:
    home, ctl = silent_guest
    dead, dead_names = _launcher(home, ctl)
    live, live_names = _launcher(home, ctl)
    # root plants a symlink named like a dead launcher's socket, pointing at a
    # file of root's: the sweep must remove the link, never its target
    canary = tmp_path / "canary"
    canary.write_text("root's")
    os.symlink(canary, ctl / f"mc.{dead.pid}.1.dead")
    try:
        dead.send_signal(signal.SIGKILL)
        dead.wait()
        leftover = ctl / dead_names[0]
        st = os.lstat(leftover)
        assert st.st_uid == GUEST_UID, "the attack did not set up (no guest-owned leftover)"

        result = svirt_gc(dict(os.environ))
        assert result.returncode == 0, result.stdout + result.stderr

        names = set(os.listdir(ctl))
        assert dead_names[0] not in names, (
            f"svirt gc left the reply socket of a dead launcher, owned by the guest's "
            f"uid: {leftover}\n{result.stdout}{result.stderr}")
        assert f"mc.{dead.pid}.1.dead" not in names
        assert canary.read_text() == "root's"
        assert set(live_names) <= names, "gc removed the socket of a live exchange"
        assert "mconsole" in result.stdout, result.stdout  # gc says what it removed
    finally:
        for proc in (dead, live):
            with contextlib.suppress(OSError):
                proc.kill()
            proc.wait()


def test_a_reused_pid_does_not_keep_a_dead_launchers_socket(
        silent_guest: tuple[Path, Path]) -> None:
    """The socket's name carries its launcher's start time: a process that
    got the dead launcher's pid later is not taken for it."""
    home, ctl = silent_guest
    proc, names = _launcher(home, ctl)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    parts = names[0].split(".")
    assert len(parts) == 4 and parts[2].isdigit(), (
        f"the reply socket's name {names[0]} does not say when its launcher started")
    # the same pid, a later start: what a reused pid looks like (this process
    # is alive; its start time is not the launcher's)
    me = os.getpid()
    forged = f"mc.{me}.{int(parts[2]) + 1}.{parts[3]}"
    os.rename(ctl / names[0], ctl / forged)
    result = svirt_gc(dict(os.environ))
    assert forged not in os.listdir(ctl), (
        f"a socket named for pid {me} with another start time was kept "
        f"(a reused pid)\n{result.stdout}{result.stderr}")


def test_the_sweep_follows_no_symlinked_control_directory(
        dirs: tuple[Path, Path], hostile_registry: Registry, tmp_path: Path) -> None:
    """RUN/ctl replaced by a symlink to another directory: gc removes nothing
    there (the registry's directories are root's; this is the last line)."""
    hostile_registry.reconcile()
    ctl = hostile_registry.control_dir
    os.rmdir(ctl)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "mc.999999999.1.x").write_text("keep")
    os.symlink(elsewhere, ctl)
    svirt_gc(dict(os.environ))
    assert (elsewhere / "mc.999999999.1.x").exists()
