"""``python -m bench.slotworker ROOT CLAIMS SPEC N``: N x (Registry.reserve +
release) with the DAC driver in registry ROOT and claims directory CLAIMS;
prints the samples (seconds) as JSON.  A process of its own, so that the
floor section can time another svirt tree (``--baseline-tree``) the same way.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from svirt.claims.host import HostClaims
from svirt.launcher.registry import Registry
from svirt.security.dac import DacDriver
from svirt.spec import load_spec


def main(argv: list[str]) -> None:
    root, claims, spec_path, n = Path(argv[0]), Path(argv[1]), Path(argv[2]), int(argv[3])
    spec = load_spec(spec_path)
    reg = Registry(root, claims=HostClaims(claims))
    drivers = [DacDriver()]
    reg.release(reg.reserve(spec, drivers))  # warm: the first call imports the drivers' pieces
    out: dict[str, list[float]] = {"reserve": [], "release": [], "slots": []}
    for _ in range(n):
        t0 = time.perf_counter()
        rec = reg.reserve(spec, drivers)
        t1 = time.perf_counter()
        reg.release(rec)
        t2 = time.perf_counter()
        out["reserve"].append(t1 - t0)
        out["release"].append(t2 - t1)
        out["slots"].append(rec.slot)
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1:])
