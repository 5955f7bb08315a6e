"""The hypervisor's seccomp filters, built with libseccomp.

Two filters, each a list of rules (:data:`JAIL_RULES`, :data:`XSTATE_RULES`)
that libseccomp (``libseccomp.so.2``, Debian's ``libseccomp2``, loaded with
ctypes) compiles to classic BPF in the launcher; the child between fork and
exec only hands the finished program to ``prctl(PR_SET_SECCOMP)``: nothing
that allocates or takes a lock runs after fork.  Each program is built once
per process (it never changes) and cached.

The jail's filter (:func:`jail_filter`), for every hypervisor and its
children (a ``jail = false`` one too: it needs no namespace; installed as
root before the uid switch there, after ``no_new_privs`` in the jail):

- **only the native ABI.**  An x86_64 kernel also takes the i386 ABI
  (``int $0x80``, ``sysenter``; the filter sees ``AUDIT_ARCH_I386`` and i386
  numbers) and, where built in, x32 (the native entry with bit 30 of the
  number set).  Rules written for native numbers do not match either, so
  the filter's verdict on a foreign-ABI call is a kill of the whole process
  (``SECCOMP_RET_KILL_PROCESS``, SIGSYS): no hypervisor makes one, and a
  process that does is hostile.  libseccomp puts the architecture check and
  the x32 check first (its "bad architecture" action), which hand-written
  filters tend to get wrong (the filter this one replaced allowed every
  other architecture);
- **no new user namespace**: ``unshare`` or ``clone`` with ``CLONE_NEWUSER``
  -> EPERM; ``clone3`` -> ENOSYS (its flags sit in memory the filter cannot
  read), so that libc falls back to ``clone``.  From a user namespace a
  guest would reach kernel code only namespace root may use;
- **hands off PID 1** of the jail (tini, which runs as the guest's uid):
  ptrace attach/seize, ``process_vm_readv/writev``, ``pidfd_open`` and
  ``prlimit64`` (which asks only for the same uid: a guest could lower
  tini's limits) of pid 1 -> EPERM.  A pid is compared on its low 32 bits, as the kernel
  truncates it to ``pid_t``.  UML's own tracing of its children is untouched;
- **no host-wide SysV IPC ids** (``shmget``/``msgget``/``semget`` -> EPERM):
  their limits are the host's, and a ``jail = false`` guest has no IPC
  namespace of its own;
- **no set-uid or set-gid file** (``chmod``/``fchmod``/``fchmodat(2)``/
  ``mknod``/``mknodat`` with those bits, ``open``/``openat``/``creat``
  creating with them -> EPERM; ``openat2`` -> ENOSYS): another user running
  one would hold the guest's uid past its release;
- **no disk space past a file's end**: ``fallocate`` with
  ``FALLOC_FL_KEEP_SIZE`` but not ``PUNCH_HOLE`` (plain or with
  ``ZERO_RANGE``), and ``FALLOC_FL_INSERT_RANGE``, -> EOPNOTSUPP.  They
  allocate blocks without growing the size, which ``RLIMIT_FSIZE`` bounds
  (:mod:`svirt.launcher.bounds`): a guest's writable disk could take the
  whole image file system.  QEMU falls back to plain writes on EOPNOTSUPP;
  punching holes (discard) stays allowed;
- **no io_uring** (``io_uring_setup``, ``_enter``, ``_register`` ->
  ENOSYS, as on a kernel without it): a ring's operations are made by the
  kernel's io-wq workers, which seccomp never sees, so a guest would make
  through a ring the calls the rules above refuse (``IORING_OP_FALLOCATE``
  with ``KEEP_SIZE`` filled the image file system past its disk's end).
  QEMU and UML do without it (QEMU's fd monitor falls back to epoll; its
  ``aio=io_uring`` is not something svirt asks for);
- **no kernel keyring** (``add_key``, ``request_key``, ``keyctl`` ->
  ENOSYS, as on a kernel without keys): the user keyring belongs to the
  uid, hangs off the user namespace and outlives every process of it, so
  what one guest left there the next guest given the uid would read
  (reproduced through the launch path).  Neither hypervisor needs it.

UML's xstate filter (:func:`xstate_filter`) lets Debian 12's UML run on hosts
with AMX.  UML 6.1 saves a guest process's FPU state with
``PTRACE_GETREGSET / PTRACE_SETREGSET NT_X86_XSTATE`` and a buffer sized for
AVX-512 (2696 bytes).  A host CPU with AMX makes the kernel's user xstate
11008 bytes, and the kernel refuses a set of any other size with EFAULT:
UML's init dies with "ptrace set fp regs failed, errno = 14".  When
``NT_X86_XSTATE`` fails at its first probe UML falls back to
``PTRACE_GETFPREGS``/``SETFPREGS`` (the 512-byte FXSAVE area), which works
everywhere.  This filter makes exactly that probe (and any later use) fail
with EIO for the UML process and its children.  FXSAVE does not cover AVX
registers, so the launcher also tells glibc in the guest not to use AVX
(``GLIBC_TUNABLES`` on the UML command line, which the guest kernel hands to
init as environment); see :data:`svirt.backends.uml.NO_AVX_TUNABLES`.  It is
a compatibility shim, not a boundary: other ABIs pass it unchanged (UML
makes only native calls), and where the guest is jailed the jail's filter,
stacked on it, kills them (of two filters the stricter verdict wins).  It is
installed as root before the uid switch (a filter needs CAP_SYS_ADMIN or
no_new_privs); it only removes abilities.
"""

