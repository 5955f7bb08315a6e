"""Fork-to-exec timing, run in a fresh interpreter: ``python -m bench.forkexec N``.

A fresh process, so that nothing the bench imported (python-prctl, for
instance) makes svirt's spawn look cheaper than it is in ``svirt run``.
Prints JSON: seconds per call, from the call until it returned (both
``spawn`` and ``Popen`` return once the child has exec'd or failed); the
first call of each variant (cold: lazy imports) is reported apart.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable

from svirt.images import build
from svirt.launcher.child import spawn
from svirt.security.base import Label
from svirt.security.dac import DEFAULT_UID_BASE, DacDriver
from svirt.spec import Backend, GuestSpec

TRUE = "/bin/true"


def _time(fn: Callable[[], Callable[[], object]], runs: int) -> tuple[float, list[float]]:
    out = []
    first = 0.0
    for i in range(runs + 1):
        t0 = time.perf_counter()
        reap = fn()
        dt = time.perf_counter() - t0
        reap()
        if i:
            out.append(dt)
        else:
            first = dt
    return first, out


def main(argv: list[str]) -> int:
    runs = int(argv[0]) if argv else 20
    devnull = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
    uid = DEFAULT_UID_BASE + 65_000  # a DAC uid no guest of the bench uses
    ids = f"{uid}:{uid}"
    guest = build.tiny_uml_guest()
    spec = GuestSpec(name="forkexec", backend=Backend.UML, kernel=guest.kernel,
                     initrd=guest.initrd, memory=64)

    def popen() -> Callable[[], object]:
        p = subprocess.Popen([TRUE], stdin=subprocess.DEVNULL, stdout=devnull, stderr=devnull,
                             close_fds=True, start_new_session=True)
        return p.wait

    def reaper(pid: int) -> Callable[[], object]:
        return lambda: os.waitpid(pid, 0)

    def spawn_plain() -> Callable[[], object]:
        return reaper(spawn([TRUE], {}, {}, stdout_fd=devnull, pdeathsig=False))

    def spawn_svirt() -> Callable[[], object]:
        return reaper(spawn([TRUE], {}, {}, stdout_fd=devnull, pdeathsig=True))

    def spawn_dac() -> Callable[[], object]:
        # the DAC driver's own child setup: setgroups, setresgid, capbset, setresuid
        setup = DacDriver().child_setup(Label("dac", ids, ids, ids, ids), spec)
        return reaper(spawn([TRUE], {}, {}, stdout_fd=devnull, pdeathsig=True,
                            setups=[setup]))

    result: dict[str, list[float]] = {}
    first: dict[str, float] = {}
    for key, fn in (("popen", popen), ("spawn_no_pdeathsig", spawn_plain),
                    ("spawn_pdeathsig", spawn_svirt), ("spawn_pdeathsig_dac", spawn_dac)):
        first[key], result[key] = _time(fn, runs)
    json.dump({"samples": result, "first_call": first}, sys.stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
