"""A throwaway three-member etcd cluster on 127.0.0.1 for the cluster tests and
the benchmark: Debian's ``etcd`` binary, free ports, data in a temp dir.

    with EtcdCluster(tmp_path) as cluster:
        cluster.endpoints        # ["http://127.0.0.1:PORT", ...]
        cluster.kill(0)          # SIGKILL one member
        cluster.start(0)         # and bring it back (same data dir)
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from types import TracebackType

ETCD = shutil.which("etcd") or "/usr/bin/etcd"


def free_ports(count: int) -> list[int]:
    socks = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class EtcdCluster:
    def __init__(self, directory: Path, members: int = 3) -> None:
        self.directory = directory
        ports = free_ports(2 * members)
        self.client_ports = ports[:members]
        self.peer_ports = ports[members:]
        self.names = [f"m{i}" for i in range(members)]
        self.procs: list[subprocess.Popen[bytes] | None] = [None] * members
        self.initial = ",".join(f"{n}=http://127.0.0.1:{p}"
                                for n, p in zip(self.names, self.peer_ports, strict=True))

    @property
    def endpoints(self) -> list[str]:
        return [f"http://127.0.0.1:{p}" for p in self.client_ports]

    def argv(self, i: int) -> list[str]:
        client = f"http://127.0.0.1:{self.client_ports[i]}"
        peer = f"http://127.0.0.1:{self.peer_ports[i]}"
        return [ETCD,
                "--name", self.names[i],
                "--data-dir", str(self.directory / self.names[i]),
                "--listen-client-urls", client,
                "--advertise-client-urls", client,
                "--listen-peer-urls", peer,
                "--initial-advertise-peer-urls", peer,
                "--initial-cluster", self.initial,
                "--initial-cluster-state", "new",
                "--initial-cluster-token", f"svirt-test-{self.peer_ports[0]}",
                "--heartbeat-interval", "50",
                "--election-timeout", "500",
                "--logger", "zap",
                "--log-level", "error"]

    def start(self, i: int) -> None:
        log = open(self.directory / f"{self.names[i]}.log", "ab")
        try:
            self.procs[i] = subprocess.Popen(self.argv(i), stdout=log, stderr=log,
                                             stdin=subprocess.DEVNULL)
        finally:
            log.close()

    def kill(self, i: int) -> None:
        proc = self.procs[i]
        if proc is not None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            self.procs[i] = None

    def healthy(self, i: int) -> bool:
        try:
            url = f"{self.endpoints[i]}/health"  # http://127.0.0.1 only
            with urllib.request.urlopen(url, timeout=1) as resp:  # noqa: S310
                return bool(json.loads(resp.read()).get("health") == "true")
        except (OSError, ValueError):
            return False

    def wait_healthy(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(self.healthy(i) for i, p in enumerate(self.procs) if p is not None):
                return
            time.sleep(0.1)
        logs = {n: (self.directory / f"{n}.log").read_text(errors="replace")[-2000:]
                for n in self.names}
        raise RuntimeError(f"etcd cluster not healthy in {timeout}s: {logs}")

    def __enter__(self) -> EtcdCluster:
        self.directory.mkdir(parents=True, exist_ok=True)
        try:
            for i in range(len(self.names)):
                self.start(i)
            self.wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for i in range(len(self.names)):
            self.kill(i)

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
