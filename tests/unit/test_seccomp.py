"""The seccomp filters (svirt/launcher/seccomp.py), read two ways:

- the BPF program libseccomp made, run by a small classic-BPF interpreter on
  chosen ``struct seccomp_data`` (every architecture and x32 number, the
  argument masks), so that each verdict is checked exactly;
- the same programs loaded by the kernel in a forked child (no_new_privs,
  then the filters in the launcher's order, then the guest-like uid), which
  execs the compiled foreign-ABI stand-in (tests/hostile/foreign_abi.c): its
  i386 and x32 calls must die by SIGSYS, its native ones get the jail's
  answers.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import struct
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from svirt.launcher.seccomp import install_in_child, jail_filter, xstate_filter
from tests.hostile import foreign_abi

# linux/audit.h, linux/seccomp.h: the kernel's numbers, not the product's
X86_64, I386, AARCH64 = 0xC000003E, 0x40000003, 0xC00000B7
X32 = 0x40000000
ACT_ALLOW, ACT_KILL_PROCESS = 0x7FFF0000, 0x80000000
EPERM, EIO, ENOSYS = 0x00050001, 0x00050005, 0x00050026
NEWUSER = 0x10000000


def run_bpf(prog: bytes, nr: int, args: tuple[int, ...] = (), arch: int = X86_64) -> int:
    """Classic BPF as the kernel runs a seccomp filter (the opcodes libseccomp
    emits: ld abs/imm/mem, st, alu and/or/add/sub/rsh/lsh, jeq/jgt/jge/jset,
    ja, ret k/a, tax/txa)."""
    data = struct.pack("<iIQ6Q", nr, arch, 0, *(args + (0,) * (6 - len(args))))
    insns = [struct.unpack("HBBI", prog[i:i + 8]) for i in range(0, len(prog), 8)]
    pc, a, x, mem = 0, 0, 0, [0] * 16
    alu: dict[int, Callable[[int, int], int]] = {
        0x00: lambda p, q: p + q, 0x10: lambda p, q: p - q, 0x40: lambda p, q: p | q,
        0x50: lambda p, q: p & q, 0x60: lambda p, q: p << q, 0x70: lambda p, q: p >> q}
    jumps: dict[int, Callable[[int, int], bool]] = {
        0x10: lambda p, q: p == q, 0x20: lambda p, q: p > q, 0x30: lambda p, q: p >= q,
        0x40: lambda p, q: bool(p & q)}
    while True:
        code, jt, jf, k = insns[pc]
        pc += 1
        cls, op, src = code & 0x07, code & 0xF0, code & 0x08
        if code == 0x20:  # ld [k]
            (a,) = struct.unpack_from("<I", data, k)
        elif code == 0x00:  # ld #k
            a = k
        elif code == 0x60:  # ld M[k]
            a = mem[k]
        elif code == 0x02:  # st M[k]
            mem[k] = a
        elif code == 0x06:  # ret #k
            return int(k)
        elif code == 0x16:  # ret a
            return a
        elif code == 0x07:  # tax
            x = a
        elif code == 0x87:  # txa
            a = x
        elif code == 0x05:  # ja
            pc += k
        elif cls == 0x04 and op in alu:
            a = alu[op](a, x if src else k) & 0xFFFFFFFF
        elif cls == 0x05 and op in jumps:
            pc += jt if jumps[op](a, x if src else k) else jf
        else:
            raise AssertionError(f"opcode {code:#x} at {pc - 1}: not in this interpreter")


def test_jail_filter_native_rules() -> None:
    prog = jail_filter()
    cases = [
        (272, (NEWUSER,), EPERM),  # unshare(CLONE_NEWUSER)
        (272, (NEWUSER | 0x20000,), EPERM),
        (272, ((1 << 40) | NEWUSER,), EPERM),  # high bits do not hide it
        (272, (0x20000,), ACT_ALLOW),  # unshare(CLONE_NEWNS)
        (56, (NEWUSER | 17,), EPERM),  # clone
        (56, (0x100 | 17,), ACT_ALLOW),  # UML's clones
        (435, (0,), ENOSYS),  # clone3
        (101, (16, 1), EPERM),  # PTRACE_ATTACH 1
        (101, (0x4206, 1), EPERM),  # PTRACE_SEIZE 1
        (101, (16, (1 << 32) | 1), EPERM),  # the kernel truncates pid to pid_t
        (101, (16, 7), ACT_ALLOW),  # UML attaches its own
        (101, (0, 0), ACT_ALLOW),  # PTRACE_TRACEME
        (310, (1,), EPERM),  # process_vm_readv(1)
        (311, (1,), EPERM),  # process_vm_writev(1)
        (434, (1,), EPERM),  # pidfd_open(1)
        (434, ((1 << 32) | 1,), EPERM),
        (434, (5,), ACT_ALLOW),
        (302, (1, 7, 0), EPERM),  # prlimit64(1, RLIMIT_NOFILE, ...)
        (302, ((1 << 32) | 1, 7, 0), EPERM),
        (302, (0, 7, 0), ACT_ALLOW),  # its own limits
        (302, (5, 7, 0), ACT_ALLOW),
        (0, (1,), ACT_ALLOW),  # read
        (39, (), ACT_ALLOW),  # getpid
        (-1, (), ACT_ALLOW),  # a call a tracer skipped (nr -1) is no x32 call
    ]
    for nr, args, expected in cases:
        got = run_bpf(prog, nr, args)
        assert got == expected, f"nr {nr} args {args}: {got:#x}, expected {expected:#x}"


def test_jail_filter_kills_every_foreign_abi_call() -> None:
    """Any number of another architecture, and any x32 number (native arch,
    bit 30 set), whatever the arguments: the kill, before any rule."""
    prog = jail_filter()
    for nr in (*range(0, 460), 0x3FFFFFFF):
        for args in ((), (NEWUSER,), (16, 1), (1,)):
            assert run_bpf(prog, nr, args, I386) == ACT_KILL_PROCESS, (nr, args)
            assert run_bpf(prog, nr, args, AARCH64) == ACT_KILL_PROCESS, (nr, args)
            assert run_bpf(prog, X32 | nr, args) == ACT_KILL_PROCESS, (nr, args)


def test_xstate_filter_refuses_only_the_xstate_regset() -> None:
    prog = xstate_filter()
    assert run_bpf(prog, 101, (0x4204, 7, 0x202)) == EIO  # GETREGSET xstate
    assert run_bpf(prog, 101, (0x4205, 7, 0x202)) == EIO  # SETREGSET xstate
    assert run_bpf(prog, 101, (0x4204, 7, (1 << 32) | 0x202)) == EIO  # truncated to uint
    assert run_bpf(prog, 101, (0x4204, 7, 1)) == ACT_ALLOW  # NT_PRSTATUS
    assert run_bpf(prog, 101, (14, 7, 0)) == ACT_ALLOW  # GETFPREGS
    assert run_bpf(prog, 0, (0x4204, 7, 0x202)) == ACT_ALLOW  # read()
    # a compatibility shim, not a boundary: other ABIs pass (UML makes none;
    # the jail's filter stacked on it kills them)
    assert run_bpf(prog, 26, (0x4204, 7, 0x202), I386) == ACT_ALLOW
    assert run_bpf(prog, X32 | 521, (0x4204, 7, 0x202)) == ACT_ALLOW


# ------------------------------------------------------------ the kernel's view
@pytest.fixture(scope="module")
def standin() -> Iterator[Path]:
    directory = Path(tempfile.mkdtemp(prefix="svirt-seccomp-"))
    directory.chmod(0o755)  # the child runs it as nobody
    try:
        yield foreign_abi.build(directory)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _filtered(binary: Path, programs: list[bytes], attempts: tuple[str, ...]) -> dict[str, str]:
    """Fork; the child sets no_new_privs, installs ``programs`` in order,
    becomes nobody (when root) and execs the stand-in; its report."""
    libc = ctypes.CDLL(None, use_errno=True)
    steps = [install_in_child(p) for p in programs]  # made before fork, as the launcher does
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.close(r)
            os.dup2(w, 1)
            if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS
                os._exit(3)
            for step in steps:
                step()
            if os.getuid() == 0:
                os.setgroups([])
                os.setresgid(65534, 65534, 65534)
                os.setresuid(65534, 65534, 65534)
            os.execv(binary, [str(binary), "--once", "--only", *attempts])  # noqa: S606
        finally:
            os._exit(127)
    os.close(w)
    out = b""
    while chunk := os.read(r, 65536):
        out += chunk
    os.close(r)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, f"the stand-in: status {status}, {out!r}"
    return foreign_abi.parse(out)


ALL = (*foreign_abi.NATIVE, *foreign_abi.PROBES, *foreign_abi.ATTACKS)


@pytest.mark.parametrize("stack", ["jail", "xstate+jail"])
def test_the_kernel_kills_foreign_abi_calls_under_the_jail_filter(
    standin: Path, stack: str
) -> None:
    programs = ([xstate_filter()] if stack == "xstate+jail" else []) + [jail_filter()]
    kernel = foreign_abi.run_unjailed(standin)
    report = _filtered(standin, programs, ALL)
    problems = foreign_abi.problems(report, kernel, xstate=stack == "xstate+jail")
    assert not problems, "\n".join(problems) + "\n" + foreign_abi.table(report)


def test_the_xstate_filter_alone_refuses_only_the_xstate_regset(standin: Path) -> None:
    """``jail = false`` on an AMX host: only UML's regset probe is refused."""
    kernel = foreign_abi.run_unjailed(standin)
    report = _filtered(standin, [xstate_filter()], (*foreign_abi.NATIVE, *foreign_abi.PROBES))
    assert report[foreign_abi.XSTATE] == "errno: EIO", report
    assert report[foreign_abi.PRSTATUS].startswith("ok: "), report
    assert report["native getpid"].startswith("ok: ")
    for name in foreign_abi.PROBES:  # "ok: PID" (pids differ), "errno: ENOSYS", ...
        assert report[name].partition(" ")[0] == kernel[name].partition(" ")[0], report
        assert report[name].startswith("ok: ") or report[name] == kernel[name], report


def test_no_libseccomp_is_a_host_error_before_anything_runs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without libseccomp.so.2 the filter cannot be made: the launch stops
    (in the launcher, before fork) with a hint, never runs unfiltered."""
    from svirt.errors import HostError
    from svirt.launcher import seccomp

    monkeypatch.setattr(seccomp, "LIBSECCOMP", "libseccomp-svirt-absent.so.9")
    for cached in (seccomp._libseccomp, seccomp.jail_filter, seccomp.xstate_filter):
        cached.cache_clear()
    try:
        with pytest.raises(HostError, match="libseccomp") as err:
            seccomp.jail_filter()
        assert err.value.hint is not None and "libseccomp2" in err.value.hint
    finally:
        for cached in (seccomp._libseccomp, seccomp.jail_filter, seccomp.xstate_filter):
            cached.cache_clear()
