"""Review finding (review-b): the merge of issue 22 broke every release.

Object keys gained the birth time (``DEV-INO-bSEC.NSEC``, i22-bounds) while
the registry's check of the keys its journal names (i22-tree) allowed only
``[0-9A-Za-z]`` between dashes: the dot of the birth time made every object
"no object's key", so each guest on a file system with birth times (ext4,
/run here) ended ``restore-failed`` and its objects kept the guest's labels.
A plain stand-in, launched and stopped through the real path, must leave no
record behind.
"""

from __future__ import annotations

from pathlib import Path

from svirt.host import HostInfo
from svirt.launcher.launch import launch
from svirt.launcher.registry import Registry

from .helpers import build_spec, read_info, spec_dict


def test_review_b_release_accepts_birth_time_keys(
    standin: Path, hostile_registry: Registry, host: HostInfo, guest_uids: set[int],
) -> None:
    spec = spec_dict(standin, "plain", shutdown_timeout=0.5)
    with launch(build_spec(spec), registry=hostile_registry, host=host) as guest:
        guest_uids.add(read_info(guest)["uid"])
        guest.stop()
    assert [r.status for r in hostile_registry.records()] == []
    assert not hostile_registry.problems
