"""What the jail's seccomp filter costs: build, install, every system call.

    python -m bench.seccomp [--rounds 200] [--baseline OLD/svirt/launcher/seccomp.py]

- build: making the BPF program in the launcher, cold (a fresh interpreter:
  import, loading libseccomp, compiling) and warm (the cached program);
- install: the child's one step, ``prctl(PR_SET_SECCOMP)``, in a forked child
  (median of ``--rounds``);
- per call: the median cost of ``getppid()`` (a call no rule names, the
  common case) and of ``ptrace(PTRACE_ATTACH, 0)`` (the longest path) under
  the filter, minus the same calls without one.

``--baseline`` names another seccomp.py (``git show OLD:svirt/launcher/seccomp.py``,
e.g. the hand-written BPF it replaced) measured the same way.  A benchmark:
it asserts nothing.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.util
import os
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

_PR_SET_NO_NEW_PRIVS = 38
_CALLS = 200_000


def _load(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _cold_build_ms(path: Path) -> float:
    """Import + first jail_filter() in a fresh interpreter, in ms (what the
    launcher has imported anyway, before the clock starts)."""
    code = ("import sys, time, importlib.util as u, ctypes, dataclasses, functools\n"
            "import svirt.errors\n"
            "t = time.perf_counter()\n"
            f"s = u.spec_from_file_location('m', {str(path)!r})\n"
            "m = sys.modules['m'] = u.module_from_spec(s)\n"
            "s.loader.exec_module(m); m.jail_filter()\n"
            "print((time.perf_counter() - t) * 1e3)\n")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                         text=True)
    return float(out.stdout)


def _in_child(setup: list[ModuleType], program: bytes | None, work: str) -> list[float]:
    """Fork; the child installs ``program`` (timed) and runs ``work``; its
    numbers come back over a pipe."""
    libc = ctypes.CDLL(None, use_errno=True)
    install = setup[0].install_in_child(program) if program is not None else None
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
            t = time.perf_counter_ns()
            if install is not None:
                install()
            out = [(time.perf_counter_ns() - t) / 1e3]
            if work == "calls":
                for call in (lambda: os.getppid(),
                             lambda: libc.syscall(101, 16, 0, 0, 0)):
                    t = time.perf_counter_ns()
                    for _ in range(_CALLS):
                        call()
                    out.append((time.perf_counter_ns() - t) / _CALLS)
            os.write(w, struct.pack(f"{len(out)}d", *out))
        finally:
            os._exit(0)
    os.close(w)
    data = os.read(r, 1024)
    os.close(r)
    os.waitpid(pid, 0)
    return list(struct.unpack(f"{len(data) // 8}d", data))


def measure(name: str, path: Path, rounds: int) -> dict[str, float]:
    module = _load(path, f"seccomp_{name}")
    cold = statistics.median(_cold_build_ms(path) for _ in range(5))
    t = time.perf_counter()
    program: bytes = module.jail_filter()
    first = (time.perf_counter() - t) * 1e3
    t = time.perf_counter()
    for _ in range(100):
        module.jail_filter()
    warm = (time.perf_counter() - t) * 1e6 / 100
    installs = [_in_child([module], program, "")[0] for _ in range(rounds)]
    bare = _in_child([module], None, "calls")
    filtered = _in_child([module], program, "calls")
    return {"insns": len(program) / 8, "cold_ms": cold, "first_ms": first, "warm_us": warm,
            "install_us": statistics.median(installs),
            "getppid_ns": filtered[1] - bare[1], "ptrace_ns": filtered[2] - bare[2]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--baseline", type=Path)
    args = ap.parse_args()
    here = Path(__file__).resolve().parents[1] / "svirt" / "launcher" / "seccomp.py"
    rows = {"this tree": measure("new", here, args.rounds)}
    if args.baseline:
        rows["baseline"] = measure("old", args.baseline, args.rounds)
    print("| filter | BPF insns | cold build ms | first build ms | cached us | "
          "install us | getppid +ns | ptrace +ns |")
    print("|---|---|---|---|---|---|---|---|")
    for name, m in rows.items():
        print(f"| {name} | {m['insns']:.0f} | {m['cold_ms']:.1f} | {m['first_ms']:.2f} | "
              f"{m['warm_us']:.2f} | {m['install_us']:.1f} | {m['getppid_ns']:.0f} | "
              f"{m['ptrace_ns']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
