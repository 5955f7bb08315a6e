"""The jail's seccomp filter, attacked through the kernel's other system call
ABIs: a compiled stand-in (``foreign_abi.c``), launched through the real
launch path as a UML kernel (with and without UML's xstate filter stacked
under the jail's) and as QEMU, makes the 32-bit (``int $0x80``) and x32
forms of unshare(CLONE_NEWUSER), clone and clone3 into new namespaces,
ptrace attach/seize of PID 1 (tini), pidfd_open(1) and process_vm_readv(1),
each in a child of its own.  Every one must be killed by the filter; then
the stand-in makes a 32-bit call itself, and the guest's outcome must be
the hypervisor's death by SIGSYS.

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
from svirt.images.build import TinyGuest
from svirt.launcher import child
from svirt.launcher.launch import launch
from svirt.launcher.registry import Registry
from svirt.launcher.supervisor import OutcomeKind
from svirt.spec import Backend, GuestSpec
from svirt.testing import tiny_spec

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
                         cmdline="svirt.die", shutdown_timeout=0.5)
    else:
        binary = foreign_abi.build(image_dir)
        if shape == "uml+xstate":
            # UML's xstate filter under the jail's, as on an AMX host
            host = dataclasses.replace(host, uml_xstate_fallback=True)
        spec = GuestSpec(name="foreign-abi-u", backend="uml",  # type: ignore[arg-type]
                         kernel=binary, memory=32, cmdline="svirt.die",
                         shutdown_timeout=0.5)
    kernel = foreign_abi.run_unjailed(binary)
    assert spec.jail
    started = time.monotonic()
    with launch(spec, registry=hostile_registry, host=host) as guest:
        guest_uids.add(guest.guest_uid or 0)
        report = foreign_abi.parse(guest.console.expect(foreign_abi.LINE, TIMEOUT))
        (standin,) = children(guest.pid)
        st = _status(standin)
        # the same file (by inode: a path read back through the jail's root
        # names it from wherever the reader's root is, e.g. in a chroot)
        assert os.path.samestat(os.stat(f"/proc/{standin}/exe"), os.stat(binary))
        assert int(st["Uid"].split()[0]) != 0 and st["NoNewPrivs"] == "1"
        assert st["Seccomp"] == "2", f"the stand-in runs without a filter: {st['Seccomp']}"
        assert os.readlink(f"/proc/{standin}/ns/pid") != os.readlink("/proc/self/ns/pid")
        # then the hypervisor process itself makes a 32-bit call: it dies of it
        os.kill(standin, signal.SIGUSR1)
        outcome = guest.wait(TIMEOUT)
        if outcome is None:
            os.kill(standin, signal.SIGKILL)
        guest.stop()
    print(f"\n{shape}: {time.monotonic() - started:.1f} s, outcome {outcome}; "
          f"unjailed, this kernel: {kernel}\n"
          + foreign_abi.table(report))
    problems = foreign_abi.problems(report, kernel, xstate=shape == "uml+xstate")
    if outcome is None or outcome.signal != signal.SIGSYS:
        problems.append(f"the hypervisor's own i386 call: {outcome}")
    assert not problems, "foreign-ABI calls the jail let through:\n  " + "\n  ".join(problems)


def test_a_real_uml_guest_boots_jailed_under_both_filters(
    tiny_uml: TinyGuest, hostile_registry: Registry, host: HostInfo, guest_uids: set[int],
) -> None:
    """UML's xstate filter (forced, as on an AMX host) with the jail's stacked
    on it: UML's probe of NT_X86_XSTATE gets EIO, it falls back to FXSAVE,
    and its guest boots; every process of it carries both filters."""
    host = dataclasses.replace(host, uml_xstate_fallback=True)
    spec = tiny_spec(tiny_uml, "xstate-uml", Backend.UML)
    assert spec.jail
    with launch(spec, registry=hostile_registry, host=host) as guest:
        guest_uids.add(guest.guest_uid or 0)
        guest.console.expect_line("SVIRT-READY", timeout=60)
        (uml,) = children(guest.pid)
        for pid in (uml, *children(uml)):
            st = _status(pid)
            assert (st["Seccomp"], st["Seccomp_filters"]) == ("2", "2"), (pid, st["Seccomp"])
        outcome = guest.stop()
    assert outcome.kind is OutcomeKind.POWEROFF, outcome
