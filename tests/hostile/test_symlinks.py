"""Attack (a): the guest renames symlinks to canaries over every name in every
directory it can write, predicted names of the launcher's control socket
included, and swaps its whole umid directory for a symlink, in tight loops,
while the launcher starts it, stops it, reaps its crash or (after the
launcher was SIGKILLed) ``svirt gc`` releases it."""

from __future__ import annotations

import time
from pathlib import Path

from svirt.host import HostInfo
from svirt.launcher.registry import Registry

from .cycles import Tally, check_after_cycle, run_cycle
from .helpers import UID_BASE, Canaries, spec_dict

CYCLES = {"stop": 150, "crash": 40, "gc": 16}


def test_symlink_swaps_never_redirect_root(
    standin: Path, image_dir: Path, hostile_registry: Registry, canaries: Canaries,
    host: HostInfo, guest_uids: set[int],
) -> None:
    disk = image_dir / "disk.img"
    disk.write_bytes(b"\0" * 65536)
    log = image_dir / "console.log"
    tally = Tally()
    # a quiet cycle first: the harness works and the registry has its layout
    run_cycle("stop", spec_dict(standin, "sym"), hostile_registry, host, guest_uids, tally)
    canaries.baseline()
    started = time.monotonic()
    cycle = 0
    for scenario, count in CYCLES.items():
        for i in range(count):
            cycle += 1
            spec = spec_dict(standin, "sym", "symlinks", i, targets=canaries.targets,
                             disks=[disk], log=log)
            info = run_cycle(scenario, spec, hostile_registry, host, guest_uids, tally)
            check_after_cycle(canaries, hostile_registry, info, scenario, cycle)
            if cycle == 1:
                assert info["uid"] >= UID_BASE and info["euid"] == info["uid"]
                assert info["writable"], "the stand-in found no directory of its own"
    assert tally.total - 1 >= 200
    print(f"symlinks: {tally.cycles} in {time.monotonic() - started:.1f} s")
