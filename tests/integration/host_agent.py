"""A real qemu-ga (Debian's qemu-guest-agent) on the host, as a stand-in guest.

qemu-ga runs on any Linux: ``-m unix-listen`` serves the agent protocol on
a unix socket instead of the virtio-serial port, and it takes that socket
pre-bound through systemd's socket activation (``LISTEN_FDS=1``, the
listener on fd 3, ``LISTEN_PID`` its own pid).  So, as the launcher will for
a guest, root binds the socket in a directory only root can enter and hands
qemu-ga the listening fd.  qemu-ga runs as an unprivileged uid of our own
(no groups), in a private home: the commands the tests run through
``guest-exec`` are host commands with that uid's rights, and the files
``guest-file-*`` writes land in its home.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from svirt.deadline import Deadline
from svirt.launcher.channels import connect_control, listen_private

QEMU_GA = "/usr/sbin/qemu-ga"
#: SVIRT_UID_BASE (each helper has a range) + this: apart from guest slots
UID_OFFSET = 90_000
PYTHON = "/usr/bin/python3"
#: socket activation by hand: the listener onto fd 3 (SD_LISTEN_FDS_START),
#: LISTEN_PID = the pid qemu-ga will have (exec keeps it), then exec qemu-ga
_ACTIVATE = """
import os, sys
fd = int(sys.argv[1])
if fd != 3:
    os.dup2(fd, 3)
    os.close(fd)
env = dict(os.environ, LISTEN_FDS="1", LISTEN_PID=str(os.getpid()))
os.execve(sys.argv[2], sys.argv[2:], env)
"""


def agent_uid() -> int:
    return int(os.environ.get("SVIRT_UID_BASE", "3800000")) + UID_OFFSET


@dataclass
class HostAgent:
    socket_path: Path
    home: Path
    uid: int
    process: subprocess.Popen[bytes]
    log: Path

    def connect(self) -> socket.socket:
        """A connection to the agent, the way svirt connects to QMP."""
        return connect_control(self.socket_path, Deadline(5, "connect to qemu-ga"))


@contextlib.contextmanager
def host_agent(uid: int | None = None) -> Iterator[HostAgent]:
    """qemu-ga as ``uid`` (default :func:`agent_uid`) on a socket root bound;
    stopped, its processes killed and its directories removed at the end."""
    uid = agent_uid() if uid is None else uid
    run_dir = Path(tempfile.mkdtemp(prefix="svirt-qga-run-"))  # 0700 root
    top = Path(tempfile.mkdtemp(prefix="svirt-qga-home-"))
    top.chmod(0o711)
    home = top / "home"
    home.mkdir(mode=0o700)
    os.chown(home, uid, uid)
    listener = listen_private(run_dir / "agent.sock")
    log = run_dir / "qemu-ga.log"
    lfd = listener.fileno()
    argv = [PYTHON, "-I", "-c", _ACTIVATE, str(lfd), QEMU_GA, "-m", "unix-listen",
            "-f", str(home / "qemu-ga.pid"), "-t", str(home)]
    with open(log, "wb") as errors:
        proc = subprocess.Popen(  # noqa: S603 - fixed argv
            argv, user=uid, group=uid, extra_groups=[], cwd=home, umask=0o077,
            env={"PATH": "/usr/bin:/bin", "LANG": "C"}, stdin=subprocess.DEVNULL,
            stdout=errors, stderr=errors, pass_fds=(lfd,), start_new_session=True)
    listener.close()
    try:
        yield HostAgent(run_dir / "agent.sock", home, uid, proc, log)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        kill_uid(uid)
        shutil.rmtree(run_dir, ignore_errors=True)
        shutil.rmtree(top, ignore_errors=True)


def kill_uid(uid: int) -> None:
    """SIGKILL what the agent's commands left running (their own sessions)."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError):
            if os.stat(f"/proc/{entry}").st_uid == uid:
                os.kill(int(entry), signal.SIGKILL)
