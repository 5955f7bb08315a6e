"""review-c: the keyring child of release waited for without a bound.

``uidstate.clear_keyrings`` forks a child that takes the guest's uid (only
the uid reaches its own user keyring) and the launcher waited for it with a
bare ``waitpid``.  A process whose real or saved uid or effective uid is the
guest's may signal that child (kill(2): the sender's real or effective uid
equals the target's real or saved uid).  Such a process outlives release:
the leftover kill matches the *real* uid only, so one with real uid X and
effective uid A (a local user who ran a set-uid-A file the guest left: its
own writable disk while it runs, or a ``jail = false`` guest's ``/tmp``)
is never killed.  It makes a key as uid A (so ``/proc/key-users`` lists A
and release forks the child), then stops every process it may signal
(``kill(-1, SIGSTOP)``, in a loop): the child stops between its uid switch
and its exit, ``waitpid`` never returns, and release hangs for ever with
the registry lock held (every svirt command of the registry hangs).

Fixed: the child is waited for through a pidfd with a deadline; past it
the child is SIGKILLed (root may, stopped or not) and StateError makes the
record restore-failed.

Real parts: real processes, a real kernel keyring, the real
``uidstate.clear_keyrings``.  The attacker is played by a forked process
with real uid X and effective uid A (what exec of a set-uid-A file gives).
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
GUEST_UID = 1_999_326
LOCAL_UID = 1_999_327

CALLER = r"""
import sys, time
from svirt.errors import StateError
from svirt.launcher import uidstate
uid = int(sys.argv[1])
for i in range(300):
    try:
        uidstate.clear_keyrings(uid)
    except StateError as err:
        print("BOUNDED", i, err.message)
        break
else:
    print("NEVER-CAUGHT")
"""


def _attacker() -> int:
    """Fork the survivor: real uid LOCAL, effective and saved uid GUEST."""
    pid = os.fork()
    if pid:
        return pid
    try:  # pragma: no cover - the attacker
        os.setgroups([])
        os.setresgid(LOCAL_UID, LOCAL_UID, LOCAL_UID)
        os.setresuid(LOCAL_UID, GUEST_UID, GUEST_UID)
        libc = ctypes.CDLL(None, use_errno=True)
        libc.syscall.restype = ctypes.c_long
        # a key as the guest's uid: /proc/key-users lists it, so release forks
        if libc.syscall(248, b"user", b"svirt-review-c-bait", b"x", 1, ctypes.c_long(-1)) < 0:
            os._exit(3)
        kill = libc.kill
        while True:
            kill(-1, signal.SIGSTOP)
    finally:
        os._exit(4)


def test_a_survivor_of_the_guests_uid_cannot_hang_release_on_the_keyring_child() -> None:
    attacker = _attacker()
    caller = None
    try:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            with open("/proc/key-users") as f:
                if any(line.split(":", 1)[0].strip() == str(GUEST_UID) for line in f):
                    break
            time.sleep(0.02)
        else:
            pytest.skip("the attacker could not make a key as the guest's uid")
        caller = subprocess.Popen([sys.executable, "-c", CALLER, str(GUEST_UID)], cwd=ROOT,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            out, err = caller.communicate(timeout=40)
        except subprocess.TimeoutExpired:
            pytest.fail("release's keyring child was stopped by a process of the guest's "
                        "uid and waited for without end")
        assert caller.returncode == 0, err
        if "NEVER-CAUGHT" in out:
            pytest.skip("the attacker never caught the child in 300 tries (a race)")
        assert "BOUNDED" in out, out + err
    finally:
        os.kill(attacker, signal.SIGKILL)
        os.waitpid(attacker, 0)
        if caller is not None and caller.poll() is None:
            caller.kill()
            caller.wait()
        # a child left stopped by the attack (old code): root kills it
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/status") as f:
                        uids = next(line for line in f if line.startswith("Uid:")).split()
                except (OSError, StopIteration):
                    continue
                if str(GUEST_UID) in uids[1:]:
                    try:
                        os.kill(int(entry), signal.SIGKILL)
                    except OSError:
                        pass
