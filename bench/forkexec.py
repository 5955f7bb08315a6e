"""Fork-to-exec timing, run in a fresh interpreter: ``python -m bench.forkexec N``.

A fresh process matters: ``svirt run`` never imports python-prctl in the
parent (the child imports it after fork, for PR_SET_PDEATHSIG and the DAC
capability drop), so neither may this one until the last variant.
Prints JSON: seconds per call, from the call until it returned (both
``spawn`` and ``Popen`` return once the child has exec'd or failed).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable

from svirt.launcher.child import spawn
from svirt.security.dac import DEFAULT_UID_BASE, drop_privileges

TRUE = "/bin/true"


def _time(fn: Callable[[], Callable[[], object]], runs: int) -> list[float]:
    out = []
    for i in range(runs + 1):
        t0 = _now()
        reap = fn()
        dt = _now() - t0
        reap()
        if i:  # the first call warms caches
            out.append(dt)
    return out


def _now() -> float:
    import time

    return time.perf_counter()


def main(argv: list[str]) -> int:
    runs = int(argv[0]) if argv else 20
    devnull = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
    uid = DEFAULT_UID_BASE + 65_000  # a DAC uid no guest of the bench uses

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
        return reaper(spawn([TRUE], {}, {}, stdout_fd=devnull, pdeathsig=True,
                            setups=[lambda: drop_privileges(uid, uid, [])]))

    result: dict[str, list[float]] = {}
    result["popen"] = _time(popen, runs)
    result["spawn_no_pdeathsig"] = _time(spawn_plain, runs)
    result["spawn_pdeathsig"] = _time(spawn_svirt, runs)
    result["spawn_pdeathsig_dac"] = _time(spawn_dac, runs)
    import prctl  # noqa: F401 - now in the parent: children inherit the module

    result["spawn_pdeathsig_dac_prctl_preimported"] = _time(spawn_dac, runs)
    result["popen_again"] = _time(popen, runs)
    json.dump(result, sys.stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
