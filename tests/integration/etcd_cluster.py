"""A throwaway three-member etcd cluster on 127.0.0.1 for the cluster tests and
the benchmark: Debian's ``etcd`` binary, free ports, data in a temp dir.

    with EtcdCluster(tmp_path, tls=Pki(tmp_path / "pki")) as cluster:
        cluster.endpoints        # ["https://127.0.0.1:PORT", ...]
        cluster.client_conf()    # the [cluster] keys that reach it (ca, cert, key)
        cluster.kill(0)          # SIGKILL one member
        cluster.start(0)         # and bring it back (same data dir)

With ``tls`` (a :class:`Pki`: a CA, a server and a client certificate made
here with openssl) the members serve clients over https only and demand a
client certificate signed by that CA (``--client-cert-auth``); peers talk
plain http on 127.0.0.1.  Without it, plain http (``insecure = true``).
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import ssl
import subprocess
import time
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any

ETCD = shutil.which("etcd") or "/usr/bin/etcd"
OPENSSL = shutil.which("openssl") or "/usr/bin/openssl"


class Pki:
    """A CA with a server certificate for 127.0.0.1 and a client certificate
    (EC P-256, one day), made with the openssl command line in ``directory``."""

    def __init__(self, directory: Path, name: str = "svirt-test") -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.ca, self.ca_key = directory / "ca.pem", directory / "ca.key"
        self._openssl("req", "-x509", "-new", "-nodes", "-newkey", "ec",
                      "-pkeyopt", "ec_paramgen_curve:prime256v1", "-days", "1",
                      "-subj", f"/CN={name} CA", "-keyout", str(self.ca_key),
                      "-out", str(self.ca),
                      "-addext", "basicConstraints=critical,CA:TRUE",
                      "-addext", "keyUsage=critical,keyCertSign,cRLSign")
        # the server's certificate is also the gateway's client certificate
        # towards its own gRPC server: both usages
        self.server, self.server_key = self.issue(
            "server", "/CN=127.0.0.1", "subjectAltName=IP:127.0.0.1,DNS:localhost",
            "extendedKeyUsage=serverAuth,clientAuth")
        # no CN: with auth enabled, etcd refuses gateway requests whose client
        # certificate has one (CVE-2018-16886: the gateway cannot pass it on)
        self.client, self.client_key = self.issue("client", f"/O={name}",
                                                  "extendedKeyUsage=clientAuth")

    def _openssl(self, *args: str) -> None:
        subprocess.run([OPENSSL, *args], check=True, capture_output=True)

    def issue(self, stem: str, subject: str, *extensions: str) -> tuple[Path, Path]:
        """A certificate and key signed by this CA."""
        cert, key, csr = (self.directory / f"{stem}.pem", self.directory / f"{stem}.key",
                          self.directory / f"{stem}.csr")
        ext = self.directory / f"{stem}.ext"
        ext.write_text("\n".join(extensions) + "\n")
        self._openssl("req", "-new", "-nodes", "-newkey", "ec",
                      "-pkeyopt", "ec_paramgen_curve:prime256v1", "-subj", subject,
                      "-keyout", str(key), "-out", str(csr))
        self._openssl("x509", "-req", "-in", str(csr), "-CA", str(self.ca),
                      "-CAkey", str(self.ca_key), "-CAcreateserial", "-days", "1",
                      "-extfile", str(ext), "-out", str(cert))
        return cert, key

    def context(self, *, client: bool = True) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.ca))
        if client:
            ctx.load_cert_chain(str(self.client), str(self.client_key))
        return ctx


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
    def __init__(self, directory: Path, members: int = 3, tls: Pki | None = None,
                 extra: tuple[str, ...] = ()) -> None:
        self.directory = directory
        self.extra = extra
        self.tls = tls
        self.scheme = "https" if tls is not None else "http"
        ports = free_ports(2 * members)
        self.client_ports = ports[:members]
        self.peer_ports = ports[members:]
        self.names = [f"m{i}" for i in range(members)]
        self.procs: list[subprocess.Popen[bytes] | None] = [None] * members
        self.initial = ",".join(f"{n}=http://127.0.0.1:{p}"
                                for n, p in zip(self.names, self.peer_ports, strict=True))

    @property
    def endpoints(self) -> list[str]:
        return [f"{self.scheme}://127.0.0.1:{p}" for p in self.client_ports]

    def client_conf(self) -> dict[str, Any]:
        """The [cluster] keys (etcd and its transport) that reach this cluster."""
        if self.tls is None:
            return {"etcd": self.endpoints, "insecure": True}
        return {"etcd": self.endpoints, "ca": str(self.tls.ca), "cert": str(self.tls.client),
                "key": str(self.tls.client_key)}

    def argv(self, i: int) -> list[str]:
        client = f"{self.scheme}://127.0.0.1:{self.client_ports[i]}"
        peer = f"http://127.0.0.1:{self.peer_ports[i]}"
        tls = [] if self.tls is None else [
            "--client-cert-auth", "--trusted-ca-file", str(self.tls.ca),
            "--cert-file", str(self.tls.server), "--key-file", str(self.tls.server_key)]
        return [ETCD, *tls, *self.extra,
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
            url = f"{self.endpoints[i]}/health"  # http(s)://127.0.0.1 only
            context = self.tls.context() if self.tls is not None else None
            with urllib.request.urlopen(url, timeout=1, context=context) as resp:  # noqa: S310
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
