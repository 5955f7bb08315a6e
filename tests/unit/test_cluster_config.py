"""The [cluster] table of the host config, and the cluster's key names."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from svirt.claims.cluster import ClusterClaims
from svirt.claims.lease import fence_margin
from svirt.config import parse
from svirt.errors import ConfigError

ETCD = ["https://127.0.0.1:2379", "https://etcd2.example:2379/"]
TLS = {"cert": "/etc/svirt/etcd/client.pem", "key": "/etc/svirt/etcd/client.key"}


def test_a_full_cluster_table() -> None:
    config = parse({"cluster": {"etcd": ETCD, "name": "prod", "host": "node1", "ttl": 5,
                                "timeout": 1, "ca": "/etc/ca.pem", "cert": "/etc/c.pem",
                                "key": "/etc/c.key", "image_identity": "export",
                                "exports": {"nfs1": "/srv/nfs1/"}}})
    cluster = config.cluster
    assert cluster is not None
    assert cluster.etcd == ("https://127.0.0.1:2379", "https://etcd2.example:2379")
    assert not cluster.insecure
    assert (cluster.name, cluster.host, cluster.ttl, cluster.timeout) == ("prod", "node1", 5, 1.0)
    assert cluster.ca == Path("/etc/ca.pem") and cluster.key == Path("/etc/c.key")
    assert cluster.exports == (("nfs1", Path("/srv/nfs1")),)


def test_defaults_and_no_cluster() -> None:
    assert parse({}).cluster is None
    cluster = parse({"cluster": {"etcd": ETCD[:1], **TLS}}).cluster
    assert cluster is not None
    assert (cluster.name, cluster.ttl, cluster.image_identity) == ("default", 15, "file")


@pytest.mark.parametrize(("table", "key"), [
    ({}, "cluster.etcd"),
    ({"etcd": []}, "cluster.etcd"),
    ({"etcd": ["etcd1:2379"]}, "cluster.etcd"),
    ({"etcd": ETCD, **TLS, "ttl": 1}, "cluster.ttl"),
    ({"etcd": ETCD, **TLS, "user": "svirt-prod"}, "cluster.user"),
    ({"etcd": ETCD, **TLS, "password_file": "/etc/p"}, "cluster.user"),
    ({"etcd": ETCD, **TLS, "user": "a b", "password_file": "/etc/p"}, "cluster.user"),
    ({"etcd": ETCD, **TLS, "user": "u", "password_file": "p"}, "cluster.password_file"),
    ({"etcd": ETCD, "ttl": "15"}, "cluster.ttl"),
    ({"etcd": ETCD, "name": "a/b"}, "cluster.name"),
    ({"etcd": ETCD, "cert": "/c.pem"}, "cluster.cert"),
    ({"etcd": ETCD, "ca": "ca.pem"}, "cluster.ca"),
    ({"etcd": ETCD, "image_identity": "path"}, "cluster.image_identity"),
    ({"etcd": ETCD, "image_identity": "export"}, "cluster.exports"),
    ({"etcd": ETCD, "lease": 3}, "cluster.lease"),
])
def test_bad_tables_name_their_key(table: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse({"cluster": table})
    assert err.value.key == key


@pytest.mark.parametrize(("table", "key", "why"), [
    ({"etcd": ["http://127.0.0.1:2379"], **TLS}, "cluster.etcd", "is not https://"),
    ({"etcd": ["https://a:2379", "http://b:2379"], **TLS}, "cluster.etcd", "http://b:2379"),
    ({"etcd": ETCD}, "cluster.cert", "no client certificate"),
    ({"etcd": ETCD, "ca": "/etc/ca.pem"}, "cluster.cert", "no client certificate"),
    ({"etcd": ETCD, **TLS, "insecure": "yes"}, "cluster.insecure", "true or false"),
])
def test_an_unauthenticated_transport_is_refused(table: dict[str, Any], key: str,
                                                 why: str) -> None:
    """Anyone who reaches an http:// etcd, or one that takes no client
    certificate, can revoke the host's lease (every guest fenced) or delete
    image locks: refused unless the config says insecure = true."""
    with pytest.raises(ConfigError, match=why) as err:
        parse({"cluster": table})
    assert err.value.key == key
    assert key == "cluster.insecure" or "insecure = true" in (err.value.hint or "")


def test_insecure_true_accepts_http_and_no_certificate() -> None:
    cluster = parse({"cluster": {"etcd": ["http://127.0.0.1:2379"], "insecure": True}}).cluster
    assert cluster is not None and cluster.insecure
    assert cluster.transport_problems() == ["http://127.0.0.1:2379 is not https://",
                                            "no client certificate (cert, key)"]


def test_the_transport_refuses_http_without_insecure() -> None:
    """A ClusterConfig built in Python (not parsed) is checked again where
    the clients are made."""
    pytest.importorskip("etcd3gw")
    from svirt.claims.etcd import Etcd
    from svirt.config import ClusterConfig

    with pytest.raises(ConfigError, match="not https://"):
        Etcd(ClusterConfig(etcd=("http://127.0.0.1:2379",)))
    Etcd(ClusterConfig(etcd=("http://127.0.0.1:2379",), insecure=True))  # no request made


def test_claims_map_to_keys_and_back() -> None:
    config = parse({"cluster": {"etcd": ETCD, **TLS, "name": "c1", "host": "h"}}).cluster
    assert config is not None
    claims = ClusterClaims(config)
    for claim, key in (("uid-1500003", "/svirt/c1/uid/1500003"),
                       ("mcs-c17-c942", "/svirt/c1/mcs/c17-c942"),
                       ("smack-svirt-3", "/svirt/c1/smack/svirt-3")):
        assert claims.etcd_key(claim) == key
        assert claims.claim_of(key) == claim
    assert claims.claim_of("/svirt/c1/hosts/h") is None
    assert claims.claim_of("/svirt/c2/uid/1") is None


def test_the_fence_comes_before_the_ttl() -> None:
    for ttl in (2, 3, 15, 60):
        assert 0 < ttl - fence_margin(ttl) < ttl
