"""What a registry asks of the cluster: taken keys, creation, image locks, release.

Every host-wide claim a record makes (``uid-N``, ``mcs-cA-cB``,
``smack-svirt-N``; :mod:`svirt.claims.host`) is also a key in etcd,
created with the record's other keys in one transaction that succeeds only
if none of them exists (``create_revision == 0``), under the host's lease.
Two hosts racing for one uid, pair or image: exactly one transaction
succeeds; the loser marks what it lost as taken and picks again
(:meth:`ClusterClaims.allocate`, the one re-pick loop).  All of it runs
under the host claims lock, so the processes of one host never race each
other here.  A writable image on shared storage is a key too
(``image-SHA256``, in the record's claims), created before its labels
change; release deletes a key only while it still names the same record.

What it is given of a record is plain data (:class:`~svirt.claims.owner.Claim`:
the keys, the owner, a fence callback), never the registry: the registry
calls the cluster, the cluster never calls the registry.
"""

from __future__ import annotations

import hashlib
import os
import socket
import threading
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol, TypeVar

from svirt.claims.etcd import Etcd, KeyValue, LeaseGone, dumps, loads
from svirt.claims.host import ClaimSession, HostClaims
from svirt.claims.lease import LeaseKeeper, lease_of, remove_lease_file
from svirt.claims.owner import Claim, Owner
from svirt.config import ClusterConfig
from svirt.errors import ClusterError, SecurityError

T = TypeVar("T")

#: transactions one reservation may lose to other hosts before it gives up
CLUSTER_TRIES = 16
#: claim kinds that are cluster keys
KINDS = ("uid", "mcs", "smack", "image")

_keepers: dict[tuple[str, str, tuple[str, ...]], LeaseKeeper] = {}
_keepers_lock = threading.Lock()


class OpenImage(Protocol):
    """An image the registry opened and checked (``security.files.OpenedObject``):
    the fd that was checked is the one whose identity is locked."""

    @property
    def path(self) -> Path: ...

    @property
    def fd(self) -> int: ...


