"""Issue 22 item 5: a guest's leftovers are found and killed by its cgroup.

The stand-in plays a ``jail = false`` guest (no PID namespace, no tini: what
it forks is loose on the host) that tries to survive its release and hide
from the orphan list: children that carry another registry's
``SVIRT_STATE_DIR`` in their own environment (what the old kill loop and
orphan list trusted), and a fork chain (each process forks, then exits: a
pid list is stale before it is read).  Release, ``svirt gc`` and the orphan
list must find them all the same, by the cgroup the kernel says they are in.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from svirt.host import HostInfo
from svirt.launcher import cgroupfs, cgroupkill
from svirt.launcher.launch import Guest, launch
from svirt.launcher.registry import Registry

from .helpers import SVIRT, build_spec, pids_of_uid, read_info, spec_dict, svirt_gc, wait_for

VARIANTS = {"tagged-children": 0, "fork-chain": 1}
#: a uid range of these tests' own: an svirt of before this change (another
#: suite on the same host) took any untagged process of its range for its orphan
OWN_UID_BASE = 1_700_000


@pytest.fixture(autouse=True)
def _own_uids(dirs: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SVIRT_UID_BASE", str(OWN_UID_BASE))


def _kill_by_cgroup(uid: int) -> None:
    """Test cleanup (the product failed if anything is left): every cgroup a
    process of ``uid`` is in, killed whole."""
    for _ in range(3):
        for pid in pids_of_uid(uid):
            leaf = cgroupfs.leaf_of(pid)
            if leaf is not None:
                with contextlib.suppress(Exception):
                    cgroupkill.kill_dirs(cgroupfs.dirs_of_leaf(leaf))
            with contextlib.suppress(OSError):
                os.kill(pid, 9)
        time.sleep(0.05)


@pytest.fixture
def cleanup_uids() -> Iterator[set[int]]:
    uids: set[int] = set()
    yield uids
    for uid in uids:
        _kill_by_cgroup(uid)


def _guest_uid(guest: Guest) -> int:
    return int(guest.labels["dac"].split(":")[0])


def _spawned(guest: Guest, uid: int, variant: int) -> None:
    """Wait until the stand-in's leftovers run (3 tagged sleepers besides the
    hypervisor, or a chain that has forked a few hundred times)."""
    read_info(guest)
    if variant == 0:
        assert wait_for(lambda: len(_tagged(uid)) >= 3, 10), \
            f"the stand-in's children carry no forged tag: {pids_of_uid(uid)}"
    else:
        first = set(pids_of_uid(uid))
        assert wait_for(lambda: set(pids_of_uid(uid)) - first, 10)
        time.sleep(0.3)


def _tagged(uid: int) -> set[int]:
    return {p for p in pids_of_uid(uid) if b"SVIRT_STATE_DIR=" in _environ(p)}


def _environ(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return b""


def _jail_false(standin: Path, name: str, variant: int) -> object:
    return build_spec(spec_dict(standin, name, "leftovers", variant)).with_changes(jail=False)


@pytest.mark.parametrize("variant", list(VARIANTS.values()), ids=list(VARIANTS))
def test_leftovers_die_with_the_release(
    variant: int, standin: Path, hostile_registry: Registry, host: HostInfo,
    cleanup_uids: set[int],
) -> None:
    """Stopped guest: release kills its whole cgroup; nothing of its uid lives
    on.  The hypervisor's environment carries nothing of svirt's."""
    spec = _jail_false(standin, "left", variant)
    with launch(spec, registry=hostile_registry, host=host) as guest:  # type: ignore[arg-type]
        uid = _guest_uid(guest)
        cleanup_uids.add(uid)
        _spawned(guest, uid, variant)
        env = _environ(guest.pid)
        assert env, "the hypervisor's environ is unreadable"
        assert b"SVIRT_" not in env, f"svirt's variables reach the hypervisor: {env!r}"
        started = time.monotonic()
    took = time.monotonic() - started
    left = pids_of_uid(uid)
    assert not left, f"processes of the guest's uid survive its release: {left}"
    assert took < 5, f"release took {took:.1f} s"


@pytest.mark.parametrize("variant", list(VARIANTS.values()), ids=list(VARIANTS))
def test_leftovers_of_a_lost_record_are_orphans_and_gc_kills_them(
    variant: int, standin: Path, hostile_registry: Registry, host: HostInfo,
    cleanup_uids: set[int],
) -> None:
    """The record is gone (wiped): every process of the guest shows in the
    orphan list (svirt list) whatever its environment says, and svirt gc
    kills them all, the fork chain included."""
    spec = _jail_false(standin, "lost", variant)
    env = dict(os.environ)
    with launch(spec, registry=hostile_registry, host=host) as guest:  # type: ignore[arg-type]
        uid = _guest_uid(guest)
        cleanup_uids.add(uid)
        _spawned(guest, uid, variant)
        hostile_registry.record_path(guest.name).unlink()
        orphans = hostile_registry.orphans()
        listed = {pid for pid, _uid in orphans}
        assert {u for _pid, u in orphans} == {uid}, orphans
        if variant == 0:
            tagged = _tagged(uid)
            assert tagged and tagged <= listed, f"hidden from the orphan list: {tagged - listed}"
        listing = subprocess.run([SVIRT, "list"], capture_output=True, text=True, env=env,
                                 timeout=60, check=False)
        assert "(orphan)" in listing.stdout, listing
        gc = svirt_gc(env)
        assert gc.returncode == 0, gc.stderr
        assert "killed orphan pid" in gc.stdout, gc.stdout
        assert wait_for(lambda: not pids_of_uid(uid), 2), \
            f"processes of the lost guest survive svirt gc: {pids_of_uid(uid)}\n{gc.stdout}"
        assert guest.wait(5) is not None


def test_fencing_kills_the_fork_chain(
    standin: Path, hostile_registry: Registry, host: HostInfo, cleanup_uids: set[int],
) -> None:
    """Cluster fencing (fence_guest: the lease is about to be lost) kills the
    hypervisor and its cgroup: the chain does not outrun it."""
    from svirt.launcher.uidstate import fence_guest

    spec = _jail_false(standin, "fence", 1)
    with launch(spec, registry=hostile_registry, host=host) as guest:  # type: ignore[arg-type]
        uid = _guest_uid(guest)
        cleanup_uids.add(uid)
        _spawned(guest, uid, 1)
        fence_guest(hostile_registry.state, guest.name)
        assert wait_for(lambda: not pids_of_uid(uid), 2), pids_of_uid(uid)
        assert guest.wait(5) is not None
