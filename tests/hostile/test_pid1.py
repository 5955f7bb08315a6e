"""PID 1 of the jail (tini, the guest's own uid) is out of the hypervisor's
reach through /proc too, where the seccomp filter cannot look.

A compiled stand-in (``pid1_attack.c``), launched through the real launch
path as a UML kernel and as QEMU, opens /proc/1/mem read-write and
read-only, reads /proc/1/environ, maps and auxv, lists /proc/1/fd, reads the
exe/cwd/root links, and sends PID 1 SIGKILL and SIGSTOP.  Every open, read,
list and readlink must be refused, and PID 1 must live on, not stopped.

Before the fix tini was exec'd from /usr/bin/tini, which the guest's uid may
read, so the kernel left it dumpable: the stand-in opened /proc/1/mem
read-write and read tini's ELF header through it, and read its environment,
maps, auxv, fds and links (a write there turns tini into the guest's code,
which could clear its PDEATHSIG, the jail's tie to the supervisor).  Now the
jail execs an execute-only copy (svirt/launcher/jail.py: ``init_copy``),
which the kernel marks non-dumpable: every one of those answers EACCES.
The signals are dropped as before (a PID namespace's init gets no signal
from inside it that it has no handler for).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from svirt.host import QEMU_BINARY, HostInfo
from svirt.launcher import child
from svirt.launcher.jail import INIT_COPY, init_copy
from svirt.launcher.launch import launch
from svirt.launcher.registry import Registry
from svirt.spec import GuestSpec

from . import foreign_abi
from .helpers import UID_BASE
from .jail_attack import children

SOURCE = Path(__file__).resolve().parent / "pid1_attack.c"
LINE = re.compile(rb"PID1-ATTACK (\{[^\n]*\})\r?\n")
TIMEOUT = 30.0
#: attempts that read or open something of PID 1's: each must be refused
REFUSED = ("open /proc/1/mem O_RDWR", "open /proc/1/mem O_RDONLY", "read /proc/1/environ",
           "read /proc/1/maps", "read /proc/1/auxv", "list /proc/1/fd", "readlink /proc/1/exe",
           "readlink /proc/1/cwd", "readlink /proc/1/root", "prlimit(1, RLIMIT_NOFILE) read",
           "prlimit(1, RLIMIT_CPU) lowered")
AFTER_SIGNALS = "pid 1 after the signals"


def build(directory: Path, name: str) -> Path:
    """Compile the stand-in to ``directory/name``."""
    return foreign_abi.build_static(SOURCE, directory / name)


def problems(report: dict[str, str]) -> list[str]:
    out = [f"{name}: {report.get(name, 'not tried')}" for name in REFUSED
           if not report.get(name, "not tried").startswith("errno: ")]
    state = report.get(AFTER_SIGNALS, "not tried")
    if not (state.startswith("alive: ") and state[-1] in "SR"):
        out.append(f"{AFTER_SIGNALS}: {state} (expected alive, sleeping)")
    if "stand-in refused" in report:
        out.append(f"stand-in refused: {report['stand-in refused']}")
    return out


@pytest.mark.parametrize("shape", ["uml", "qemu"])
def test_a_jailed_hypervisor_cannot_reach_pid1_through_proc(
    shape: str, image_dir: Path, hostile_registry: Registry, host: HostInfo,
    guest_uids: set[int], monkeypatch: pytest.MonkeyPatch,
) -> None:
    if shape == "qemu":
        # the stand-in is the QEMU binary (found on spawn's PATH) and the
        # spec's kernel, so the jail holds it
        bindir = image_dir / "bin"
        bindir.mkdir(mode=0o755)
        binary = build(bindir, QEMU_BINARY)
        monkeypatch.setattr(child, "CLEAN_PATH", f"{bindir}:{child.CLEAN_PATH}")
        spec = GuestSpec(name="pid1-q", backend="qemu",  # type: ignore[arg-type]
                         kernel=binary, accel="tcg", memory=32,  # type: ignore[arg-type]
                         shutdown_timeout=0.5)
    else:
        binary = build(image_dir, "pid1-attack")
        spec = GuestSpec(name="pid1-u", backend="uml",  # type: ignore[arg-type]
                         kernel=binary, memory=32, shutdown_timeout=0.5)
    assert spec.jail
    started = time.monotonic()
    with launch(spec, registry=hostile_registry, host=host) as guest:
        guest_uids.add(guest.guest_uid or 0)
        m = LINE.search(guest.console.expect(LINE, TIMEOUT))
        assert m is not None
        report: dict[str, str] = json.loads(m.group(1))
        (standin,) = children(guest.pid)
        # from the host: the kernel hands the private /proc files of a
        # non-dumpable process to root (task_dump_owner; the pid directory
        # itself keeps the euid); the hypervisor's (dumpable) stay its uid's
        init_owner = os.stat(f"/proc/{guest.pid}/environ").st_uid
        standin_owner = os.stat(f"/proc/{standin}/environ").st_uid
        alive = guest.wait(0) is None
        guest.stop()
    width = max(len(k) for k in report)
    print(f"\n{shape}: {time.monotonic() - started:.1f} s\n"
          + "\n".join(f"  {k:<{width}}  {v}" for k, v in report.items()))
    found = problems(report)
    if init_owner != 0:
        found.append(f"/proc of the jail's PID 1 belongs to uid {init_owner}: it is dumpable")
    if standin_owner != guest.guest_uid:
        found.append(f"/proc of the hypervisor belongs to {standin_owner}, not the guest's uid")
    if not alive:
        found.append("the guest ended after the attack on its PID 1")
    assert not found, "PID 1 of the jail within the hypervisor's reach:\n  " + "\n  ".join(found)


def test_the_init_copy_replaces_whatever_holds_its_name() -> None:
    """The execute-only copy is checked at every launch: whatever holds its
    name that is not it (a symlink, a FIFO, a hard link to another file, a
    readable copy, other bytes) is replaced through a rename, never followed,
    opened for writing or waited on; a uid of no privilege may run it but not
    read it (which is what makes the kernel mark the jail's PID 1 non-dumpable)."""
    tini = shutil.which("tini", path=child.CLEAN_PATH)
    assert tini is not None, "tini is needed (./run installs it)"
    tini = os.path.realpath(tini)
    expected = Path(tini).read_bytes()
    d = Path(tempfile.mkdtemp(prefix="svirt-init-", dir="/run"))
    try:
        d.chmod(0o755)
        canary = d / "canary"
        canary.write_bytes(b"canary")
        canary.chmod(0o644)
        copy = d / INIT_COPY
        readable = d / "readable"
        readable.write_bytes(expected)
        readable.chmod(0o755)
        other = d / "other"
        other.write_bytes(b"\x7fELF" + bytes(len(expected) - 4))
        other.chmod(0o111)
        cases: dict[str, Callable[[], None]] = {
            "symlink to the canary": lambda: copy.symlink_to(canary),
            "FIFO": lambda: os.mkfifo(copy, 0o600),
            "hard link to the canary": lambda: os.link(canary, copy),
            "readable copy": lambda: os.rename(readable, copy),
            "other bytes, 0111": lambda: os.rename(other, copy),
        }
        for case, make in cases.items():
            if case != "symlink to the canary":
                copy.unlink()
            make()
            started = time.monotonic()
            assert init_copy(tini, d) == copy
            assert time.monotonic() - started < 5, f"{case}: waited"
            st = os.lstat(copy)
            assert stat.S_ISREG(st.st_mode), case
            assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_nlink) == (0o111, 0, 1), case
            assert copy.read_bytes() == expected, case
            assert canary.read_bytes() == b"canary" and stat.S_IMODE(canary.stat().st_mode) == 0o644
        assert sorted(p.name for p in d.iterdir()) == ["canary", INIT_COPY]  # no temporaries
        # unchanged: kept as it is (same inode)
        ino = os.stat(copy).st_ino
        init_copy(tini, d)
        assert os.stat(copy).st_ino == ino
        # a uid of no privilege: runs it, cannot read it
        probe = subprocess.run(
            ["setpriv", f"--reuid={UID_BASE + 999}", f"--regid={UID_BASE + 999}",
             "--clear-groups", "sh", "-c", f"{copy} --version; head -c4 {copy}"],
            capture_output=True, text=True, timeout=30, check=False)
        assert "tini version" in probe.stdout, probe
        assert "Permission denied" in probe.stderr, probe
    finally:
        shutil.rmtree(d, ignore_errors=True)
