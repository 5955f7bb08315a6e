"""The etcd v3 client svirt uses: a thin layer over ``etcd3gw``.

``etcd3gw`` (OpenStack's client for etcd's gRPC gateway, ``/v3/...`` JSON
over HTTP) talks to one endpoint; :class:`Etcd` holds one per configured
member and sends each request to the member that last answered, then to
the others.  A member that refuses the connection is skipped at once; one
that has lost its quorum holds a request until the timeout (etcd answers
neither reads nor writes without a leader).  When every member failed, the
request fails with :class:`~svirt.errors.NoQuorum`: svirt never decides
alone.  Every read is linearizable (etcd's default), so an answer is the
cluster's, not a stale member's.

The transport is authenticated both ways: ``https://`` members verified
against ``ca`` (else the system's CAs) and a client certificate; anything
less is refused here too (not only when the config is parsed) unless the
config says ``insecure = true``.  The HTTP sessions ignore the environment
(``trust_env = False``): a ``REQUESTS_CA_BUNDLE``, ``HTTPS_PROXY`` or
``~/.netrc`` of whoever runs svirt cannot replace the CA or route the
requests elsewhere.

With ``user`` (and ``password_file``) svirt authenticates to etcd's auth
(``/v3/auth/authenticate``) and sends the token with every request; an
expired token is renewed once per request.  A role per cluster name limits
what a host's credentials can touch to ``/svirt/NAME/``.  (etcd's JSON
gateway does not map a client certificate's CN to a user: the certificate
authenticates the connection, the password the user.)
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from svirt.config import ClusterConfig, config_path
from svirt.errors import ClusterError, ConfigError, NoQuorum

T = TypeVar("T")

#: the gRPC gateway's error texts for a lease that has expired or was revoked
LEASE_GONE = ("requested lease not found", "lease not found")


#: the gateway's error texts for a token it no longer knows
TOKEN_GONE = ("invalid auth token", "user name is empty")

#: TLS failures, as requests words them, and what they mean here
TLS_REASONS = (
    ("CERTIFICATE_VERIFY_FAILED", "TLS: its certificate is not signed by the configured ca"),
    ("certificate required", "TLS: it wants a client certificate (cert, key)"),
    ("unknown ca", "TLS: it refused the client certificate (another CA)"),
    ("bad certificate", "TLS: it refused the client certificate"),
    ("EOF occurred in violation", "TLS: it ended the handshake (no client certificate, or "
                                  "one it refused)"),
    ("WRONG_VERSION_NUMBER", "TLS: it does not speak TLS (http://?)"),
    ("RemoteDisconnected", "it closed the connection (https:// member reached over http?)"),
    ("Connection aborted", "it closed the connection (TLS refused?)"),
)


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode("ascii")


def _unb64(data: str) -> str:
    return base64.b64decode(data).decode("utf-8", "replace")


def _prefix_end(prefix: str) -> str:
    raw = bytearray(prefix.encode())
    raw[-1] += 1
    return base64.b64encode(bytes(raw)).decode("ascii")


@dataclass(frozen=True)
class KeyValue:
    key: str
    value: str
    lease: int
    create_revision: int


class LeaseGone(ClusterError):
    """The lease named in a request has expired or was revoked."""


class Etcd:
    """The cluster's members, tried in turn (see the module docstring)."""

    def __init__(self, config: ClusterConfig) -> None:
        try:
            import etcd3gw
        except ImportError as err:
            raise ClusterError(
                "the host config has a [cluster] table but the etcd3gw package is missing",
                hint="pip install 'svirt[cluster]'") from err
        import requests

        problems = config.transport_problems()
        if problems and not config.insecure:
            raise ConfigError("etcd must be reached over TLS with a client certificate: "
                              + "; ".join(problems), source=str(config_path()),
                              key="cluster.etcd",
                              hint="or say insecure = true in [cluster] to accept that")
        self.endpoints = list(config.etcd)
        self.timeout = config.timeout
        self._clients = []
        for url in self.endpoints:
            parts = urlsplit(url)
            session = requests.Session()
            session.trust_env = False
            session.verify = str(config.ca) if config.ca else True
            if config.cert is not None and config.key is not None:
                _check_secret(config.key, "cluster.key")
                session.cert = (str(config.cert), str(config.key))
            self._clients.append(etcd3gw.Etcd3Client(
                host=parts.hostname or "localhost", port=parts.port or 2379,
                protocol=parts.scheme, session=session,
                timeout=config.timeout, api_path="/v3/"))
        self._good = 0
        self._user = config.user
        self._password = _read_password(config) if config.user else ""
        self._token: str | None = None

    # ------------------------------------------------------------ transport
    def _login(self, client: Any) -> None:
        """A token for ``self._user`` (through ``client``), on every session."""
        self._token = None
        for c in self._clients:  # an expired token would fail the login itself
            c.session.headers.pop("Authorization", None)
        result = client.post(client.get_url("/auth/authenticate"),
                             json={"name": self._user, "password": self._password})
        token = result.get("token") if isinstance(result, dict) else None
        if not isinstance(token, str) or not token:
            raise ClusterError(f"etcd gave user {self._user} no token (is auth enabled?)",
                               endpoints=self.endpoints)
        self._token = token
        for c in self._clients:
            c.session.headers["Authorization"] = token

    def _authenticated(self, client: Any, fn: Callable[[Any], T]) -> T:
        from etcd3gw import exceptions as ex

        if self._user and self._token is None:
            self._login(client)
        try:
            return fn(client)
        except ex.Etcd3Exception as err:
            text = err.detail_text or str(err)
            if not self._user or not any(t in text for t in TOKEN_GONE):
                raise
        self._login(client)  # the token expired (or the member restarted): once more
        return fn(client)

    def _call(self, what: str, fn: Callable[[Any], T]) -> T:
        """``fn(client)`` on the member that last answered, then the others."""
        from etcd3gw import exceptions as ex

        errors: list[str] = []
        n = len(self._clients)
        for i in range(n):
            index = (self._good + i) % n
            try:
                result = self._authenticated(self._clients[index], fn)
            except (ex.ConnectionFailedError, ex.ConnectionTimeoutError,
                    ex.InternalServerError) as err:
                errors.append(f"{self.endpoints[index]}: {_reason(err)}")
                continue
            except ex.Etcd3Exception as err:
                text = err.detail_text or str(err)
                if any(g in text for g in LEASE_GONE):
                    raise LeaseGone(f"etcd: {what}: the lease is gone",
                                    endpoints=self.endpoints) from err
                raise ClusterError(f"etcd refused {what}: {text.strip()[:300]}",
                                   endpoints=self.endpoints) from err
            except OSError as err:  # TLS files unreadable, ...
                errors.append(f"{self.endpoints[index]}: {err}")
                continue
            self._good = index
            return result
        raise NoQuorum(
            f"no etcd member answered {what} within {self.timeout:g}s: " + "; ".join(errors),
            endpoints=self.endpoints,
            hint="the cluster has lost its quorum or this host is cut off from it; svirt "
                 "allocates nothing without it (svirt host shows the members)")

    def _post(self, what: str, path: str, body: Mapping[str, Any]) -> dict[str, Any]:
        def post(client: Any) -> dict[str, Any]:
            result = client.post(client.get_url(path), json=dict(body))
            return result if isinstance(result, dict) else {}
        return self._call(what, post)

    # ------------------------------------------------------------------- kv
    def create_all(self, values: Mapping[str, str], lease: int) -> dict[str, KeyValue]:
        """Create every key of ``values`` under ``lease`` in one transaction,
        only if none exists (create_revision == 0).  Returns {} when created,
        else the keys that already exist (none is written then)."""
        keys = list(values)
        body = {
            "compare": [{"key": _b64(k), "result": "EQUAL", "target": "CREATE",
                         "create_revision": "0"} for k in keys],
            "success": [{"request_put": {"key": _b64(k), "value": _b64(v), "lease": str(lease)}}
                        for k, v in values.items()],
            "failure": [{"request_range": {"key": _b64(k)}} for k in keys],
        }
        result = self._post("a compare-and-swap transaction", "/kv/txn", body)
        if result.get("succeeded"):
            return {}
        taken: dict[str, KeyValue] = {}
        for response in result.get("responses", []):
            for kv in response.get("response_range", {}).get("kvs", []):
                item = _kv(kv)
                taken[item.key] = item
        if not taken:  # removed between the compare and the range: try again
            taken = {k: KeyValue(k, "", 0, 0) for k in keys}
        return taken

    def delete_if(self, key: str, value: str) -> bool:
        """Delete ``key`` if it still holds ``value`` (a key taken over by
        someone else is not ours to delete)."""
        body = {
            "compare": [{"key": _b64(key), "result": "EQUAL", "target": "VALUE",
                         "value": _b64(value)}],
            "success": [{"request_delete_range": {"key": _b64(key)}}],
        }
        return bool(self._post("a delete", "/kv/txn", body).get("succeeded"))

    def put(self, key: str, value: str, lease: int = 0) -> None:
        body: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
        if lease:
            body["lease"] = str(lease)
        self._post("a put", "/kv/put", body)

    def prefix(self, prefix: str, *, keys_only: bool = False) -> list[KeyValue]:
        body: dict[str, Any] = {"key": _b64(prefix), "range_end": _prefix_end(prefix)}
        if keys_only:
            body["keys_only"] = True
        result = self._post("a range read", "/kv/range", body)
        return [_kv(kv) for kv in result.get("kvs", [])]

    # --------------------------------------------------------------- leases
    def grant(self, ttl: int) -> int:
        result = self._post("a lease grant", "/lease/grant", {"TTL": str(ttl), "ID": "0"})
        if result.get("error"):
            raise ClusterError(f"etcd refused a lease: {result['error']}",
                               endpoints=self.endpoints)
        return int(result["ID"])

    def keepalive(self, lease: int) -> int:
        """Refresh ``lease``: its TTL, or -1 when it is gone."""
        result = self._post("a lease keep-alive", "/lease/keepalive", {"ID": str(lease)})
        inner = result.get("result", result)
        return int(inner.get("TTL", -1)) if isinstance(inner, dict) else -1

    def time_to_live(self, lease: int) -> tuple[int, list[str]]:
        """(remaining seconds or -1, the keys attached)."""
        result = self._post("a lease query", "/kv/lease/timetolive",
                            {"ID": str(lease), "keys": True})
        return int(result.get("TTL", -1)), [_unb64(k) for k in result.get("keys", [])]

    def revoke(self, lease: int) -> None:
        try:
            self._post("a lease revoke", "/kv/lease/revoke", {"ID": str(lease)})
        except LeaseGone:
            pass

    # ---------------------------------------------------------------- state
    def members(self) -> list[dict[str, Any]]:
        result = self._post("the member list", "/cluster/member/list", {})
        members = result.get("members", [])
        return [m for m in members if isinstance(m, dict)]

    def endpoint_status(self) -> list[tuple[str, str]]:
        """(endpoint, "leader" | "follower" | the problem) for every member."""
        out = []
        for url, client in zip(self.endpoints, self._clients, strict=True):
            try:
                status = self._authenticated(client, lambda c: c.status())
            except Exception as err:  # noqa: BLE001 - reported, one line per member
                out.append((url, f"unreachable ({_reason(err)})"))
                continue
            errors = status.get("errors") or []
            if errors:
                out.append((url, "unhealthy: " + "; ".join(map(str, errors))))
            else:
                header = status.get("header", {})
                role = "leader" if status.get("leader") == header.get("member_id") else "follower"
                out.append((url, f"{role}, version {status.get('version', '?')}"))
        return out


