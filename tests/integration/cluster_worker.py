"""One svirt "host" of a cluster test in its own process.

    python -m tests.integration.cluster_worker DIR CLAIMS_DIR HOST CLUSTER_JSON COUNT GO_FILE

(CLUSTER_JSON ``local``: no cluster, the benchmark's baseline.)

Waits for GO_FILE (every worker starts at once), reserves COUNT guests (DAC,
and SELinux with explicit contexts over c0.c19: the driver computes labels
without an SELinux kernel) against the cluster, prints one JSON line per
reservation (name, uid, level), then ``held``; releases them all when a line
comes on stdin (or stdin closes), prints ``released``.  A test SIGKILLs it to
play a host whose lease holder died.
"""

from __future__ import annotations

import json
import sys
import time
import uuid
from pathlib import Path

from svirt.claims.cluster import ClusterClaims
from svirt.claims.host import HostClaims
from svirt.config import parse_cluster
from svirt.launcher.registry import Registry
from svirt.security.base import Driver
from svirt.security.dac import DacDriver
from svirt.spec import GuestSpec

from .claims_worker import selinux


def main() -> int:
    directory, claims, host = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    cluster = (False if sys.argv[4] == "local"  # the benchmark's baseline
               else ClusterClaims(parse_cluster({**json.loads(sys.argv[4]), "host": host},
                                                "<test>")))
    count, go = int(sys.argv[5]), Path(sys.argv[6])
    registry = Registry(directory / "run", directory / "state", claims=HostClaims(claims),
                        cluster=cluster)
    kernel = directory / "vmlinuz"
    kernel.write_bytes(b"k")
    drivers: list[Driver] = [selinux(), DacDriver()]
    while not go.exists():
        time.sleep(0.005)
    held = []
    for i in range(count):
        spec = GuestSpec(name=f"{host}-g{i}", kernel=kernel, uuid=uuid.uuid4())
        record = registry.reserve(spec, drivers)
        held.append(record)
        print(json.dumps({"name": record.name, "uid": record.labels["dac"].process,
                          "level": record.labels["selinux"].process.split(":", 3)[3]}),
              flush=True)
    print("held", flush=True)
    sys.stdin.readline()
    for record in held:
        registry.release(record)
    print("released", flush=True)
    return 0

if __name__ == "__main__":
    sys.exit(main())
