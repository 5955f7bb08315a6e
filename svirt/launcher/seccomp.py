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
    libc = ctypes.CDLL(None, use_errno=True)
    program = xstate_filter()
    buf = ctypes.create_string_buffer(program, len(program))
    prog = _SockFprog(len(program) // 8, ctypes.addressof(buf))

    def install() -> None:
        if libc.prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.byref(prog), 0, 0) != 0:
            raise LaunchError(f"seccomp filter for UML: errno {ctypes.get_errno()}")
        _ = buf  # keep the program alive until it is installed

    return install
