"""A registry of its own in its own process, reserving against the host claims.

    python -m tests.integration.claims_worker STATE_DIR CLAIMS_DIR COUNT GO_FILE [keep]

Waits for GO_FILE (so that every worker starts at once), then reserves COUNT
guests (DAC, and SELinux with explicit contexts over c0.c19: the driver
computes labels without an SELinux kernel), releasing every other one right
away unless ``keep``; prints one JSON line per reservation (name, uid, level,
released), then releases the rest unless ``keep``.
"""

from __future__ import annotations

import json
import sys
import time
import uuid
from pathlib import Path

from svirt.claims.host import HostClaims
from svirt.launcher.registry import Registry
from svirt.security.base import Driver
from svirt.security.dac import DacDriver
from svirt.security.selinux import SELinuxDriver
from svirt.spec import GuestSpec

LAUNCHER = "system_u:system_r:unconfined_t:s0-s0:c0.c19"  # 190 pairs: collisions happen


def selinux() -> SELinuxDriver:
    return SELinuxDriver(launcher_context=LAUNCHER, domain_context="system_u:system_r:svirt_t:s0",
                         image_context="system_u:object_r:svirt_image_t:s0",
                         content_context="system_u:object_r:virt_content_t:s0", enforcing=False)


def main() -> int:
    state, claims, count, go = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), \
        Path(sys.argv[4])
    keep = len(sys.argv) > 5 and sys.argv[5] == "keep"
    registry = Registry(state / "run", state / "state", claims=HostClaims(claims))
    kernel = state / "vmlinuz"
    kernel.write_bytes(b"k")
    drivers: list[Driver] = [selinux(), DacDriver()]
    while not go.exists():
        time.sleep(0.005)
    held = []
    for i in range(count):
        spec = GuestSpec(name=f"g{i}", kernel=kernel, uuid=uuid.uuid4())
        record = registry.reserve(spec, drivers)
        release = not keep and i % 2 == 1
        print(json.dumps({"name": record.name, "uid": record.labels["dac"].process,
                          "level": record.labels["selinux"].process.split(":", 3)[3],
                          "released": release}), flush=True)
        if release:
            registry.release(record)
        else:
            held.append(record)
    if not keep:
        for record in held:
            registry.release(record)
    for problem in registry.problems:
        print(json.dumps({"problem": problem}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
