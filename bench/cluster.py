"""Allocation latency and concurrent reservations: etcd cluster against local.

    python -m bench.cluster [--rounds 200] [--concurrent 50]

Starts a three-member etcd on 127.0.0.1 (tests/integration/etcd_cluster.py),
then measures, with the same drivers (SELinux with explicit contexts + DAC,
no hypervisor):

- reserve + release of one guest in one process, local claims only, then
  with the cluster: on an idle host (a lease granted and revoked each
  round) and on a host that holds another guest (its lease stays: one
  range read and one transaction to reserve, a read and a conditional
  delete per key to release);
- two "hosts" (two processes, two claims directories) each reserving
  ``--concurrent`` guests at once, from the start signal to both holding
  all of them; local (two hosts that do not know each other) against the
  cluster.

Prints a markdown table.  A benchmark: it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from svirt.claims.cluster import ClusterClaims
from svirt.claims.host import HostClaims
from svirt.config import parse_cluster
from svirt.launcher.registry import Registry
from svirt.security.base import Driver
from svirt.security.dac import DacDriver
from svirt.spec import GuestSpec
from tests.integration.claims_worker import selinux
from tests.integration.etcd_cluster import EtcdCluster, Pki

ROOT = Path(__file__).resolve().parent.parent


def latency(base: Path, conf: dict[str, Any] | None, rounds: int,
            pinned: bool = False) -> list[float]:
    """reserve + release; ``pinned``: another guest stays reserved meanwhile
    (the host keeps its lease, as a host with guests does)."""
    registry = Registry(base / "run", base / "state", claims=HostClaims(base / "claims"),
                        cluster=ClusterClaims(parse_cluster(conf, "<bench>"))
                        if conf is not None else False)
    base.mkdir(parents=True, exist_ok=True)
    kernel = base / "vmlinuz"
    kernel.write_bytes(b"k")
    drivers: list[Driver] = [selinux(), DacDriver()]
    if pinned:
        registry.reserve(GuestSpec(name="pin", kernel=kernel, uuid=uuid.uuid4()), drivers)
    out = []
    for i in range(rounds):
        t = time.perf_counter()
        record = registry.reserve(GuestSpec(name=f"l{i}", kernel=kernel, uuid=uuid.uuid4()),
                                  drivers)
        registry.release(record)
        out.append(time.perf_counter() - t)
    return out


def concurrent(base: Path, conf: dict[str, Any] | None, count: int) -> float:
    go = base / "go"
    workers = []
    for host in ("a", "b"):
        (base / host).mkdir(parents=True)
        workers.append(subprocess.Popen(
            [sys.executable, "-m", "tests.integration.cluster_worker", str(base / host),
             str(base / f"{host}-claims"), host,
             json.dumps(conf) if conf is not None else "local", str(count), str(go)],
            cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True))
    time.sleep(1.0)
    t = time.perf_counter()
    go.touch()
    for w in workers:
        assert w.stdout is not None
        for line in w.stdout:
            if line.strip() == "held":
                break
    took = time.perf_counter() - t
    for w in workers:
        assert w.stdin is not None
        w.stdin.write("release\n")
        w.stdin.flush()
        w.wait(timeout=60)
    return took


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--concurrent", type=int, default=50)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="svirt-bench-cluster-"))
    try:
        with EtcdCluster(tmp / "etcd", tls=Pki(tmp / "pki")) as etcd:
            def conf() -> dict[str, Any]:
                return {**etcd.client_conf(), "name": f"b{uuid.uuid4().hex[:8]}",
                        "host": "a", "ttl": 15}
            rows = []
            for label, c, pin in (("local", None, False),
                                  ("etcd (3 members), host idle before", conf(), False),
                                  ("etcd (3 members), host holds a guest", conf(), True)):
                samples = latency(tmp / f"lat-{uuid.uuid4().hex[:6]}", c, args.rounds, pin)
                samples.sort()
                rows.append((f"reserve + release, {label}",
                             f"{statistics.median(samples) * 1e3:.2f} ms",
                             f"{samples[int(len(samples) * 0.95)] * 1e3:.2f} ms"))
            for label, c in (("local", None), ("etcd (3 members)", conf())):
                took = concurrent(tmp / f"con-{uuid.uuid4().hex[:6]}", c, args.concurrent)
                rows.append((f"2 hosts x {args.concurrent} concurrent reservations, {label}",
                             f"{took:.2f} s total",
                             f"{took / (2 * args.concurrent) * 1e3:.2f} ms per guest"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print("| measurement | median / total | p95 / per guest |")
    print("|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
