"""review-c: a ``jail = false`` guest can take the host's SysV IPC ids.

A ``jail = false`` hypervisor shares the host's IPC namespace.  Release now
removes the SysV objects of its uid, but while it runs nothing bounds how
many it makes: ``kernel.shmmni`` (4096 segments), ``kernel.msgmni`` (32000
queues) and ``kernel.semmni`` are the host's, so one guest that makes them
until ENOSPC leaves none for the host's services (PostgreSQL, X11 MIT-SHM)
or other guests for as long as it runs.  Neither QEMU nor UML needs SysV
IPC (a seccomp rule refusing ``shmget``/``msgget``/``semget`` to a
``jail = false`` hypervisor, or a quota per uid, would close it).

Fixed: the jail's seccomp filter (every hypervisor's, ``jail = false``
included) refuses ``shmget``/``msgget``/``semget`` with EPERM.  Played
without taking the host's ids: the stand-in hypervisor
(the real child with the jail's real seccomp filter and a uid switch, as
``jail = false`` launches) makes 300 private shared memory segments and
reports how many it got: none.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GUEST_UID = 1_999_329
MAKE = 300

SCRIPT = r"""
import os, sys
import prctl
from svirt.launcher.child import spawn
from svirt.launcher.seccomp import install_in_child, jail_filter
from svirt.launcher.uidstate import remove_sysv_ipc
from svirt.security.dac import drop_privileges

uid, make = int(sys.argv[1]), int(sys.argv[2])
guest = ("import ctypes; libc = ctypes.CDLL(None, use_errno=True); "
         f"print(sum(libc.shmget(0, 4096, 0o1600) >= 0 for _ in range({make})))")
r, w = os.pipe()
pid = spawn(["/usr/bin/python3", "-I", "-c", guest], {}, {}, stdout_fd=w, pdeathsig=False,
            setups=[install_in_child(jail_filter(), "the hypervisor (jail = false)"),
                    lambda: drop_privileges(uid, uid, [], prctl)])
os.close(w)
out = b""
while chunk := os.read(r, 65536):
    out += chunk
os.waitpid(pid, 0)
remove_sysv_ipc(uid)
sys.stdout.write(out.decode())
"""


def test_a_jail_false_guest_cannot_take_the_hosts_sysv_ids() -> None:
    run = subprocess.run([sys.executable, "-c", SCRIPT, str(GUEST_UID), str(MAKE)], cwd=ROOT,
                         capture_output=True, text=True, timeout=60, check=False)
    assert run.returncode == 0, run.stderr
    made = int(run.stdout.strip() or 0)
    assert made == 0, f"the guest made {made} SysV segments in the host's namespace"
