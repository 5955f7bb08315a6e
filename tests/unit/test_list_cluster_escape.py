"""svirt list --cluster prints what any host of the cluster wrote into etcd:
a hostile host's values (names, paths, claim keys) reach the admin's
terminal escaped.  etcd itself is faked here: the values are what is under
test, and tests/integration/test_cluster.py covers reading a real etcd."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import pytest

from svirt import config
from svirt.claims import cluster as claims
from svirt.cli import host as cli

OSC52 = "\x1b]52;c;cm0gLXJmIH4K\x07"
HOSTILE = [{"host": f"h1{OSC52}", "state": "running", "name": "web\x1b[2J\x1b[6n",
            "uuid": None, "lease": "1a\r\x1b[31m", "claims": [f"uid-1500001{OSC52}",
                                                             "mcs-c1,c2\x1bP$q\x1b\\"],
            "images": [f"/img/\u202eexe.txt{OSC52}\n"]}]


class FakeClaims:
    def __init__(self, conf: Any) -> None:
        pass

    def guests(self) -> list[dict[str, Any]]:
        return HOSTILE


@pytest.mark.parametrize("as_json", [False, True])
def test_list_cluster_escapes_etcd_values(monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str],
                                          as_json: bool) -> None:
    monkeypatch.setattr(config, "load", lambda *a, **k: SimpleNamespace(cluster=object()))
    monkeypatch.setattr(claims, "ClusterClaims", FakeClaims)
    assert cli._list_cluster(as_json) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out and "\r" not in out
    assert "\u202e" not in out
    if as_json:
        assert json.loads(out) == HOSTILE  # escaped by JSON, intact for a program
    else:
        assert "\\x1b]52;c;cm0gLXJmIH4K\\x07" in out and "web\\x1b[2J" in out
        assert len(out.strip().splitlines()) == 2  # the header and one line per guest
