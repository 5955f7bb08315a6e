"""A seccomp filter that lets Debian 12's UML run on hosts with AMX.

UML 6.1 saves a guest process's FPU state with ``PTRACE_GETREGSET /
PTRACE_SETREGSET NT_X86_XSTATE`` and a buffer sized for AVX-512 (2696 bytes).
A host CPU with AMX makes the kernel's user xstate 11008 bytes, and the
kernel refuses a set of any other size with EFAULT: UML's init dies with
"ptrace set fp regs failed, errno = 14".  When ``NT_X86_XSTATE`` fails at its
first probe UML falls back to ``PTRACE_GETFPREGS``/``SETFPREGS`` (the 512-byte
FXSAVE area), which works everywhere.  This filter makes exactly that probe
(and any later use) fail with EIO for the UML process and its children.

FXSAVE does not cover AVX registers, so the launcher also tells glibc in the
guest not to use AVX (``GLIBC_TUNABLES`` on the UML command line, which the
guest kernel hands to init as environment); see
:data:`svirt.backends.uml.NO_AVX_TUNABLES`.

Installed in the child as root, before the uid switch (a filter needs
CAP_SYS_ADMIN or no_new_privs); it only removes abilities, and it is
inherited by everything the hypervisor starts.
"""

from __future__ import annotations

import ctypes
import struct
from collections.abc import Callable

from svirt.errors import LaunchError

_PR_SET_SECCOMP = 22
_SECCOMP_MODE_FILTER = 2
_AUDIT_ARCH_X86_64 = 0xC000003E
_NR_PTRACE = 101
_PTRACE_GETREGSET = 0x4204
_PTRACE_SETREGSET = 0x4205
_NT_X86_XSTATE = 0x202
_EIO = 5
_RET_ALLOW = 0x7FFF0000
_RET_ERRNO = 0x00050000
_LD_W_ABS, _JEQ, _RET = 0x20, 0x15, 0x06
# offsets into struct seccomp_data
_NR, _ARCH, _ARG0, _ARG2 = 0, 4, 16, 32


def _stmt(code: int, k: int) -> bytes:
    return struct.pack("HBBI", code, 0, 0, k)


def _jeq(k: int, jt: int, jf: int) -> bytes:
    return struct.pack("HBBI", _JEQ, jt, jf, k)


def xstate_filter() -> bytes:
    """BPF: ptrace(GETREGSET|SETREGSET, pid, NT_X86_XSTATE, ...) -> EIO; else allow."""
    return b"".join([
        _stmt(_LD_W_ABS, _ARCH), _jeq(_AUDIT_ARCH_X86_64, 1, 0), _stmt(_RET, _RET_ALLOW),
        _stmt(_LD_W_ABS, _NR), _jeq(_NR_PTRACE, 1, 0), _stmt(_RET, _RET_ALLOW),
        _stmt(_LD_W_ABS, _ARG0), _jeq(_PTRACE_GETREGSET, 2, 0),
        _jeq(_PTRACE_SETREGSET, 1, 0), _stmt(_RET, _RET_ALLOW),
        _stmt(_LD_W_ABS, _ARG2), _jeq(_NT_X86_XSTATE, 1, 0), _stmt(_RET, _RET_ALLOW),
        _stmt(_RET, _RET_ERRNO | _EIO),
    ])


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def hide_xstate_in_child() -> Callable[[], None]:
    """A child setup step (prepared in the parent: no ctypes loading after fork)."""
    return install_in_child(xstate_filter(), "UML's xstate")


_NR_UNSHARE, _NR_CLONE, _NR_CLONE3 = 272, 56, 435
_NR_PROCESS_VM_READV, _NR_PROCESS_VM_WRITEV, _NR_PIDFD_OPEN = 310, 311, 434
_CLONE_NEWUSER = 0x10000000
_PTRACE_ATTACH, _PTRACE_SEIZE = 16, 0x4206
_EPERM, _ENOSYS = 1, 38
_JSET = 0x45
_ARG1 = 24


