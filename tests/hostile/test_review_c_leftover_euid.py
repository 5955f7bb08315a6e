"""review-c: a process running with the guest's uid as its effective uid
only survived the leftover kill.

Release's second net after the cgroup kill (``kill_guest_leftovers``) and
the orphan search matched a process's *real* uid.  A process whose real uid
is another user's but whose effective and saved uids are the guest's (what
exec of a set-uid file of the guest's gives: a ``jail = false`` guest's
file in the host's ``/tmp``, which release does not remove, or its
writable disk while it runs; the guest itself cannot run one, no_new_privs)
outlived the guest.  It may ``setresuid(A, A, A)`` at any time (an
unprivileged process may set its real uid to its effective one), so it is
a full process of uid A outside every cgroup: it stops release's keyring
child, and once uid A is handed to the next guest it may ptrace that
guest's hypervisor (dumpable, same uid) and read its memory.

Fixed: the uid pass and the orphan search match a process by its real,
effective, saved and file-system uids.

Real parts: a real process with those uids, a real registry record with a
real DAC label, the real ``kill_guest_leftovers``.
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from pathlib import Path

import pytest

from svirt.launcher.registry import Registry
from svirt.launcher.uidstate import kill_guest_leftovers
from svirt.security.dac import DacDriver
from svirt.spec import GuestSpec

LOCAL_UID = 1_999_328


def test_a_process_with_the_guests_effective_uid_dies_with_the_release(tmp_path: Path) -> None:
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"k")
    registry = Registry(tmp_path / "run", tmp_path / "state")
    record = registry.reserve(GuestSpec(name="euid", kernel=kernel, uuid=uuid.uuid4()),
                              [DacDriver()])
    uid = int(record.labels["dac"].process.split(":")[0])
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the survivor
        try:
            os.setgroups([])
            os.setresgid(LOCAL_UID, LOCAL_UID, LOCAL_UID)
            os.setresuid(LOCAL_UID, uid, uid)
            time.sleep(60)
        finally:
            os._exit(0)
    try:
        time.sleep(0.2)
        kill_guest_leftovers(record, tmp_path / "state")
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            done, _ = os.waitpid(pid, os.WNOHANG)
            if done:
                return
            time.sleep(0.05)
        pytest.fail(f"pid {pid} (real uid {LOCAL_UID}, effective uid {uid}) outlived "
                    "the leftover kill")
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        for left in registry.records():
            registry.release(left)
