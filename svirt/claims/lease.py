"""The host's lease, kept alive while the host has guests, and the fence rule.

One lease per host: its id is kept in the claims directory
(``lease.CLUSTER``, read and written under the host lock), so every svirt
process of the host puts its keys under the same lease.  Every process that
holds a guest of the host runs a :class:`LeaseKeeper` (two threads): the
refresher sends a keep-alive every TTL/4; the watchdog fences.

**The fence rule.**  etcd frees a lease's keys no earlier than TTL seconds
after the last keep-alive its leader received, and a keep-alive is received
after it was sent (a new leader only extends leases).  So a host that stops
its guests by ``sent + TTL - margin``, where ``sent`` is when the last
keep-alive that succeeded was *sent*, has stopped them before any other host
can be handed their uids, pairs or images.  ``margin`` is max(1 s, TTL/5):
room for the kill and for clocks that run at slightly different rates.  A
keep-alive answered "lease gone" (it expired or was revoked) fences at once.
Fencing SIGKILLs the guests (their hypervisor, then every process of their
uid); their records are then released as after any crash, and the cluster
keys they held are gone with the lease.  A process that holds no guest
sends nothing, so a host without guests holds no lease (it expires, or is
revoked when its last key is released).
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from svirt.claims.etcd import Etcd, LeaseGone
from svirt.errors import ClusterError

Stop = Callable[[], None]


def fence_margin(ttl: float) -> float:
    return max(1.0, ttl / 5)


class LeaseKeeper:
    """This process's share of the host's lease (see the module docstring)."""

    def __init__(self, etcd: Etcd, ttl: int, host_key: str, host_value: str) -> None:
        self.etcd = etcd
        self.ttl = ttl
        self.host_key, self.host_value = host_key, host_value
        self.lease = 0
        self.last_ok = 0.0  # monotonic time the last successful keep-alive was sent
        self.guards: dict[tuple[str, str], Stop] = {}
        self.fenced: list[str] = []  # why, one line per fenced guest (tests, logs)
        #: (when, last_ok) of each fence, monotonic: the rule is when < last_ok + ttl
        self.fences: list[tuple[float, float]] = []
        self._cond = threading.Condition()
        self._threads: list[threading.Thread] = []
        self._generation = 0

    # -------------------------------------------------------------- leases
    def deadline(self) -> float:
        return self.last_ok + self.ttl - fence_margin(self.ttl)

    def current(self, directory: Path, cluster: str) -> int:
        """The host's lease, alive (granted if there is none).  Call under the
        host claims lock: the lease file is read and written under it."""
        with self._cond:
            if self.lease and time.monotonic() < self.deadline():
                return self.lease
        path = directory / f"lease.{cluster}"
        lease = _read_lease(path)
        if lease:
            sent = time.monotonic()
            try:
                alive = self.etcd.keepalive(lease) > 0
            except LeaseGone:
                alive = False
            if alive:
                self._use(lease, sent)
                return lease
        sent = time.monotonic()
        lease = self.etcd.grant(self.ttl)
        _write_lease(path, lease, self.ttl)
        self.etcd.put(self.host_key, self.host_value, lease)
        self._use(lease, sent)
        return lease

    def _use(self, lease: int, sent: float) -> None:
        with self._cond:
            if lease != self.lease and self.guards:
                # guests of an older lease of ours: their keys are gone
                self._fence_locked("the host's lease was replaced")
            self.lease, self.last_ok = lease, sent
            self._cond.notify_all()

    def forget(self, lease: int) -> None:
        with self._cond:
            if self.lease == lease:
                self.lease = 0

    # -------------------------------------------------------------- guards
    def guard(self, key: tuple[str, str], stop: Stop) -> None:
        """Keep the lease alive while ``key``'s guest runs; ``stop`` fences it."""
        with self._cond:
            self.guards[key] = stop
            if not any(t.is_alive() for t in self._threads):
                self._generation += 1
                gen = self._generation
                self._threads = [
                    threading.Thread(target=self._refresh, args=(gen,), daemon=True,
                                     name="svirt-lease-refresh"),
                    threading.Thread(target=self._watch, args=(gen,), daemon=True,
                                     name="svirt-lease-watchdog")]
                for t in self._threads:
                    t.start()

    def unguard(self, key: tuple[str, str]) -> bool:
        """Drop ``key``; True when this process guards nothing any more."""
        with self._cond:
            self.guards.pop(key, None)
            if not self.guards:
                self._generation += 1  # the threads end
                self._cond.notify_all()
            return not self.guards

    def _refresh(self, gen: int) -> None:
        while True:
            with self._cond:
                if gen != self._generation:
                    return
                lease = self.lease
            sent = time.monotonic()
            try:
                ttl = self.etcd.keepalive(lease) if lease else -1
            except LeaseGone:
                ttl = -1
            except ClusterError:
                ttl = 0  # no answer: the watchdog decides
            with self._cond:
                if gen != self._generation:
                    return
                if ttl > 0 and lease == self.lease:
                    self.last_ok = sent
                elif ttl < 0 and lease == self.lease:
                    self._fence_locked(f"lease {lease:x} expired or was revoked")
                    return
                self._cond.wait(max(0.05, self.ttl / 4 - (time.monotonic() - sent)))

    def _watch(self, gen: int) -> None:
        with self._cond:
            while gen == self._generation:
                left = self.deadline() - time.monotonic()
                if left <= 0:
                    self._fence_locked(
                        f"no keep-alive of lease {self.lease:x} answered for "
                        f"{time.monotonic() - self.last_ok:.1f}s (TTL {self.ttl}s)")
                    return
                self._cond.wait(left)

    def _fence_locked(self, why: str) -> None:
        """Stop every guarded guest (the condition is held)."""
        stops = list(self.guards.items())
        self.fences.append((time.monotonic(), self.last_ok))
        self.guards.clear()
        self.lease = 0
        self._generation += 1
        self._cond.notify_all()
        for (state, name), stop in stops:
            try:
                stop()
            except Exception as err:  # noqa: BLE001 - every guest is tried
                self.fenced.append(f"{name} of {state}: fence failed: {err}")
                continue
            self.fenced.append(f"{name} of {state}: stopped ({why})")


def _read_lease(path: Path) -> int:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return 0
    try:
        data = json.loads(os.read(fd, 4096))
        lease = data.get("lease") if isinstance(data, dict) else None
    except (OSError, ValueError):
        return 0
    finally:
        os.close(fd)
    return lease if type(lease) is int and lease > 0 else 0


def _write_lease(path: Path, lease: int, ttl: int) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
        try:
            os.write(fd, json.dumps({"lease": lease, "ttl": ttl,
                                     "granted": time.time()}).encode())
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as err:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise ClusterError(f"cannot record the host's lease in {path}: {err.strerror}") from err


def remove_lease_file(directory: Path, cluster: str, lease: int) -> None:
    path = directory / f"lease.{cluster}"
    if _read_lease(path) == lease:
        try:
            os.unlink(path)
        except OSError:
            pass


def lease_of(directory: Path, cluster: str) -> int:
    return _read_lease(directory / f"lease.{cluster}")
