"""The jail's seccomp filter, attacked through the kernel's other system call
ABIs: a compiled stand-in (``foreign_abi.c``), launched through the real
launch path as a UML kernel (with and without UML's xstate filter stacked
under the jail's) and as QEMU, makes the 32-bit (``int $0x80``) and x32
forms of unshare(CLONE_NEWUSER), clone and clone3 into new namespaces,
ptrace attach/seize of PID 1 (tini), pidfd_open(1) and process_vm_readv(1),
each in a child of its own.  Every one must be killed by the filter.

The filter this replaced allowed any architecture other than x86_64 and
never looked at x32 numbers: there, on this kernel, the i386 unshare,
clones, clone3, ptrace attach and seize and pidfd_open of PID 1 succeed and
process_vm_readv(1) gets as far as PID 1's memory (EFAULT: nothing of it
mapped below 4 GiB).
"""

from __future__ import annotations

import dataclasses
import os
import signal
import time
from pathlib import Path

import pytest

from svirt.host import QEMU_BINARY, HostInfo
from svirt.launcher import child
from svirt.launcher.launch import launch
from svirt.launcher.state import Registry
from svirt.spec import GuestSpec

from . import foreign_abi
from .jail_attack import children

TIMEOUT = 30.0


def _status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        return {k: v.strip() for k, _, v in (line.partition(":") for line in f)}


@pytest.mark.parametrize("shape", ["uml", "uml+xstate", "qemu"])
def test_foreign_abi_calls_die_in_the_jail(
    shape: str, image_dir: Path, hostile_registry: Registry, host: HostInfo,
    guest_uids: set[int], monkeypatch: pytest.MonkeyPatch,
) -> None:
    if shape == "qemu":
        # the stand-in is the QEMU binary: spawn finds qemu-system-x86_64 on
        # its PATH, and the same file is the spec's kernel, so the jail holds it
        bindir = image_dir / "bin"
        bindir.mkdir(mode=0o755)
        binary = foreign_abi.build(bindir, QEMU_BINARY)
        monkeypatch.setattr(child, "CLEAN_PATH", f"{bindir}:{child.CLEAN_PATH}")
        spec = GuestSpec(name="foreign-abi-q", backend="qemu",  # type: ignore[arg-type]
                         kernel=binary, accel="tcg", memory=32,  # type: ignore[arg-type]
                         shutdown_timeout=0.5)
    else:
        binary = foreign_abi.build(image_dir)
        if shape == "uml+xstate":
            # UML's xstate filter under the jail's, as on an AMX host
            host = dataclasses.replace(host, uml_xstate_fallback=True)
        spec = GuestSpec(name="foreign-abi-u", backend="uml",  # type: ignore[arg-type]
                         kernel=binary, memory=32, shutdown_timeout=0.5)
    kernel = foreign_abi.run_unjailed(binary)
    assert spec.jail
    started = time.monotonic()
    with launch(spec, registry=hostile_registry, host=host) as guest:
        guest_uids.add(guest.guest_uid or 0)
        report = foreign_abi.parse(guest.console.expect(foreign_abi.LINE, TIMEOUT))
        (standin,) = children(guest.pid)
        st = _status(standin)
        assert os.path.realpath(f"/proc/{standin}/exe") == str(binary)
        assert int(st["Uid"].split()[0]) != 0 and st["NoNewPrivs"] == "1"
        assert st["Seccomp"] == "2", f"the stand-in runs without a filter: {st['Seccomp']}"
        assert os.readlink(f"/proc/{standin}/ns/pid") != os.readlink("/proc/self/ns/pid")
        # it ends on SIGTERM (QEMU's stop ladder would first wait for a QMP it does not speak)
        os.kill(standin, signal.SIGTERM)
        guest.wait(TIMEOUT)
        guest.stop()
    print(f"\n{shape}: {time.monotonic() - started:.1f} s; unjailed, this kernel: {kernel}\n"
          + foreign_abi.table(report))
    problems = foreign_abi.problems(report, kernel)
    assert not problems, "foreign-ABI calls the jail let through:\n  " + "\n  ".join(problems)
