"""UML on AMX hosts: the probe, the argv word and the seccomp program."""

from __future__ import annotations

import struct
from pathlib import Path

from svirt.backends.base import Prepared
from svirt.backends.uml import NO_AVX_TUNABLES, build_uml_argv
from svirt.host import probe_uml_xstate_fallback
from svirt.launcher.seccomp import jail_filter, xstate_filter
from svirt.spec import Backend, GuestSpec


def test_probe_reads_the_amx_flag(tmp_path: Path) -> None:
    amx = tmp_path / "amx"
    amx.write_text("processor : 0\nflags : fpu sse avx512f amx_tile amx_int8\n")
    plain = tmp_path / "plain"
    plain.write_text("processor : 0\nflags : fpu sse avx2 avx512f\n")
    assert probe_uml_xstate_fallback(amx) is True
    assert probe_uml_xstate_fallback(plain) is False
    assert probe_uml_xstate_fallback(tmp_path / "missing") is False


def test_no_avx_word_only_when_asked(tmp_path: Path) -> None:
    kernel = tmp_path / "linux"
    kernel.write_bytes(b"\x7fELF")
    spec = GuestSpec(name="u", backend=Backend.UML, kernel=kernel, memory=64)
    assert NO_AVX_TUNABLES not in build_uml_argv(spec, Prepared(run_dir=tmp_path))
    argv = build_uml_argv(spec, Prepared(run_dir=tmp_path, no_avx=True))
    assert NO_AVX_TUNABLES in argv
    assert argv.index(NO_AVX_TUNABLES) == argv.index("console=tty0") + 1


def _run_bpf(prog: bytes, data: bytes) -> int:
    """A tiny interpreter for the opcodes the filter uses (ld abs, jeq, ret)."""
    insns = [struct.unpack("HBBI", prog[i:i + 8]) for i in range(0, len(prog), 8)]
    pc, acc = 0, 0
    while True:
        code, jt, jf, k = insns[pc]
        if code == 0x20:
            (acc,) = struct.unpack_from("<I", data, k)
            pc += 1
        elif code == 0x15:
            pc += 1 + (jt if acc == k else jf)
        elif code == 0x45:
            pc += 1 + (jt if acc & k else jf)
        elif code == 0x06:
            return int(k)
        else:
            raise AssertionError(f"unexpected opcode {code:#x}")


def _data(nr: int, args: tuple[int, ...], arch: int = 0xC000003E) -> bytes:
    return struct.pack("<iIQ6Q", nr, arch, 0, *(args + (0,) * (6 - len(args))))


def test_filter_refuses_only_the_xstate_regset() -> None:
    prog = xstate_filter()
    allow, eio = 0x7FFF0000, 0x00050005
    assert _run_bpf(prog, _data(101, (0x4204, 7, 0x202))) == eio  # GETREGSET xstate
    assert _run_bpf(prog, _data(101, (0x4205, 7, 0x202))) == eio  # SETREGSET xstate
    assert _run_bpf(prog, _data(101, (0x4204, 7, 1))) == allow  # NT_PRSTATUS
    assert _run_bpf(prog, _data(101, (14, 7, 0))) == allow  # GETFPREGS
    assert _run_bpf(prog, _data(0, (0x4204, 7, 0x202))) == allow  # read()
    assert _run_bpf(prog, _data(101, (0x4204, 7, 0x202), arch=0x40000003)) == allow


def test_jail_filter() -> None:
    prog = jail_filter()
    allow, eperm, enosys = 0x7FFF0000, 0x00050001, 0x00050026
    newuser = 0x10000000
    assert _run_bpf(prog, _data(272, (newuser,))) == eperm  # unshare(CLONE_NEWUSER)
    assert _run_bpf(prog, _data(272, (newuser | 0x20000,))) == eperm
    assert _run_bpf(prog, _data(272, (0x20000,))) == allow  # unshare(CLONE_NEWNS)
    assert _run_bpf(prog, _data(56, (newuser | 17,))) == eperm  # clone
    assert _run_bpf(prog, _data(56, (0x100 | 17,))) == allow  # UML's clones
    assert _run_bpf(prog, _data(435, (0,))) == enosys  # clone3
    assert _run_bpf(prog, _data(101, (16, 1))) == eperm  # PTRACE_ATTACH 1
    assert _run_bpf(prog, _data(101, (0x4206, 1))) == eperm  # PTRACE_SEIZE 1
    assert _run_bpf(prog, _data(101, (16, 7))) == allow  # UML attaches its own
    assert _run_bpf(prog, _data(101, (0, 0))) == allow  # PTRACE_TRACEME
    assert _run_bpf(prog, _data(310, (1,))) == eperm
    assert _run_bpf(prog, _data(311, (1,))) == eperm
    assert _run_bpf(prog, _data(434, (1,))) == eperm
    assert _run_bpf(prog, _data(434, (5,))) == allow
    assert _run_bpf(prog, _data(0, (1,))) == allow  # read
