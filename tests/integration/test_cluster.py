"""Several hosts on one etcd cluster (svirt/claims/): a real three-member
cluster (Debian's etcd) on 127.0.0.1, serving https only and demanding a
client certificate (a CA, server and client certificates made here with
openssl), two svirt "hosts" (two registries with claims directories of their
own), both pointing at it.

Each test works under a cluster name of its own, so keys of one test never
meet another's; members a test kills are started again after it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from svirt.claims.host import HostClaims
from svirt.errors import ClusterError, ConfigError, NoQuorum, SecurityError
from svirt.images.build import TinyGuest
from svirt.launcher.launch import launch
from svirt.launcher.registry import Registry
from svirt.security.dac import DacDriver
from svirt.spec import Backend, Disk, GuestSpec
from svirt.testing import tiny_spec

from .etcd_cluster import ETCD, OPENSSL, EtcdCluster, Pki

try:
    import etcd3gw  # noqa: F401 - the optional dependency

    from svirt.claims.cluster import ClusterClaims
    from svirt.config import parse_cluster
except ImportError:  # pragma: no cover
    pytest.skip("etcd3gw is not installed (pip install 'svirt[cluster]')",
                allow_module_level=True)

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(not os.path.exists(ETCD), reason="etcd is not installed "
                                 "(apt-get install etcd-server)"),
              pytest.mark.skipif(not os.path.exists(OPENSSL), reason="openssl is not "
                                 "installed (it makes the test's certificates)"),
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root")]

ROOT = Path(__file__).resolve().parents[2]
TTL = 3


@pytest.fixture(scope="module")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    directory = tmp_path_factory.mktemp("etcd")
    with EtcdCluster(directory, tls=Pki(directory / "pki")) as cluster:
        yield cluster


@pytest.fixture
def conf(etcd: EtcdCluster) -> Iterator[dict[str, Any]]:
    yield {**etcd.client_conf(), "name": f"t{uuid.uuid4().hex[:10]}", "ttl": TTL,
           "timeout": 1.0}
    for i, proc in enumerate(etcd.procs):  # members a test killed come back
        if proc is None:
            etcd.start(i)
    etcd.wait_healthy()


@pytest.fixture
def base() -> Iterator[Path]:
    """Directories guest uids may walk through (pytest's tmp is 0700)."""
    path = Path(tempfile.mkdtemp(prefix="svirt-cluster-", dir="/run"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _host(base: Path, name: str, conf: dict[str, Any]) -> Registry:
    return Registry(base / name / "run", base / name / "state",
                    claims=HostClaims(base / name / "claims"),
                    cluster=ClusterClaims(parse_cluster({**conf, "host": name}, "<test>")))


@pytest.fixture
def hosts(base: Path, conf: dict[str, Any]) -> dict[str, Registry]:
    return {n: _host(base, n, conf) for n in ("a", "b")}


def _spec(name: str, kernel: Path) -> GuestSpec:
    return GuestSpec(name=name, kernel=kernel, uuid=uuid.uuid4())


def _kernel(base: Path) -> Path:
    k = base / "vmlinuz"
    k.write_bytes(b"k")
    return k


def _uid(record: Any) -> int:
    return int(record.labels["dac"].process.split(":")[0])


def _worker(base: Path, host: str, conf: dict[str, Any], count: int,
            go: Path) -> subprocess.Popen[str]:
    (base / host).mkdir(exist_ok=True)
    return subprocess.Popen(
        [sys.executable, "-m", "tests.integration.cluster_worker", str(base / host),
         str(base / f"{host}-claims"), host, json.dumps(conf), str(count), str(go)],
        cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)


def _held(proc: subprocess.Popen[str]) -> list[dict[str, str]]:
    assert proc.stdout is not None
    out: list[dict[str, str]] = []
    for line in proc.stdout:
        if line.strip() == "held":
            return out
        out.append(json.loads(line))
    raise AssertionError(f"worker ended: {proc.wait()} {proc.stderr.read() if proc.stderr else ''}")


def _keys(registry: Registry, kind: str) -> list[str]:
    assert registry.cluster is not None
    return sorted(c for c in registry.cluster.taken() if c.startswith(kind + "-"))


# ----------------------------------------------------------------- the tests
def test_two_hosts_racing_get_fifty_distinct_uids_and_pairs(
        base: Path, conf: dict[str, Any], hosts: dict[str, Registry]) -> None:
    go = base / "go"
    workers = [_worker(base, h, conf, 25, go) for h in ("a", "b")]
    try:
        time.sleep(0.5)  # every worker imported and waiting
        go.touch()
        started = time.monotonic()
        held = [r for w in workers for r in _held(w)]
        took = time.monotonic() - started
        assert len(held) == 50
        assert len({r["uid"] for r in held}) == 50, held
        assert len({r["level"] for r in held}) == 50, held  # c0.c19: pairs collide often
        assert len(_keys(hosts["a"], "uid")) == 50 and len(_keys(hosts["a"], "mcs")) == 50
        print(f"50 reservations on two hosts in {took:.2f}s")
        for w in workers:
            assert w.stdin is not None and w.stdout is not None
            w.stdin.write("release\n")
            w.stdin.flush()
            assert w.stdout.readline().strip() == "released"
            assert w.wait(timeout=20) == 0
        assert _keys(hosts["a"], "uid") == [] and _keys(hosts["a"], "mcs") == []
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
                w.wait()


def test_a_writable_image_runs_on_one_host_only(
        tiny_uml: TinyGuest, image_dir: Path, hosts: dict[str, Registry]) -> None:
    disk = image_dir / "disk.img"  # image_dir: the export both hosts see
    with open(disk, "wb") as f:
        f.truncate(1 << 20)
    other = image_dir / "other.img"
    shutil.copy(disk, other)
    spec = tiny_spec(tiny_uml, "writer", Backend.UML, disks=(Disk(disk),))
    with launch(spec, registry=hosts["a"], drivers=[DacDriver()]) as first:
        first.console.expect_line("SVIRT-READY", timeout=60)
        with pytest.raises(SecurityError, match="open for writing by guest writer on host a"):
            with launch(spec, registry=hosts["b"], drivers=[DacDriver()]):
                pass
        assert first.running
        assert hosts["b"].records() == []
        # another image is fine on host b, with a uid of its own cluster-wide
        with launch(spec.with_changes(name="second", disks=(Disk(other),)),
                    registry=hosts["b"], drivers=[DacDriver()]) as second:
            second.console.expect_line("SVIRT-READY", timeout=60)
            assert _uid(second.record) != _uid(first.record)
            assert len(_keys(hosts["a"], "image")) == 2
            second.stop()
        first.stop()
    assert _keys(hosts["a"], "image") == []
    # and once host a let go, host b may write it
    with launch(spec, registry=hosts["b"], drivers=[DacDriver()]) as again:
        again.console.expect_line("SVIRT-READY", timeout=60)
        again.stop()


def test_one_member_down_allocations_go_on(
        etcd: EtcdCluster, base: Path, hosts: dict[str, Registry]) -> None:
    kernel = _kernel(base)
    etcd.kill(0)
    records = [(h, hosts[h].reserve(_spec(f"{h}{i}", kernel), [DacDriver()]))
               for i in range(3) for h in ("a", "b")]
    assert len({_uid(r) for _, r in records}) == 6
    for h, r in records:
        hosts[h].release(r)
    assert _keys(hosts["a"], "uid") == []


def test_no_quorum_refuses_and_the_running_guest_is_fenced_after_the_ttl(
        tiny_uml: TinyGuest, etcd: EtcdCluster, base: Path, hosts: dict[str, Registry],
        image_dir: Path) -> None:
    kernel = _kernel(base)
    spec = tiny_spec(tiny_uml, "fenced", Backend.UML)
    with launch(spec, registry=hosts["a"], drivers=[DacDriver()]) as guest:
        guest.console.expect_line("SVIRT-READY", timeout=60)
        cluster = hosts["a"].cluster
        assert cluster is not None
        keeper = cluster.keeper
        etcd.kill(0)
        etcd.kill(1)
        lost = time.monotonic()
        assert guest.running  # untouched until the fence rule applies
        for h in ("a", "b"):
            with pytest.raises(NoQuorum, match="no etcd member answered"):
                hosts[h].reserve(_spec(f"refused-{h}", kernel), [DacDriver()])
        assert hosts["b"].records() == []
        outcome = guest.wait(timeout=TTL + 5)
        fenced = time.monotonic() - lost
        assert outcome is not None and not guest.running
        # fenced before the lease could have expired (TTL after its last refresh)
        when, last_ok = keeper.fences[-1]
        assert when < last_ok + TTL, (when - last_ok, keeper.fenced)
        assert fenced < TTL + 3, fenced  # and the guest died right after
        # the watchdog notes it once its stop() returns, which may be just after
        # the guest's end was seen here
        deadline = time.monotonic() + 5
        while not any(line.startswith("fenced ") and ": stopped (" in line
                      for line in keeper.fenced):
            assert time.monotonic() < deadline, keeper.fenced
            time.sleep(0.05)
    assert hosts["a"].records() == []


def test_a_dead_hosts_allocations_free_after_the_ttl(
        base: Path, conf: dict[str, Any], hosts: dict[str, Registry]) -> None:
    go = base / "go"
    go.touch()
    worker = _worker(base, "a", conf, 4, go)
    try:
        held = {int(r["uid"].split(":")[0]) for r in _held(worker)}
    finally:
        worker.kill()  # the lease holder of host a: SIGKILL
        worker.wait()
    killed = time.monotonic()
    kernel = _kernel(base)
    early = _host(base, "c", conf)  # a third host asks while host a's lease still runs
    first = early.reserve(_spec("early", kernel), [DacDriver()])
    assert _uid(first) not in held
    b = hosts["b"]
    cluster = b.cluster
    assert cluster is not None
    while {f"uid-{u}" for u in held} & cluster.taken():
        assert time.monotonic() < killed + TTL + 5, "host a's uids never came free"
        time.sleep(0.1)
    freed = time.monotonic() - killed
    assert freed >= TTL - 1.5, freed  # not before the lease's TTL
    late = [b.reserve(_spec(f"late{i}", kernel), [DacDriver()]) for i in range(4)]
    assert {_uid(r) for r in late} == held  # b scans from the bottom: a's uids, now free
    early.release(first)
    for record in late:
        b.release(record)


def test_an_adopted_guests_keys_are_kept_and_a_collision_fences_it(
        base: Path, hosts: dict[str, Registry]) -> None:
    """A supervisor that adopts a guest keeps the host's lease alive for its
    keys, given plain data (ClusterClaims.keep: the keys, the owner, a fence;
    never the registry): a key its lease lost meanwhile is created again; one
    another guest took meanwhile is a collision: the fence runs, and no more."""
    a = hosts["a"]
    cluster = a.cluster
    assert cluster is not None
    record = a.reserve(_spec("adopted", _kernel(base)), [DacDriver()])
    claim = f"uid-{_uid(record)}"
    key = cluster.etcd_key(claim)
    value = next(kv.value for kv in cluster.etcd.prefix(key) if kv.key == key)
    fenced: list[str] = []
    kept = dataclasses.replace(a.claim_of(record), fence=lambda: fenced.append(record.name))
    assert cluster.etcd.delete_if(key, value)  # lost while no supervisor held the lease
    cluster.keep(a.claims, a.claim_of(record))  # service/adopt.py's call
    assert claim in cluster.taken() and not fenced
    assert cluster.etcd.delete_if(key, value)
    cluster.etcd.put(key, cluster.owner_value(dataclasses.replace(kept.owner, name="thief")))
    with pytest.raises(ClusterError, match="handed to another guest"):
        cluster.keep(a.claims, kept)
    assert fenced == [record.name]
    a.release(record)
    assert claim in cluster.taken()  # the thief's key is not this record's to delete


def test_svirt_host_and_list_cluster_show_the_cluster(
        base: Path, conf: dict[str, Any], hosts: dict[str, Registry]) -> None:
    kernel = _kernel(base)
    records = {h: hosts[h].reserve(_spec(f"shown-{h}", kernel), [DacDriver()]) for h in hosts}
    config = base / "svirt.toml"
    config.write_text("[cluster]\n" + "\n".join(
        f"{k} = {json.dumps(v)}" for k, v in {**conf, "host": "a"}.items()) + "\n")
    env = {**os.environ, "SVIRT_CONFIG": str(config),
           "SVIRT_CLAIMS_DIR": str(base / "a" / "claims")}

    def svirt(*args: str) -> str:
        proc = subprocess.run([sys.executable, "-c", "import sys; from svirt.cli import main; "
                               "sys.exit(main(sys.argv[1:]))", *args], env=env, cwd=ROOT,
                              capture_output=True, text=True, timeout=30, check=False)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    shown = json.loads(svirt("host", "--json"))["cluster"]
    assert shown["host"] == "a" and len(shown["members"]) == 3
    assert sum(h["state"].startswith("leader") for h in shown["health"]) == 1
    assert shown["lease"]["ttl_left"] > 0 and shown["lease"]["keys"] == 1
    assert "cluster" in svirt("host")
    listed = json.loads(svirt("list", "--cluster", "--json"))
    assert {(g["host"], g["name"]) for g in listed} == {("a", "shown-a"), ("b", "shown-b")}
    table = svirt("list", "--cluster")
    for h, r in records.items():
        assert f"{_uid(r)}" in table and f"shown-{h}" in table
        hosts[h].release(r)
    assert json.loads(svirt("host", "--json"))["cluster"]["lease"] is None  # revoked


def test_the_transport_is_authenticated_both_ways(
        etcd: EtcdCluster, conf: dict[str, Any], base: Path) -> None:
    """The members take a client certificate of the cluster's CA only, and
    svirt takes a member only with a certificate of the configured CA: no
    client certificate, one of another CA (an intruder's), plain http to the
    TLS port and a member vouched for by another CA are all refused before
    a key is read (so before a lease could be revoked or a lock deleted)."""
    def taken(table: dict[str, Any]) -> set[str]:
        return ClusterClaims(parse_cluster({**table, "host": "a"}, "<test>")).taken()

    assert isinstance(taken(conf), set)  # the right certificates: answered
    intruder = Pki(base / "intruder", name="intruder")
    bare = {k: v for k, v in conf.items() if k not in ("cert", "key")}
    for what, table in (
            ("no client certificate", {**bare, "insecure": True}),
            ("a client certificate of another CA",
             {**conf, "cert": str(intruder.client), "key": str(intruder.client_key)}),
            ("plain http to the TLS port",
             {**bare, "etcd": [u.replace("https://", "http://") for u in conf["etcd"]],
              "insecure": True}),
            ("members vouched for by another CA", {**conf, "ca": str(intruder.ca)})):
        started = time.monotonic()
        with pytest.raises(ClusterError) as err:
            taken(table)
        assert time.monotonic() - started < 3 * len(conf["etcd"]) * conf["timeout"] + 2, what
        print(f"{what}: {err.value.message[:400]}")
    # and without insecure = true none of the weaker tables is even accepted
    for table in (bare, {**conf, "etcd": [u.replace("https://", "http://")
                                          for u in conf["etcd"]]}):
        with pytest.raises(ConfigError, match="TLS with a client certificate"):
            parse_cluster({**table, "host": "a"}, "<test>")


def test_insecure_true_warns_on_every_command(base: Path, conf: dict[str, Any]) -> None:
    config = base / "svirt.toml"

    def svirt(table: dict[str, Any], *args: str) -> subprocess.CompletedProcess[str]:
        config.write_text("[cluster]\n" + "\n".join(
            f"{k} = {json.dumps(v)}" for k, v in {**table, "host": "a"}.items()) + "\n")
        env = {**os.environ, "SVIRT_CONFIG": str(config),
               "SVIRT_CLAIMS_DIR": str(base / "a" / "claims")}
        return subprocess.run([sys.executable, "-c", "import sys; from svirt.cli import main; "
                               "sys.exit(main(sys.argv[1:]))", *args], env=env, cwd=ROOT,
                              capture_output=True, text=True, timeout=30, check=False)

    secure = svirt(conf, "host", "--json")
    assert secure.returncode == 0 and "insecure" not in secure.stderr, secure.stderr
    bare = {k: v for k, v in conf.items() if k not in ("cert", "key")}
    for args in (("host", "--json"), ("list", "--json"), ("list",)):
        proc = svirt({**bare, "insecure": True}, *args)
        assert ("svirt: warning: [cluster] insecure = true: etcd is not authenticated "
                "(no client certificate (cert, key))") in proc.stderr, (args, proc.stderr)
    refused = svirt(bare, "host")
    assert refused.returncode == 1 and "TLS with a client certificate" in refused.stderr


def _gateway(etcd: EtcdCluster, path: str, body: dict[str, Any],
             token: str | None = None) -> dict[str, Any]:
    """One JSON request to the first member's gateway, as etcdctl would send it."""
    import ssl  # noqa: F401 - the context comes from the Pki
    import urllib.request

    assert etcd.tls is not None
    request = urllib.request.Request(  # noqa: S310 - https://127.0.0.1 only
        f"{etcd.endpoints[0]}/v3/{path}", data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", **({"Authorization": token} if token
                                                          else {})})
    with urllib.request.urlopen(request, timeout=5, context=etcd.tls.context()) as resp:  # noqa: S310
        data = json.loads(resp.read())
    assert isinstance(data, dict)
    return data


def etcd_version() -> str:
    out = subprocess.run([ETCD, "--version"], capture_output=True, text=True, check=True)
    return out.stdout.split()[2]  # "etcd Version: 3.4.23"


def _b64(text: str) -> str:
    import base64

    return base64.b64encode(text.encode()).decode()


def test_a_role_per_cluster_name_confines_each_hosts_credentials(
        tmp_path_factory: pytest.TempPathFactory, base: Path) -> None:
    """README's recipe, through the gateway's JSON API (etcdctl's requests):
    a role per cluster name readwrite on /svirt/NAME/ only, a user each, auth
    enabled.  Each host's svirt allocates under its own name; with its
    credentials it can neither read, write nor delete the other's keys, nor
    revoke the other's lease (etcd wants write on every key attached);
    without credentials nothing is answered.  Tokens live 2 s here: svirt
    logs in again when its token has expired."""
    directory = tmp_path_factory.mktemp("etcd-auth")
    with EtcdCluster(directory, members=1, tls=Pki(directory / "pki"),
                     extra=("--auth-token", "simple", "--auth-token-ttl", "2")) as etcd:
        _gateway(etcd, "auth/role/add", {"name": "root"})
        _gateway(etcd, "auth/user/add", {"name": "root", "password": "root-secret"})
        _gateway(etcd, "auth/user/grant", {"user": "root", "role": "root"})
        passwords = {}
        for name in ("p1", "p2"):
            _gateway(etcd, "auth/role/add", {"name": f"svirt-{name}"})
            _gateway(etcd, "auth/role/grant", {"name": f"svirt-{name}", "perm": {
                "permType": "READWRITE", "key": _b64(f"/svirt/{name}/"),
                "range_end": _b64(f"/svirt/{name}0")}})
            passwords[name] = uuid.uuid4().hex
            _gateway(etcd, "auth/user/add", {"name": f"svirt-{name}",
                                             "password": passwords[name]})
            _gateway(etcd, "auth/user/grant", {"user": f"svirt-{name}",
                                               "role": f"svirt-{name}"})
            (base / f"{name}.password").write_text(passwords[name] + "\n")
            (base / f"{name}.password").chmod(0o600)
        _gateway(etcd, "auth/enable", {})

        def conf(name: str, user: str | None = None) -> dict[str, Any]:
            user = user or name
            return {**etcd.client_conf(), "name": name, "ttl": TTL, "timeout": 1.0,
                    "user": f"svirt-{user}", "password_file": str(base / f"{user}.password")}

        kernel = _kernel(base)
        p1 = _host(base, "h1", conf("p1"))
        record = p1.reserve(_spec("confined", kernel), [DacDriver()])
        try:
            assert p1.cluster is not None
            assert any(k.startswith("uid-") for k in p1.cluster.taken())
            lease = p1.cluster.keeper.lease
            assert lease
            # host h2's credentials (cluster name p2) under the other's name: refused
            intruder = ClusterClaims(parse_cluster({**conf("p1", user="p2"), "host": "h2"},
                                                   "<test>"))
            with pytest.raises(ClusterError, match="permission denied"):
                intruder.taken()
            with pytest.raises(ClusterError, match="permission denied"):
                intruder.etcd.put("/svirt/p1/uid/1", "forged")
            with pytest.raises(ClusterError, match="permission denied"):
                intruder.etcd.revoke(lease)
            # its own name works, and svirt host's view of the members
            own = ClusterClaims(parse_cluster({**conf("p2"), "host": "h2"}, "<test>"))
            assert own.taken() == set()
            assert [state for _, state in own.etcd.endpoint_status()] == [
                "leader, version " + etcd_version()]
            assert len(own.etcd.members()) == 1
            time.sleep(3.5)  # the token expires
            assert own.taken() == set()
            # no credentials at all: refused
            anonymous = {k: v for k, v in conf("p1").items()
                         if k not in ("user", "password_file")}
            with pytest.raises(ClusterError):
                ClusterClaims(parse_cluster({**anonymous, "host": "h3"}, "<test>")).taken()
            assert p1.cluster.keeper.lease == lease and p1.cluster.taken()  # untouched
        finally:
            p1.release(record)