def _check_secret(path: Path, key: str) -> None:
    """``path`` (the client key, the etcd password) must be this user's
    (root's) and closed to others: whoever reads it is this host to etcd and
    can revoke its lease (fencing every guest) or free its image locks, and
    a ``jail = false`` guest is a local user."""
    import os
    import stat

    try:
        st = os.stat(path)
    except OSError as err:
        raise ConfigError(f"cannot read {path}: {err.strerror}", source=str(config_path()),
                          key=key) from None
    if st.st_uid not in (0, os.geteuid()) or st.st_mode & stat.S_IRWXO:
        raise ConfigError(
            f"{path} is open to other users (mode {stat.filemode(st.st_mode)}, uid "
            f"{st.st_uid}): anyone who reads it can fence this host's guests",
            source=str(config_path()), key=key,
            hint=f"chown root {path} && chmod go-rwx {path}")


def _read_password(config: ClusterConfig) -> str:
    path = config.password_file
    if path is None:
        raise ConfigError("user needs password_file", source=str(config_path()),
                          key="cluster.password_file")
    _check_secret(path, "cluster.password_file")
    try:
        with open(path, encoding="utf-8") as f:
            return f.read(4096).rstrip("\n")
    except OSError as err:
        raise ConfigError(f"cannot read {path}: {err.strerror}", source=str(config_path()),
                          key="cluster.password_file",
                          hint="a file only root reads (0600) holding the etcd user's "
                               "password") from None


def _kv(kv: Mapping[str, Any]) -> KeyValue:
    return KeyValue(_unb64(kv.get("key", "")), _unb64(kv.get("value", "")),
                    int(kv.get("lease", 0)), int(kv.get("create_revision", 0)))


def _reason(err: BaseException) -> str:
    text = str(err) or getattr(err, "detail_text", None) or type(err).__name__
    for marker in ("Connection refused", "Read timed out", "timed out"):
        if marker in text:
            return marker.lower()
    for marker, why in TLS_REASONS:
        if marker in text:
            return why
    return text.strip().splitlines()[0][:160] if text.strip() else type(err).__name__


def dumps(data: Mapping[str, Any]) -> str:
    return json.dumps(dict(data), sort_keys=True, separators=(",", ":"))


def loads(text: str) -> dict[str, Any]:
    try:
        data = json.loads(text)
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


__all__: Sequence[str] = ["Etcd", "KeyValue", "LeaseGone", "dumps", "loads"]
