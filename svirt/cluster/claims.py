"""What a registry asks of the cluster: taken keys, creation, image locks, release.

Every host-wide claim a record makes (``uid-N``, ``mcs-cA-cB``,
``smack-svirt-N``; :mod:`svirt.launcher.claims`) is also a key in etcd,
created with the record's other keys in one transaction that succeeds only
if none of them exists (``create_revision == 0``), under the host's lease.
Two hosts racing for one uid, pair or image: exactly one transaction
succeeds; the loser marks what it lost as taken and picks again.  All of it
runs under the host claims lock, so the processes of one host never race
each other here.  A writable image on shared storage is a key too
(``image-SHA256``, in the record's claims), created before its labels
change; release deletes a key only while it still names the same record.
"""

from __future__ import annotations

import hashlib
import os
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from svirt.cluster.etcd import Etcd, LeaseGone, dumps, loads
from svirt.cluster.lease import LeaseKeeper, lease_of, remove_lease_file
from svirt.config import ClusterConfig
from svirt.errors import ClusterError, SecurityError

if TYPE_CHECKING:
    from svirt.launcher.claims import ClaimSession
    from svirt.launcher.state import Record, Registry
    from svirt.security.files import OpenedObject

#: transactions one reservation may lose to other hosts before it gives up
CLUSTER_TRIES = 16
#: claim kinds that are cluster keys
KINDS = ("uid", "mcs", "smack", "image")

_keepers: dict[tuple[str, str, tuple[str, ...]], LeaseKeeper] = {}
_keepers_lock = threading.Lock()


