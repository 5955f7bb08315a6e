"""fork/exec: fds, environment, and errors before exec travel back."""

from __future__ import annotations

import os
import socket

import pytest

from svirt.errors import LaunchError
from svirt.launcher.child import spawn


def _fail() -> None:
    raise RuntimeError("setup step failed on purpose")


def test_failure_before_exec_is_a_launch_error() -> None:
    a, b = socket.socketpair()
    with a, b:
        with pytest.raises(LaunchError, match="setup step failed on purpose"):
            spawn(["/bin/true"], {}, {3: b.fileno()}, stdout_fd=b.fileno(), setups=[_fail],
                  pdeathsig=False)


def test_missing_binary_is_a_launch_error() -> None:
    with pytest.raises(LaunchError, match="command not found"):
        spawn(["no-such-hypervisor-binary"], {}, {}, stdout_fd=1, pdeathsig=False)


def test_child_sees_only_its_fds_and_a_clean_environment() -> None:
    a, b = socket.socketpair()
    leak = os.open("/dev/null", os.O_RDONLY)  # inheritable on purpose: must not leak
    os.set_inheritable(leak, True)
    os.environ["SVIRT_SECRET"] = "do-not-leak"  # noqa: S105 - a marker, not a password
    try:
        with a, b:
            pid = spawn(["/bin/sh", "-c", "ls /proc/self/fd; env; echo done >&3"],
                        {"ONLY": "this"}, {3: b.fileno()}, stdout_fd=b.fileno(),
                        pdeathsig=False)
            b.close()
            _, status = os.waitpid(pid, 0)
            out = b""
            while chunk := a.recv(65536):
                out += chunk
    finally:
        os.close(leak)
        del os.environ["SVIRT_SECRET"]
    assert os.waitstatus_to_exitcode(status) == 0
    text = out.decode()
    fds = sorted(int(x) for x in text.split("\n") if x.strip().isdigit())
    assert fds == [0, 1, 2, 3, 4] or fds == [0, 1, 2, 3]  # 4: ls's own /proc dir fd
    assert "ONLY=this" in text and "SVIRT_SECRET" not in text
    assert "done" in text
