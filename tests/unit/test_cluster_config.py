"""The [cluster] table of the host config, and the cluster's key names."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from svirt.cluster.claims import ClusterClaims
from svirt.cluster.lease import fence_margin
from svirt.config import parse
from svirt.errors import ConfigError

ETCD = ["http://127.0.0.1:2379", "https://etcd2.example:2379/"]


def test_a_full_cluster_table() -> None:
    config = parse({"cluster": {"etcd": ETCD, "name": "prod", "host": "node1", "ttl": 5,
                                "timeout": 1, "ca": "/etc/ca.pem", "cert": "/etc/c.pem",
                                "key": "/etc/c.key", "image_identity": "export",
                                "exports": {"nfs1": "/srv/nfs1/"}}})
    cluster = config.cluster
    assert cluster is not None
    assert cluster.etcd == ("http://127.0.0.1:2379", "https://etcd2.example:2379")
    assert (cluster.name, cluster.host, cluster.ttl, cluster.timeout) == ("prod", "node1", 5, 1.0)
    assert cluster.ca == Path("/etc/ca.pem") and cluster.key == Path("/etc/c.key")
    assert cluster.exports == (("nfs1", Path("/srv/nfs1")),)


def test_defaults_and_no_cluster() -> None:
    assert parse({}).cluster is None
    cluster = parse({"cluster": {"etcd": ETCD[:1]}}).cluster
    assert cluster is not None
    assert (cluster.name, cluster.ttl, cluster.image_identity) == ("default", 15, "file")


@pytest.mark.parametrize(("table", "key"), [
    ({}, "cluster.etcd"),
    ({"etcd": []}, "cluster.etcd"),
    ({"etcd": ["etcd1:2379"]}, "cluster.etcd"),
    ({"etcd": ETCD, "ttl": 1}, "cluster.ttl"),
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


def test_claims_map_to_keys_and_back() -> None:
    config = parse({"cluster": {"etcd": ETCD, "name": "c1", "host": "h"}}).cluster
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