class ClusterClaims:
    """One registry's view of the cluster (see the module docstring)."""

    def __init__(self, config: ClusterConfig) -> None:
        self.config = config
        self.name = config.name
        self.host = config.host or socket.gethostname()
        self.prefix = f"/svirt/{config.name}/"
        self._etcd: Etcd | None = None

    @property
    def etcd(self) -> Etcd:
        if self._etcd is None:
            self._etcd = Etcd(self.config)
        return self._etcd

    @property
    def keeper(self) -> LeaseKeeper:
        key = (self.name, self.host, self.config.etcd)
        with _keepers_lock:
            keeper = _keepers.get(key)
            if keeper is None:
                keeper = _keepers[key] = LeaseKeeper(
                    self.etcd, self.config.ttl, f"{self.prefix}hosts/{self.host}",
                    dumps({"host": self.host, "pid": os.getpid(), "ttl": self.config.ttl}))
            return keeper

    # ----------------------------------------------------------------- keys
    def etcd_key(self, claim: str) -> str:
        kind, _, rest = claim.partition("-")
        return f"{self.prefix}{kind}/{rest}"

    def claim_of(self, key: str) -> str | None:
        if not key.startswith(self.prefix):
            return None
        kind, _, rest = key[len(self.prefix):].partition("/")
        return f"{kind}-{rest}" if kind in KINDS and rest else None

    def owner_value(self, state: Path, record: Record, **extra: str) -> str:
        return dumps({"host": self.host, "state": str(state), "name": record.name,
                      "uuid": record.uuid, "created": record.created, **extra})

    def _ours(self, value: str, state: Path, record: Record) -> bool:
        data = loads(value)
        return (data.get("host"), data.get("state"), data.get("name"), data.get("uuid"),
                data.get("created")) == (self.host, str(state), record.name, record.uuid,
                                         record.created)

    def taken(self) -> set[str]:
        """The claim names every host holds in the cluster (one range read)."""
        out = set()
        for kv in self.etcd.prefix(self.prefix, keys_only=True):
            claim = self.claim_of(kv.key)
            if claim is not None:
                out.add(claim)
        return out

    # ----------------------------------------------------------- allocation
    def allocate(self, registry: Registry, session: ClaimSession,
                 pick: Callable[[frozenset[str]], Record]) -> Record:
        """``pick`` (the registry's local allocation, given what the cluster
        holds) until the cluster takes its keys; under the host lock."""
        lease = self.keeper.current(session.directory, self.name)
        taken = self.taken()
        for _ in range(CLUSTER_TRIES):
            record = pick(frozenset(taken))
            keys = [k for k in record.claims if k.partition("-")[0] in KINDS]
            value = self.owner_value(registry.state, record)
            try:
                try:
                    lost = self.etcd.create_all({self.etcd_key(k): value for k in keys}, lease)
                except LeaseGone:  # expired since it was checked: a new one
                    self.keeper.forget(lease)
                    lease = self.keeper.current(session.directory, self.name)
                    lost = self.etcd.create_all({self.etcd_key(k): value for k in keys}, lease)
            except BaseException:
                session.release(record.claims, record.claim_owner(registry.state))
                raise
            if not lost:
                self.keeper.guard((str(registry.state), record.name),
                                  _stopper(registry.state, record.name))
                return record
            session.release(record.claims, record.claim_owner(registry.state))
            taken |= {c for k in lost if (c := self.claim_of(k)) is not None}
        raise ClusterError(f"lost {CLUSTER_TRIES} allocation races to other hosts in a row",
                           endpoints=self.etcd.endpoints, hint="retry")

    def guard(self, registry: Registry, record: Record) -> None:
        """Keep the host's lease alive for an adopted guest's keys.  Keys its
        lease lost meanwhile (no supervisor refreshed it) are created again;
        a key another guest took since is a collision: the guest is fenced."""
        keys = [k for k in record.claims if k.partition("-")[0] in KINDS]
        if not keys:
            return
        with registry.claims.locked():
            lease = self.keeper.current(registry.claims.directory, self.name)
            value = self.owner_value(registry.state, record)
            missing = {}
            for claim in keys:
                key = self.etcd_key(claim)
                found = [kv for kv in self.etcd.prefix(key) if kv.key == key]
                if not found:
                    missing[key] = value
                elif not self._ours(found[0].value, registry.state, record):
                    fence_guest(registry.state, record.name)
                    raise ClusterError(
                        f"guest {record.name}: {claim} was handed to another guest while "
                        "no supervisor held this host's lease; the guest was stopped",
                        endpoints=self.etcd.endpoints)
            if missing and self.etcd.create_all(missing, lease):
                fence_guest(registry.state, record.name)
                raise ClusterError(f"guest {record.name}: its keys were taken meanwhile; "
                                   "the guest was stopped", endpoints=self.etcd.endpoints)
            self.keeper.guard((str(registry.state), record.name),
                              _stopper(registry.state, record.name))

    # ---------------------------------------------------------- image locks
    def image_identity(self, obj: OpenedObject) -> str | None:
        """The image's identity on the shared storage; None for an image
        outside every export (``image_identity = "export"``)."""
        if self.config.image_identity == "export":
            path = Path(os.path.normpath(obj.path))
            for name, mount in self.config.exports:
                if path == mount or mount in path.parents:
                    return f"export:{name}:{path.relative_to(mount)}"
            return None
        st = os.fstat(obj.fd)
        return f"file:{os.fstatvfs(obj.fd).f_fsid:x}:{st.st_ino}"

    def lock_image(self, registry: Registry, record: Record, obj: OpenedObject) -> None:
        """Take the cluster-wide writer lock on ``obj`` for ``record``: the
        claim goes into the record first (intent), then the key is created.
        Raises SecurityError when another guest of any host holds it."""
        identity = self.image_identity(obj)
        if identity is None:
            return
        claim = "image-" + hashlib.sha256(identity.encode()).hexdigest()[:48]
        if claim in record.claims:
            return
        with registry.claims.locked():
            lease = self.keeper.current(registry.claims.directory, self.name)
            record.claims.append(claim)
            registry.save(record)
            value = self.owner_value(registry.state, record, identity=identity,
                                     path=str(obj.path))
            try:
                try:
                    lost = self.etcd.create_all({self.etcd_key(claim): value}, lease)
                except LeaseGone:
                    self.keeper.forget(lease)
                    lease = self.keeper.current(registry.claims.directory, self.name)
                    lost = self.etcd.create_all({self.etcd_key(claim): value}, lease)
            except BaseException:
                record.claims.remove(claim)
                registry.save(record)
                raise
            if lost:
                record.claims.remove(claim)
                registry.save(record)
                holder = loads(next(iter(lost.values())).value)
                raise SecurityError(
                    f"{obj.path} is open for writing by guest {holder.get('name', '?')} on "
                    f"host {holder.get('host', '?')} (cluster {self.name}); {record.name} "
                    "wants it writable too", path=obj.path,
                    hint="stop that guest first, or give this guest its own image "
                         "(svirt list --cluster)")

    # -------------------------------------------------------------- release
    def release(self, registry: Registry, record: Record, session: ClaimSession) -> list[str]:
        """Delete ``record``'s keys that still name it; when this process then
        guards nothing and the lease holds no key, revoke it.  Never raises:
        the problems are returned (keys left behind go with the lease)."""
        problems: list[str] = []
        keeper = self.keeper
        idle = keeper.unguard((str(registry.state), record.name))
        try:
            for claim in record.claims:
                if claim.partition("-")[0] not in KINDS:
                    continue
                key = self.etcd_key(claim)
                for kv in self.etcd.prefix(key):
                    if kv.key == key and self._ours(kv.value, registry.state, record):
                        self.etcd.delete_if(key, kv.value)
            if idle:
                lease = lease_of(session.directory, self.name)
                if lease:
                    ttl, keys = self.etcd.time_to_live(lease)
                    if ttl <= 0 or all(k == keeper.host_key for k in keys):
                        self.etcd.revoke(lease)
                        keeper.forget(lease)
                        remove_lease_file(session.directory, self.name, lease)
        except ClusterError as err:
            problems.append(f"cluster {self.name}: guest {record.name}'s keys stay until the "
                            f"host's lease ends: {err.message}")
        return problems

    # ----------------------------------------------------------------- state
    def status(self, claims_dir: Path) -> dict[str, Any]:
        """Members, their health and this host's lease (``svirt host``)."""
        out: dict[str, Any] = {"name": self.name, "host": self.host,
                               "endpoints": list(self.config.etcd), "ttl": self.config.ttl}
        out["health"] = [{"endpoint": e, "state": s} for e, s in self.etcd.endpoint_status()]
        try:
            out["members"] = [{"name": m.get("name", ""), "id": m.get("ID", ""),
                               "client_urls": m.get("clientURLs", [])}
                              for m in self.etcd.members()]
        except ClusterError as err:
            out["members"] = []
            out["error"] = err.message
        lease = lease_of(claims_dir, self.name)
        out["lease"] = None
        if lease:
            try:
                ttl, keys = self.etcd.time_to_live(lease)
                out["lease"] = {"id": f"{lease:x}", "ttl_left": ttl,
                                "keys": len([k for k in keys if self.claim_of(k)])}
            except ClusterError as err:
                out["lease"] = {"id": f"{lease:x}", "error": err.message}
        return out

    def guests(self) -> list[dict[str, Any]]:
        """Every host's guests with their uid, pairs and images, from etcd."""
        guests: dict[tuple[str, str, str], dict[str, Any]] = {}
        hosts = []
        for kv in self.etcd.prefix(self.prefix):
            rest = kv.key[len(self.prefix):]
            if rest.startswith("hosts/"):
                hosts.append(rest[len("hosts/"):])
                continue
            claim = self.claim_of(kv.key)
            data = loads(kv.value)
            if claim is None or not data:
                continue
            g = guests.setdefault(
                (str(data.get("host")), str(data.get("state")), str(data.get("name"))),
                {"host": data.get("host"), "state": data.get("state"), "name": data.get("name"),
                 "uuid": data.get("uuid"), "lease": f"{kv.lease:x}", "claims": [],
                 "images": []})
            g["claims"].append(claim)
            if claim.startswith("image-"):
                g["images"].append(data.get("path") or data.get("identity"))
        for name in hosts:
            if not any(k[0] == name for k in guests):
                guests[(name, "", "")] = {"host": name, "state": "", "name": None,
                                          "uuid": None, "lease": "", "claims": [],
                                          "images": []}
        return [guests[k] for k in sorted(guests)]


def _stopper(state: Path, name: str) -> Callable[[], None]:
    def stop() -> None:
        fence_guest(state, name)
    return stop


def fence_guest(state: Path, name: str) -> None:
    """SIGKILL a guest whose cluster keys are about to be freed: its
    hypervisor (pid and start time checked), then its cgroup."""
    from svirt.errors import SvirtError
    from svirt.launcher.state import Record, kill_guest_leftovers, kill_process

    path = state / "guests" / f"{name}.json"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        with open(fd, "rb") as f:
            record = Record.from_json(loads(f.read(1 << 24).decode("utf-8", "replace")))
    except (OSError, KeyError, TypeError, ValueError):
        return  # released meanwhile
    hv = record.hypervisor
    if hv is not None:
        kill_process(hv)
    try:  # its cgroup, whole (a fork chain cannot outrun it)
        kill_guest_leftovers(record, state)
    except SvirtError:
        pass  # release retries and keeps the record restore-failed