from __future__ import annotations

import ctypes
import functools
import os
from collections.abc import Callable
from dataclasses import dataclass

from svirt.errors import HostError, LaunchError

LIBSECCOMP = "libseccomp.so.2"
_PR_SET_SECCOMP = 22
_SECCOMP_MODE_FILTER = 2

# actions (linux/seccomp.h, seccomp.h's SCMP_ACT_*)
ACT_KILL_PROCESS = 0x80000000
ACT_ALLOW = 0x7FFF0000
_ACT_ERRNO = 0x00050000


def act_errno(err: int) -> int:
    return _ACT_ERRNO | (err & 0xFFFF)


_EPERM, _EIO, _ENOSYS, _EOPNOTSUPP = 1, 5, 38, 95
# libseccomp's enum scmp_filter_attr / enum scmp_compare
_ATTR_ACT_BADARCH = 2
_CMP_EQ, _CMP_MASKED_EQ = 4, 7
_NR_SCMP_ERROR = -1

_CLONE_NEWUSER = 0x10000000
_PTRACE_ATTACH, _PTRACE_SEIZE = 16, 0x4206
_PTRACE_GETREGSET, _PTRACE_SETREGSET = 0x4204, 0x4205
_NT_X86_XSTATE = 0x202
_LOW32 = 0xFFFFFFFF
_FALLOC_KEEP_SIZE, _FALLOC_PUNCH_HOLE, _FALLOC_INSERT_RANGE = 0x01, 0x02, 0x20
_S_ISUID, _S_ISGID = 0o4000, 0o2000
_O_CREAT, _O_TMPFILE = 0o100, 0o20200000  # x86_64 (O_TMPFILE includes O_DIRECTORY)


@dataclass(frozen=True)
class Arg:
    """``(args[index] & mask) == value``; the mask covers all 64 bits unless
    given (a ``pid_t`` or ``int`` argument: its low 32 bits)."""

    index: int
    value: int
    mask: int | None = None


@dataclass(frozen=True)
class Rule:
    """``action`` for the syscall ``name`` when every one of ``args`` holds."""

    action: int
    name: str
    args: tuple[Arg, ...] = ()


@dataclass(frozen=True)
class Filter:
    """A default action, the action for any other ABI (another architecture
    or x32), and the rules for the native one."""

    default: int
    foreign: int
    rules: tuple[Rule, ...]


def _pid1(index: int) -> Arg:
    return Arg(index, 1, _LOW32)