def allocate_claims(session: ClaimSession, cluster: ClusterClaims | None,
                    pick: Callable[[frozenset[str]], tuple[T, Claim]]) -> T:
    """``pick`` (the registry's local allocation: it claims on the host and
    returns what it built with its :class:`Claim`) once on a host alone, or
    until the cluster takes its keys too (:meth:`ClusterClaims.allocate`)."""
    if cluster is None:
        return pick(frozenset())[0]
    return cluster.allocate(session, pick)


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

    def owner_value(self, owner: Owner, **extra: str) -> str:
        return dumps({"host": self.host, "state": owner.state, "name": owner.name,
                      "uuid": owner.uuid, "created": owner.created, **extra})

    def _ours(self, value: str, owner: Owner) -> bool:
        data = loads(value)
        return (data.get("host"), data.get("state"), data.get("name"), data.get("uuid"),
                data.get("created")) == (self.host, owner.state, owner.name, owner.uuid,
                                         owner.created)

    def taken(self) -> set[str]:
        """The claim names every host holds in the cluster (one range read)."""
        out = set()
        for kv in self.etcd.prefix(self.prefix, keys_only=True):
            claim = self.claim_of(kv.key)
            if claim is not None:
                out.add(claim)
        return out

    def _create(self, directory: Path, values: Mapping[str, str]) -> dict[str, KeyValue]:
        """Create ``values`` under the host's lease, in one transaction (a
        lease that expired since it was checked: a new one, once).  Under the
        host lock.  The keys that exist already ({} when created)."""
        lease = self.keeper.current(directory, self.name)
        try:
            return self.etcd.create_all(values, lease)
        except LeaseGone:
            self.keeper.forget(lease)
            lease = self.keeper.current(directory, self.name)
            return self.etcd.create_all(values, lease)

    def _guard(self, claim: Claim) -> None:
        self.keeper.guard((claim.owner.state, claim.owner.name), claim.fence)

    # ----------------------------------------------------------- allocation
    def allocate(self, session: ClaimSession,
                 pick: Callable[[frozenset[str]], tuple[T, Claim]]) -> T:
        """``pick`` (the registry's local allocation, given what the cluster
        holds) until the cluster takes its keys; under the host lock.  A pick
        that loses a key to another host is released on this host and the
        keys it lost count as taken for the next."""
        self.keeper.current(session.directory, self.name)
        taken = self.taken()
        for _ in range(CLUSTER_TRIES):
            picked, claim = pick(frozenset(taken))
            value = self.owner_value(claim.owner)
            try:
                lost = self._create(session.directory,
                                    {self.etcd_key(k): value for k in cluster_keys(claim.keys)})
            except BaseException:
                session.release(claim.keys, claim.owner)
                raise
            if not lost:
                self._guard(claim)
                return picked
            session.release(claim.keys, claim.owner)
            taken |= {c for k in lost if (c := self.claim_of(k)) is not None}
        raise ClusterError(f"lost {CLUSTER_TRIES} allocation races to other hosts in a row",
                           endpoints=self.etcd.endpoints, hint="retry")

    def keep(self, host: HostClaims, claim: Claim) -> None:
        """Keep the host's lease alive for an adopted guest's keys.  Keys its
        lease lost meanwhile (no supervisor refreshed it) are created again;
        a key another guest took since is a collision: the guest is fenced."""
        keys = cluster_keys(claim.keys)
        if not keys:
            return
        owner = claim.owner
        with host.locked():
            lease = self.keeper.current(host.directory, self.name)
            value = self.owner_value(owner)
            missing = {}
            for key in map(self.etcd_key, keys):
                found = [kv for kv in self.etcd.prefix(key) if kv.key == key]
                if not found:
                    missing[key] = value
                elif not self._ours(found[0].value, owner):
                    claim.fence()
                    raise ClusterError(
                        f"guest {owner.name}: {self.claim_of(key)} was handed to another "
                        "guest while no supervisor held this host's lease; the guest was "
                        "stopped", endpoints=self.etcd.endpoints)
            if missing and self.etcd.create_all(missing, lease):
                claim.fence()
                raise ClusterError(f"guest {owner.name}: its keys were taken meanwhile; "
                                   "the guest was stopped", endpoints=self.etcd.endpoints)
            self._guard(claim)

    # ---------------------------------------------------------- image locks
    def image_identity(self, obj: OpenImage) -> str | None:
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

    def lock_image(self, host: HostClaims, owner: Owner, claims: list[str],
                   obj: OpenImage, save: Callable[[], None]) -> None:
        """Take the cluster-wide writer lock on ``obj`` for ``owner``'s guest:
        the claim goes into ``claims`` (the record's list) and ``save`` writes
        it down first (intent), then the key is created.  Raises
        SecurityError when another guest of any host holds it."""
        identity = self.image_identity(obj)
        if identity is None:
            return
        claim = "image-" + hashlib.sha256(identity.encode()).hexdigest()[:48]
        if claim in claims:
            return
        with host.locked():
            self.keeper.current(host.directory, self.name)
            claims.append(claim)
            save()
            value = self.owner_value(owner, identity=identity, path=str(obj.path))
            try:
                lost = self._create(host.directory, {self.etcd_key(claim): value})
            except BaseException:
                claims.remove(claim)
                save()
                raise
            if lost:
                claims.remove(claim)
                save()
                holder = loads(next(iter(lost.values())).value)
                raise SecurityError(
                    f"{obj.path} is open for writing by guest {holder.get('name', '?')} on "
                    f"host {holder.get('host', '?')} (cluster {self.name}); {owner.name} "
                    "wants it writable too", path=obj.path,
                    hint="stop that guest first, or give this guest its own image "
                         "(svirt list --cluster)")

    # -------------------------------------------------------------- release
    def release(self, session: ClaimSession, claim: Claim) -> list[str]:
        """Delete ``claim``'s keys that still name its owner; when this process
        then guards nothing and the lease holds no key, revoke it.  Never
        raises: the problems are returned (keys left behind go with the lease)."""
        problems: list[str] = []
        keeper = self.keeper
        owner = claim.owner
        idle = keeper.unguard((owner.state, owner.name))
        try:
            for key in map(self.etcd_key, cluster_keys(claim.keys)):
                for kv in self.etcd.prefix(key):
                    if kv.key == key and self._ours(kv.value, owner):
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
            problems.append(f"cluster {self.name}: guest {owner.name}'s keys stay until the "
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


def cluster_keys(claims: Iterable[str]) -> list[str]:
    """The claims that are cluster keys too (every kind in :data:`KINDS`)."""
    return [k for k in claims if k.partition("-")[0] in KINDS]
