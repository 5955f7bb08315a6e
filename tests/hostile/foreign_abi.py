"""The foreign-ABI stand-in (``foreign_abi.c``): build it, run it, read it.

A static binary, compiled by the test into a directory every uid may
traverse; it is launched as a UML kernel or as ``qemu-system-x86_64`` and
prints one ``FOREIGN-ABI {json}`` line (see the C file for the attempts).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

SOURCE = Path(__file__).resolve().parent / "foreign_abi.c"
LINE = re.compile(rb"FOREIGN-ABI (\{[^\n]*\})\r?\n")
KILLED_BY_FILTER = "killed: SIGSYS"  # SECCOMP_RET_KILL_PROCESS; the kernel sends no other SIGSYS
PRSTATUS = "native ptrace(GETREGSET, NT_PRSTATUS)"
XSTATE = "native ptrace(GETREGSET, NT_X86_XSTATE)"  # UML's xstate filter: EIO
NATIVE = ("native getpid", "native unshare(CLONE_NEWUSER)", PRSTATUS, XSTATE)
PROBES = ("i386 getpid", "x32 getpid")  # harmless: any call at all, in each foreign ABI
#: the attempts on PID 1 (the stand-in refuses them when it runs as root)
ON_PID1 = ("ptrace(PTRACE_ATTACH, 1)", "ptrace(PTRACE_SEIZE, 1)", "pidfd_open(1)",
           "process_vm_readv(1)")
ATTACKS = tuple(f"{abi} {call}" for abi in ("i386", "x32") for call in (
    "unshare(CLONE_NEWUSER)", "clone(CLONE_NEWUSER)",
    "clone(CLONE_NEWUSER|NEWNS|NEWPID|NEWNET|NEWIPC|NEWUTS)", "clone3(CLONE_NEWUSER)",
    *ON_PID1))


def build(directory: Path, name: str = "foreign-abi") -> Path:
    """Compile the stand-in (static) to ``directory/name``, mode 0755."""
    return build_static(SOURCE, directory / name)


def build_static(source: Path, out: Path) -> Path:
    """Compile a C stand-in to ``out`` (static: a jail has no loader path of
    its own), mode 0755."""
    gcc = shutil.which("gcc")
    if gcc is None:
        raise AssertionError(f"gcc is needed to build {source.name} (./run installs it)")
    done = subprocess.run([gcc, "-static", "-O2", "-Wall", "-Wextra", "-Werror", "-o", str(out),
                           str(source)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise AssertionError(f"building {source.name} failed (static glibc is libc6-dev, "
                             f"which ./run installs):\n{done.stderr}")
    out.chmod(0o755)
    return out


def parse(output: bytes) -> dict[str, str]:
    """The attempts of the stand-in's report line in ``output``."""
    m = LINE.search(output)
    if m is None:
        raise AssertionError(f"no FOREIGN-ABI report in {output[-300:]!r}")
    report: dict[str, str] = json.loads(m.group(1))
    return report


def run_unjailed(binary: Path, attempts: tuple[str, ...] = PROBES) -> dict[str, str]:
    """Run harmless attempts outside any filter: does this kernel take the
    i386 ABI at all (a kernel without IA32 emulation answers int $0x80 with
    SIGSEGV, one without x32 an x32 call with ENOSYS)?"""
    done = subprocess.run([str(binary), "--once", "--only", *attempts], capture_output=True,
                          timeout=30, check=True)
    return parse(done.stdout)


def problems(report: dict[str, str], kernel: dict[str, str], *, xstate: bool) -> list[str]:
    """What the report shows that the jail's filter should have stopped, or
    the native answers that are not the jail's (``xstate``: UML's xstate
    filter is stacked under it).  ``kernel``: :func:`run_unjailed`'s probes.
    Every foreign-ABI call must be killed by the filter (SIGSYS), including
    x32 ones on a kernel that has no x32 (the filter sees the number before
    the kernel refuses it); only an i386 call on a kernel that takes no
    int $0x80 at all may die otherwise."""
    out = []
    for name in (*PROBES, *ATTACKS):
        result = report.get(name, "not tried")
        if result == KILLED_BY_FILTER:
            continue
        no_i386 = name.startswith("i386 ") and kernel["i386 getpid"].startswith("killed: ")
        if no_i386 and result.startswith("killed: "):
            continue
        out.append(f"{name}: {result}")
    for name, expected in (("native getpid", "ok: "),
                           ("native unshare(CLONE_NEWUSER)", "errno: EPERM"),
                           (PRSTATUS, "ok: "), (XSTATE, "errno: EIO" if xstate else "ok: ")):
        if not report.get(name, "").startswith(expected):
            out.append(f"{name}: {report.get(name, 'not tried')} (expected {expected})")
    return out


def table(report: dict[str, str]) -> str:
    width = max(len(k) for k in report)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in report.items())
