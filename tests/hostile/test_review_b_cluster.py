"""Review finding (review-b): etcd's credentials were read whatever their mode.

``[cluster] password_file`` (and the client key) authenticate this host to
etcd; whoever reads them can revoke its lease (every guest fenced) or delete
its image locks: the attack item 7 closes.  A ``jail = false`` guest runs as
a local user: a password file written with ``echo > file`` (0644) was used
as it was.  Here a real guest uid (not root) reads the file first: the
client must refuse it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from svirt.config import ClusterConfig
from svirt.errors import ConfigError

from .helpers import OTHER_UID, can_open

etcd = pytest.importorskip("svirt.claims.etcd")
pytest.importorskip("etcd3gw", reason="the cluster extra (etcd3gw) is not installed")


@pytest.fixture
def base() -> Iterator[Path]:
    """A directory other uids may walk (pytest's tmp is 0700)."""
    path = Path(tempfile.mkdtemp(prefix="svirt-etcd-", dir="/var/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.parametrize("which", ["password_file", "key"])
def test_review_b_etcd_secrets_open_to_others_are_refused(base: Path, which: str) -> None:
    secret = base / "secret"
    secret.write_text("hunter2\n")
    secret.chmod(0o644)  # what `echo ... > file` makes under umask 022
    assert can_open(OTHER_UID, OTHER_UID, secret), "a guest uid reads it: the attack is real"
    cert = base / "client.pem"
    cert.write_text("not used\n")
    key = base / "client.key"
    key.write_text("not used\n")
    key.chmod(0o600)
    conf = {"etcd": ("https://127.0.0.1:1",), "cert": cert, "key": key}
    if which == "password_file":
        conf.update(user="svirt-x", password_file=secret)
    else:
        conf.update(key=secret)
    with pytest.raises(ConfigError, match="open to other users"):
        etcd.Etcd(ClusterConfig(**conf))  # type: ignore[arg-type]
    secret.chmod(0o600)  # root's alone: accepted (nothing is contacted yet)
    etcd.Etcd(ClusterConfig(**conf))  # type: ignore[arg-type]
    assert os.stat(secret).st_uid == 0
