"""review-c: the hypervisor inherited its launcher's session keyring.

A process keeps its session keyring across fork, exec and a uid switch.
When root runs svirt from a login shell (pam_keyinit gives it a session
keyring: Kerberos ``KEYRING:`` caches, fscrypt v1 and NFS/CIFS keys live
there) or a service with one, the hypervisor possessed that keyring: as the
guest's uid, under the jail's seccomp filter, it listed root's keys in
``/proc/keys`` (possession grants their possessor permissions, "view"
included), and kernel-side key searches made on its behalf (fscrypt v1,
dns_resolver, NFS id mapping) searched root's keys.  Fixed in
:mod:`svirt.launcher.child`: before any setup step the child joins a new,
empty, anonymous session keyring, so nothing of the launcher's is reachable.

Real parts: the real child (svirt.launcher.child.spawn) with the jail's
real seccomp filter and the DAC driver's real uid switch, a real kernel
keyring; the launcher's login session is played by a subprocess that joins
a session keyring of its own (the test process's keyrings stay untouched).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GUEST_UID = 1_999_323

SCRIPT = r"""
import ctypes, os, sys
import prctl
from svirt.launcher.child import spawn
from svirt.launcher.seccomp import install_in_child, jail_filter
from svirt.security.dac import drop_privileges

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
# the admin's login session: a session keyring of its own, a key in it
if libc.syscall(250, 1, b"svirt-review-c-login") <= 0:  # KEYCTL_JOIN_SESSION_KEYRING
    print("NOKEYS", ctypes.get_errno()); sys.exit(0)
if libc.syscall(248, b"user", b"svirt-review-c-canary", b"secret", 6, ctypes.c_long(-3)) <= 0:
    print("NOKEYS", ctypes.get_errno()); sys.exit(0)
uid = int(sys.argv[1])
r, w = os.pipe()
pid = spawn(["/bin/cat", "/proc/keys"], {}, {}, stdout_fd=w, pdeathsig=False,
            setups=[install_in_child(jail_filter(), "the hypervisor"),
                    lambda: drop_privileges(uid, uid, [], prctl)])
os.close(w)
out = b""
while chunk := os.read(r, 65536):
    out += chunk
os.waitpid(pid, 0)
sys.stdout.write(out.decode(errors="replace"))
"""


def test_the_hypervisor_possesses_nothing_of_its_launchers_session_keyring() -> None:
    run = subprocess.run([sys.executable, "-c", SCRIPT, str(GUEST_UID)], cwd=ROOT,
                         capture_output=True, text=True, timeout=60, check=False)
    assert run.returncode == 0, run.stderr
    if run.stdout.startswith("NOKEYS"):
        import pytest

        pytest.skip(f"this kernel keeps no keys: {run.stdout.strip()}")
    seen = run.stdout
    assert "svirt-review-c-canary" not in seen and "svirt-review-c-login" not in seen, seen
