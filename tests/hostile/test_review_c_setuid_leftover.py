"""review-c: a ``jail = false`` guest's set-uid file would outlive its release.

A ``jail = false`` hypervisor writes where its uid may: the host's ``/tmp``,
``/var/tmp``, ``/dev/shm`` (README: "not covered").  A file it left there
with mode 4755 is a set-uid-A executable: no_new_privs keeps every svirt
guest from gaining by it, but any other local user who runs it, after
release, gets a process with effective uid A.  svirt hands uid A to the
next guest; that process then ``setresuid(A, A, A)`` and ptraces the new
guest's hypervisor (dumpable, same uid): another guest's memory.

Fixed at the source: the jail's seccomp filter (every hypervisor's,
``jail = false`` included) refuses every way to give a file S_ISUID or
S_ISGID (chmod, fchmod, fchmodat, fchmodat2, mknod(at), open/openat/creat
creating with those bits, O_TMPFILE too; openat2 is ENOSYS).  The guest is
the real child (``child.spawn``) with the real filter and a uid switch, as
``jail = false`` launches it; each attempt runs in it and reports.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
GUEST_UID = 1_999_331

GUEST = r"""
import ctypes, json, os, shutil, sys
libc = ctypes.CDLL(None, use_errno=True)
where = sys.argv[1]
out = {}
def path(name):
    return os.path.join(where, name)
def copy(name):
    shutil.copyfile("/usr/bin/id", path(name))
    return path(name)
def tried(name, fn):
    try:
        fn()
        out[name] = "made" if os.stat(path(name)).st_mode & 0o6000 else "plain"
    except OSError as err:
        out[name] = "refused: " + os.strerror(err.errno or 0)
def fchmod():
    fd = os.open(copy("fchmod"), os.O_RDONLY)
    try:
        os.fchmod(fd, 0o4755)
    finally:
        os.close(fd)
def fchmodat2():
    copy("fchmodat2")
    if libc.syscall(452, -100, path("fchmodat2").encode(), 0o4755, 0) != 0:
        raise OSError(ctypes.get_errno(), "fchmodat2")
def creat():
    fd = libc.creat(path("creat").encode(), 0o6755)
    if fd < 0:
        raise OSError(ctypes.get_errno(), "creat")
    os.close(fd)
tried("chmod", lambda: os.chmod(copy("chmod"), 0o4755))
tried("chmod-g", lambda: os.chmod(copy("chmod-g"), 0o2755))
tried("fchmod", fchmod)
tried("fchmodat2", fchmodat2)
tried("open-creat", lambda: os.close(os.open(path("open-creat"), os.O_CREAT | os.O_WRONLY,
                                             0o4755)))
tried("creat", creat)
print(json.dumps(out))
"""

SCRIPT = r"""
import os, sys
import prctl
from svirt.launcher.child import spawn
from svirt.launcher.seccomp import install_in_child, jail_filter
from svirt.security.dac import drop_privileges

uid, where, guest = int(sys.argv[1]), sys.argv[2], sys.argv[3]
r, w = os.pipe()
pid = spawn(["/usr/bin/python3", "-I", "-c", guest, where], {}, {}, stdout_fd=w,
            pdeathsig=False,
            setups=[install_in_child(jail_filter(), "the hypervisor (jail = false)"),
                    lambda: drop_privileges(uid, uid, [], prctl)])
os.close(w)
out = b""
while chunk := os.read(r, 65536):
    out += chunk
os.waitpid(pid, 0)
sys.stdout.write(out.decode())
"""


@pytest.fixture
def where() -> Iterator[Path]:
    """A directory like /tmp (1777) the guest's uid can reach."""
    path = Path(tempfile.mkdtemp(prefix="svirt-review-c-", dir="/var/tmp"))
    path.chmod(0o1777)
    yield path
    shutil.rmtree(path)


def test_a_jail_false_guest_cannot_make_a_set_uid_file(where: Path) -> None:
    run = subprocess.run([sys.executable, "-c", SCRIPT, str(GUEST_UID), str(where), GUEST],
                         cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.strip().splitlines()
    assert lines, f"the guest reported nothing: {run.stderr}"
    report = json.loads(lines[-1])
    assert len(report) == 6, report
    # refused by the filter (EPERM), not by a directory it could not write
    made = {name: how for name, how in report.items()
            if how != "refused: Operation not permitted"}
    assert not made, f"the guest's set-uid attempts that were not refused: {made}"
    for entry in where.iterdir():
        st = entry.stat()
        assert not st.st_mode & 0o6000, f"{entry}: mode {st.st_mode:o}"