def _no_setid_rules() -> tuple[Rule, ...]:
    """EPERM for every call that can give a file S_ISUID or S_ISGID: chmod
    and mknod with those mode bits, open/creat with them and O_CREAT or
    O_TMPFILE; ``openat2`` (its mode sits in memory the filter cannot read)
    -> ENOSYS, which libc does not need."""
    rules: list[Rule] = [Rule(act_errno(_ENOSYS), "openat2")]
    for bit in (_S_ISUID, _S_ISGID):
        rules += [Rule(act_errno(_EPERM), "chmod", (Arg(1, bit, bit),)),
                  Rule(act_errno(_EPERM), "fchmod", (Arg(1, bit, bit),)),
                  Rule(act_errno(_EPERM), "fchmodat", (Arg(2, bit, bit),)),
                  Rule(act_errno(_EPERM), "fchmodat2", (Arg(2, bit, bit),)),
                  Rule(act_errno(_EPERM), "mknod", (Arg(1, bit, bit),)),
                  Rule(act_errno(_EPERM), "mknodat", (Arg(2, bit, bit),)),
                  Rule(act_errno(_EPERM), "creat", (Arg(1, bit, bit),))]
        for create in (_O_CREAT, _O_TMPFILE):
            rules += [Rule(act_errno(_EPERM), "open", (Arg(1, create, create), Arg(2, bit, bit))),
                      Rule(act_errno(_EPERM), "openat",
                           (Arg(2, create, create), Arg(3, bit, bit)))]
    return tuple(rules)


JAIL_RULES = Filter(default=ACT_ALLOW, foreign=ACT_KILL_PROCESS, rules=(
    Rule(act_errno(_EPERM), "unshare", (Arg(0, _CLONE_NEWUSER, _CLONE_NEWUSER),)),
    Rule(act_errno(_EPERM), "clone", (Arg(0, _CLONE_NEWUSER, _CLONE_NEWUSER),)),
    Rule(act_errno(_ENOSYS), "clone3"),
    Rule(act_errno(_EPERM), "ptrace", (Arg(0, _PTRACE_ATTACH), _pid1(1))),
    Rule(act_errno(_EPERM), "ptrace", (Arg(0, _PTRACE_SEIZE), _pid1(1))),
    Rule(act_errno(_EPERM), "process_vm_readv", (_pid1(0),)),
    Rule(act_errno(_EPERM), "process_vm_writev", (_pid1(0),)),
    Rule(act_errno(_EPERM), "pidfd_open", (_pid1(0),)),
    Rule(act_errno(_EPERM), "prlimit64", (_pid1(0),)),
    Rule(act_errno(_EOPNOTSUPP), "fallocate",
         (Arg(1, _FALLOC_KEEP_SIZE, _FALLOC_KEEP_SIZE | _FALLOC_PUNCH_HOLE),)),
    Rule(act_errno(_EOPNOTSUPP), "fallocate",
         (Arg(1, _FALLOC_INSERT_RANGE, _FALLOC_INSERT_RANGE),)),
    # io_uring's operations (fallocate, openat, ...) run out of seccomp's
    # sight: with a ring, every rule above on an argument is void
    *(Rule(act_errno(_ENOSYS), name)
      for name in ("io_uring_setup", "io_uring_enter", "io_uring_register")),
    # the kernel keyring is per uid, not per guest, and outlives it
    *(Rule(act_errno(_ENOSYS), name) for name in ("add_key", "request_key", "keyctl")),
    # SysV IPC ids are host-wide (shmmni, msgmni, semmni): a guest without an
    # IPC namespace of its own (jail = false) could take them all
    *(Rule(act_errno(_EPERM), name) for name in ("shmget", "msgget", "semget")),
    # no set-uid or set-gid file of the guest's uid: another user running one
    # (a jail = false guest's /tmp, its own disk while it runs) would hold the
    # uid after release, when it belongs to the next guest
    *_no_setid_rules(),
))

# the regset type is truncated to unsigned int by the kernel: low 32 bits
XSTATE_RULES = Filter(default=ACT_ALLOW, foreign=ACT_ALLOW, rules=tuple(
    Rule(act_errno(_EIO), "ptrace", (Arg(0, request), Arg(2, _NT_X86_XSTATE, _LOW32)))
    for request in (_PTRACE_GETREGSET, _PTRACE_SETREGSET)
))