def _assemble(program: list[tuple[str, int, str | None, str | None] | str]) -> bytes:
    """A tiny BPF assembler: ("ld", offset) / ("jeq"|"jset", k, true, false) /
    ("ret", value); a bare string is a label; jump targets are labels."""
    labels: dict[str, int] = {}
    code: list[tuple[str, int, str | None, str | None]] = []
    for item in program:
        if isinstance(item, str):
            labels[item] = len(code)
        else:
            code.append(item)
    out = []
    for pc, (op, k, t, f) in enumerate(code):
        if op == "ld":
            out.append(_stmt(_LD_W_ABS, k))
        elif op == "ret":
            out.append(_stmt(_RET, k))
        else:
            jt = labels[t] - pc - 1 if t else 0
            jf = labels[f] - pc - 1 if f else 0
            out.append(struct.pack("HBBI", _JSET if op == "jset" else _JEQ, jt, jf, k))
    return b"".join(out)


def jail_filter() -> bytes:
    """BPF for every jailed hypervisor and its children:

    - no new user namespace (unshare or clone with CLONE_NEWUSER -> EPERM;
      clone3 -> ENOSYS, so that libc falls back to clone): from one, a guest
      would reach kernel code only namespace root may use;
    - nobody touches PID 1 of the jail (tini, which runs as the guest's uid):
      ptrace attach/seize, process_vm_readv/writev and pidfd_open of pid 1 ->
      EPERM.  UML's own tracing of its children is untouched.
    """
    return _assemble([
        ("ld", _ARCH, None, None), ("jeq", _AUDIT_ARCH_X86_64, "native", "allow"),
        "native",
        ("ld", _NR, None, None),
        ("jeq", _NR_CLONE3, "enosys", "not_clone3"),
        "not_clone3",
        ("jeq", _NR_UNSHARE, "flags", "not_unshare"),
        "not_unshare",
        ("jeq", _NR_CLONE, "flags", "not_clone"),
        "flags",
        ("ld", _ARG0, None, None), ("jset", _CLONE_NEWUSER, "eperm", "allow"),
        "not_clone",
        ("jeq", _NR_PTRACE, "ptrace", "not_ptrace"),
        "ptrace",
        ("ld", _ARG0, None, None),
        ("jeq", _PTRACE_ATTACH, "target", "not_attach"),
        "not_attach",
        ("jeq", _PTRACE_SEIZE, "target", "allow"),
        "target",
        ("ld", _ARG1, None, None), ("jeq", 1, "eperm", "allow"),
        "not_ptrace",
        ("jeq", _NR_PROCESS_VM_READV, "pid0", "not_readv"),
        "not_readv",
        ("jeq", _NR_PROCESS_VM_WRITEV, "pid0", "not_writev"),
        "not_writev",
        ("jeq", _NR_PIDFD_OPEN, "pid0", "allow"),
        "pid0",
        ("ld", _ARG0, None, None), ("jeq", 1, "eperm", "allow"),
        "eperm", ("ret", _RET_ERRNO | _EPERM, None, None),
        "enosys", ("ret", _RET_ERRNO | _ENOSYS, None, None),
        "allow", ("ret", _RET_ALLOW, None, None),
    ])


def install_in_child(program: bytes, what: str = "the jail") -> Callable[[], None]:
    """A child step installing ``program`` (after no_new_privs, or as root)."""
    libc = ctypes.CDLL(None, use_errno=True)
    buf = ctypes.create_string_buffer(program, len(program))
    prog = _SockFprog(len(program) // 8, ctypes.addressof(buf))

    def install() -> None:
        if libc.prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.byref(prog), 0, 0) != 0:
            raise LaunchError(f"seccomp filter for {what}: errno {ctypes.get_errno()}")
        _ = buf

    return install
