"""The jail's cost: launch to the guest's marker and stop, jailed and not.

Run as root: ``.venv/bin/python -m bench.jail [ROUNDS]``.  Interleaved rounds
of a tiny UML guest (and QEMU-TCG) through ``svirt.launch`` with ``jail =
true`` and ``jail = false`` in one private registry; prints medians, the
jail's share and the memory of the jail's own process (tini, PID 1).
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

from svirt.images import build
from svirt.launcher.launch import launch
from svirt.launcher.registry import Registry
from svirt.spec import Backend, GuestSpec
from svirt.testing import tiny_spec


def _one(spec: GuestSpec, registry: Registry) -> tuple[float, float, int]:
    t0 = time.monotonic()
    with launch(spec, registry=registry) as guest:
        guest.console.expect_line("SVIRT-READY", timeout=120)
        ready = time.monotonic() - t0
        rss = _rss_kib(guest.pid)  # tini when jailed, the hypervisor when not
        guest.stop()
    return ready, time.monotonic() - t0, rss


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def main(rounds: int = 10) -> None:
    root = Path(tempfile.mkdtemp(prefix="svirt-bench-jail-", dir="/run"))
    root.chmod(0o755)
    registry = Registry(root)
    kinds = {"uml": (build.tiny_uml_guest(), Backend.UML),
             "qemu-tcg": (build.tiny_qemu_guest(), Backend.QEMU)}
    for kind, (tiny, backend) in kinds.items():
        results: dict[bool, list[tuple[float, float, int]]] = {True: [], False: []}
        for i in range(rounds):
            for jail in ((True, False) if i % 2 else (False, True)):
                spec = tiny_spec(tiny, f"bj-{kind}", backend, jail=jail)
                results[jail].append(_one(spec, registry))
        on = [r[0] for r in results[True]]
        off = [r[0] for r in results[False]]
        print(f"{kind}: to marker jailed {statistics.median(on) * 1000:.0f} ms, "
              f"unjailed {statistics.median(off) * 1000:.0f} ms, jail's share "
              f"{(statistics.median(on) - statistics.median(off)) * 1000:+.0f} ms "
              f"(ratio {statistics.median(on) / statistics.median(off):.3f}); "
              f"tini RSS {statistics.median(r[2] for r in results[True]):.0f} KiB")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 10)