class _ArgCmp(ctypes.Structure):
    """libseccomp's struct scmp_arg_cmp."""

    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int),
                ("datum_a", ctypes.c_uint64), ("datum_b", ctypes.c_uint64)]


@functools.cache
def _libseccomp() -> ctypes.CDLL:
    try:
        lib = ctypes.CDLL(LIBSECCOMP, use_errno=True)
    except OSError as err:
        raise HostError(f"seccomp filters need {LIBSECCOMP}: {err}",
                        hint="apt-get install libseccomp2 (or jail = false in the spec, "
                             "which also drops the jail)") from err
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_release.restype = None
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    lib.seccomp_attr_set.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_rule_add_exact_array.argtypes = [
        ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint,
        ctypes.POINTER(_ArgCmp)]
    lib.seccomp_export_bpf.argtypes = [ctypes.c_void_p, ctypes.c_int]
    return lib


def _cmp(arg: Arg) -> _ArgCmp:
    if arg.mask is None:
        return _ArgCmp(arg.index, _CMP_EQ, arg.value, 0)
    return _ArgCmp(arg.index, _CMP_MASKED_EQ, arg.mask, arg.value)


def compile_filter(spec: Filter) -> bytes:
    """The classic BPF program (``struct sock_filter`` array) of ``spec``,
    for the native architecture, made by libseccomp."""
    lib = _libseccomp()

    def check(rc: int, what: str) -> None:
        if rc != 0:
            raise LaunchError(f"seccomp: libseccomp {what}: {os.strerror(-rc)}")

    ctx = lib.seccomp_init(spec.default)
    if not ctx:
        raise LaunchError("seccomp: libseccomp could not make a filter context")
    try:
        check(lib.seccomp_attr_set(ctx, _ATTR_ACT_BADARCH, spec.foreign), "bad-arch action")
        for rule in spec.rules:
            nr = lib.seccomp_syscall_resolve_name(rule.name.encode())
            if nr == _NR_SCMP_ERROR:
                raise LaunchError(f"seccomp: libseccomp does not know {rule.name}")
            cmps = (_ArgCmp * max(1, len(rule.args)))(*(_cmp(a) for a in rule.args))
            check(lib.seccomp_rule_add_exact_array(ctx, rule.action, nr, len(rule.args), cmps),
                  f"rule for {rule.name}")
        fd = os.memfd_create("svirt-seccomp", os.MFD_CLOEXEC)
        try:
            check(lib.seccomp_export_bpf(ctx, fd), "export")
            size = os.lseek(fd, 0, os.SEEK_END)
            program = os.pread(fd, size, 0)
        finally:
            os.close(fd)
    finally:
        lib.seccomp_release(ctx)
    if not program or len(program) % 8:
        raise LaunchError(f"seccomp: libseccomp exported {len(program)} bytes")
    return program


@functools.cache
def jail_filter() -> bytes:
    """BPF for every jailed hypervisor (see the module's text)."""
    return compile_filter(JAIL_RULES)


@functools.cache
def xstate_filter() -> bytes:
    """BPF: ptrace(GETREGSET|SETREGSET, pid, NT_X86_XSTATE, ...) -> EIO; else allow."""
    return compile_filter(XSTATE_RULES)


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def hide_xstate_in_child() -> Callable[[], None]:
    """A child setup step (prepared in the parent: no ctypes loading after fork)."""
    return install_in_child(xstate_filter(), "UML's xstate")


def install_in_child(program: bytes, what: str = "the jail") -> Callable[[], None]:
    """A child step installing ``program`` (after no_new_privs, or as root).
    Everything it needs is made here, in the parent: the step itself is one
    prctl call."""
    libc = ctypes.CDLL(None, use_errno=True)
    buf = ctypes.create_string_buffer(program, len(program))
    prog = _SockFprog(len(program) // 8, ctypes.addressof(buf))

    def install() -> None:
        if libc.prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.byref(prog), 0, 0) != 0:
            raise LaunchError(f"seccomp filter for {what}: errno {ctypes.get_errno()}")
        _ = buf

    return install

