"""Host-wide claims: registries with private directories never share a uid or
a category pair (svirt/claims/host.py).

Most tests use a private claims directory (so that they race only with
themselves); the real-guest test uses the host's default one.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from svirt.claims.host import HostClaims
from svirt.claims.owner import Owner
from svirt.errors import StateError
from svirt.images.build import TinyGuest
from svirt.launcher.launch import Guest
from svirt.launcher.record import Record
from svirt.launcher.registry import Registry
from svirt.procfs import boot_id, start_time
from svirt.security.dac import DacDriver
from svirt.spec import Backend, GuestSpec
from svirt.testing import tiny_spec

from .helpers import wait_for

ROOT = Path(__file__).resolve().parents[2]
BASE = DacDriver().uid_base


@pytest.fixture
def claims_dir(tmp_path: Path) -> Path:
    return tmp_path / "claims"


@pytest.fixture
def kernel(tmp_path: Path) -> Path:
    k = tmp_path / "vmlinuz"
    k.write_bytes(b"k")
    return k


def _registry(path: Path, claims: Path | None) -> Registry:
    return Registry(path / "run", path / "state",
                    claims=HostClaims(claims) if claims is not None else None)


def _spec(name: str, kernel: Path) -> GuestSpec:
    return GuestSpec(name=name, kernel=kernel, uuid=uuid.uuid4())


def _uid(record: Record) -> int:
    return int(record.labels["dac"].process.split(":")[0])


def _claim_files(claims: Path) -> list[str]:
    return sorted(n for n in os.listdir(claims) if n.startswith(("uid-", "mcs-")))


def _workers(tmp_path: Path, claims: Path, n: int, count: int, mode: str
             ) -> list[list[dict[str, object]]]:
    go = tmp_path / "go"
    procs = []
    for i in range(n):
        state = tmp_path / f"reg{i}"
        state.mkdir()
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "tests.integration.claims_worker", str(state), str(claims),
             str(count), str(go), mode], cwd=ROOT, stdout=subprocess.PIPE, text=True))
    time.sleep(0.5)  # every worker imported and waiting
    go.touch()
    out = []
    for proc in procs:
        stdout, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0
        out.append([json.loads(line) for line in stdout.splitlines()])
    return out


def test_private_registries_in_parallel_never_share_a_uid_or_pair(
        tmp_path: Path, claims_dir: Path) -> None:
    """Four processes, four private registries, 25 guests each held at once:
    100 distinct uids and 100 distinct pairs out of only 190 (c0.c19).  The
    SELinux driver computes labels from explicit contexts, no SELinux kernel."""
    start = time.monotonic()
    results = _workers(tmp_path, claims_dir, 4, 25, "keep")
    rows = [r for rows in results for r in rows]
    assert not [r for r in rows if "problem" in r]
    assert len(rows) == 100
    uids = [str(r["uid"]) for r in rows]
    levels = [str(r["level"]) for r in rows]
    assert len(set(uids)) == 100, sorted(uids)
    assert len(set(levels)) == 100, sorted(levels)
    assert len(_claim_files(claims_dir)) == 200
    # every claim names its owner: a registry's state dir, a guest and its record
    owner = json.loads((claims_dir / f"uid-{BASE}").read_text())["owner"]
    assert owner["state"].startswith(str(tmp_path / "reg")) and owner["boot"] == boot_id()
    print(f"100 reservations in 4 registries: {time.monotonic() - start:.2f} s")


def test_parallel_reserve_and_release_leave_no_claim(tmp_path: Path, claims_dir: Path) -> None:
    """Reservations released as they go (every other one right away, the rest
    at the end): nothing is left claimed, and no uid was held twice at once
    by workers that keep theirs (checked above); here the release path."""
    results = _workers(tmp_path, claims_dir, 4, 20, "release")
    assert all(len(rows) == 20 for rows in results)
    assert _claim_files(claims_dir) == []
    assert not [f for f in os.listdir(claims_dir) if f.endswith(".tmp")]


def _reserve_in_child(tmp_path: Path, claims: Path, name: str) -> dict[str, object]:
    """Reserve in a registry of its own from a process that then exits
    without releasing (a launcher SIGKILLed after reserve)."""
    code = (
        "import json, sys, uuid\n"
        "from pathlib import Path\n"
        "from svirt.claims.host import HostClaims\n"
        "from svirt.launcher.registry import Registry\n"
        "from svirt.security.dac import DacDriver\n"
        "from svirt.spec import GuestSpec\n"
        "p, c, name = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]\n"
        "reg = Registry(p / 'run', p / 'state', claims=HostClaims(c))\n"
        "(p / 'k').write_bytes(b'k')\n"
        "r = reg.reserve(GuestSpec(name=name, kernel=p / 'k', uuid=uuid.uuid4()), [DacDriver()])\n"
        "print(json.dumps({'slot': r.slot, 'uid': int(r.labels['dac'].process.split(':')[0]),"
        " 'state': str(reg.state)}))\n"
    )
    (tmp_path / name).mkdir()
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / name), str(claims), name],
                         cwd=ROOT, capture_output=True, text=True, check=True, timeout=60)
    return dict(json.loads(out.stdout))


def _rewind_hint(claims: Path) -> None:
    """As after a release below: the next scan starts at slot 0 again."""
    with HostClaims(claims).locked() as host:
        host.set_hint(f"uid-{BASE}", 0)


def test_claim_of_a_dead_launcher_whose_record_remains_is_respected(
        tmp_path: Path, claims_dir: Path, kernel: Path) -> None:
    """The launcher died (its guest may still run): its registry keeps the
    record until gc, and no other registry gets the uid meanwhile."""
    a = _reserve_in_child(tmp_path, claims_dir, "a")
    _rewind_hint(claims_dir)
    b = _registry(tmp_path / "b", claims_dir)
    got = [b.reserve(_spec(f"b{i}", kernel), [DacDriver()]) for i in range(5)]
    assert a["uid"] not in {_uid(r) for r in got}
    # the record dropped (gc in registry a): the claim is stale, and taken over
    Path(str(a["state"]), "guests", "a.json").unlink()
    _rewind_hint(claims_dir)
    taken = b.reserve(_spec("b-next", kernel), [DacDriver()])
    assert _uid(taken) == a["uid"]
    for r in [*got, taken]:
        b.release(r)
    assert _claim_files(claims_dir) == []


def test_claim_of_a_deleted_registry_is_reclaimed_only_when_no_process_runs(
        tmp_path: Path, claims_dir: Path, kernel: Path) -> None:
    a = _reserve_in_child(tmp_path, claims_dir, "a")
    uid = int(str(a["uid"]))
    shutil.rmtree(tmp_path / "a")  # a test removed its temporary registry
    # an orphan still runs as the uid: the claim holds
    orphan = subprocess.Popen(["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
                               "sleep", "60"])
    b = _registry(tmp_path / "b", claims_dir)
    try:
        assert wait_for(lambda: os.stat(f"/proc/{orphan.pid}").st_uid == uid, 5)
        _rewind_hint(claims_dir)
        first = b.reserve(_spec("b0", kernel), [DacDriver()])
        assert _uid(first) != uid
        assert b.sweep_claims() == []
    finally:
        orphan.kill()
        orphan.wait()
    # no process any more: the sweep (svirt gc) removes it; a reserve would take it
    report = b.sweep_claims()
    assert report == [f"host claim uid-{uid}: stale (guest a of {a['state']}), removed"]
    _rewind_hint(claims_dir)
    second = b.reserve(_spec("b1", kernel), [DacDriver()])
    assert _uid(second) == uid
    b.release(first)
    b.release(second)


def test_a_stale_claim_is_taken_over_by_reserve(
        tmp_path: Path, claims_dir: Path, kernel: Path) -> None:
    a = _reserve_in_child(tmp_path, claims_dir, "a")
    shutil.rmtree(tmp_path / "a")
    _rewind_hint(claims_dir)
    b = _registry(tmp_path / "b", claims_dir)
    record = b.reserve(_spec("b0", kernel), [DacDriver()])
    assert _uid(record) == a["uid"]
    owner = json.loads((claims_dir / f"uid-{a['uid']}").read_text())["owner"]
    assert owner["state"] == str(b.state) and owner["name"] == "b0"
    b.release(record)


def test_a_claim_of_another_boot_is_stale(tmp_path: Path, claims_dir: Path,
                                          kernel: Path) -> None:
    """A claims directory that is not a tmpfs (SVIRT_CLAIMS_DIR) outlives a boot."""
    a = _registry(tmp_path / "a", claims_dir)
    record = a.reserve(_spec("a0", kernel), [DacDriver()])
    path = claims_dir / f"uid-{_uid(record)}"
    data = json.loads(path.read_text())
    data["owner"]["boot"] = "another-boot"
    path.write_text(json.dumps(data))
    _rewind_hint(claims_dir)
    b = _registry(tmp_path / "b", claims_dir)
    taken = b.reserve(_spec("b0", kernel), [DacDriver()])
    assert taken.labels["dac"] == record.labels["dac"]
    a.release(record)  # not its claim any more: left alone
    assert json.loads(path.read_text())["owner"]["name"] == "b0"
    b.release(taken)
    assert not path.exists()


def test_garbled_and_symlinked_claims_are_reported_and_held(
        tmp_path: Path, claims_dir: Path, kernel: Path) -> None:
    """A claim that cannot be read does not crash reserve: it is named in the
    registry's problems and its uid is not handed out.  A symlink planted at a
    claim's name is never followed (read or written through)."""
    with HostClaims(claims_dir).locked():
        pass  # creates the directory
    (claims_dir / f"uid-{BASE}").write_bytes(b'{"key": "uid-')
    canary = tmp_path / "canary"
    canary.write_text("canary")
    os.symlink(canary, claims_dir / f"uid-{BASE + 1}")
    (claims_dir / f"uid-{BASE + 2}").write_text(json.dumps({"key": f"uid-{BASE + 2}",
                                                            "owner": {"state": "relative"}}))
    reg = _registry(tmp_path / "r", claims_dir)
    record = reg.reserve(_spec("g", kernel), [DacDriver()])
    assert _uid(record) == BASE + 3
    assert len([p for p in reg.problems if "host claim" in p]) == 3, reg.problems
    assert canary.read_text() == "canary"
    assert os.path.islink(claims_dir / f"uid-{BASE + 1}")
    # writing: a symlink at the name is refused, not followed
    owner = record.claim_owner(reg.state)
    with HostClaims(claims_dir).locked() as host, pytest.raises(StateError):
        host.claim([f"uid-{BASE + 1}"], owner)
    assert canary.read_text() == "canary"
    reg.release(record)
    assert reg.sweep_claims() == []  # garbled ones stay for a person
    assert (claims_dir / f"uid-{BASE}").exists()


def test_claims_directory_is_roots_alone(tmp_path: Path, claims_dir: Path,
                                         kernel: Path) -> None:
    reg = _registry(tmp_path / "r", claims_dir)
    record = reg.reserve(_spec("g", kernel), [DacDriver()])
    st = os.lstat(claims_dir)
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o700)
    for name in os.listdir(claims_dir):
        st = os.lstat(claims_dir / name)
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o600), name
    # the guest's own uid (any non-root uid) cannot create or alter a claim
    uid = _uid(record)
    for cmd in (["touch", str(claims_dir / f"uid-{BASE + 7}")],
                ["sh", "-c", f"echo x > {claims_dir}/uid-{uid}"],
                ["ls", str(claims_dir)]):
        proc = subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={uid}",
                               "--clear-groups", *cmd], capture_output=True, check=False)
        assert proc.returncode != 0, cmd
    assert not (claims_dir / f"uid-{BASE + 7}").exists()
    reg.release(record)
    # loosened by someone: put back to 0700; owned by another uid: refused
    claims_dir.chmod(0o777)
    with HostClaims(claims_dir).locked():
        pass
    assert stat.S_IMODE(claims_dir.stat().st_mode) == 0o700
    os.chown(claims_dir, 65534, 65534)
    with pytest.raises(StateError, match="not a directory of this user's"):
        reg.reserve(_spec("g2", kernel), [DacDriver()])
    # a symlink at the directory's own path is not followed
    os.chown(claims_dir, 0, 0)
    moved = claims_dir.with_name("elsewhere")
    claims_dir.rename(moved)
    claims_dir.symlink_to(moved)
    with pytest.raises(StateError, match="cannot open the host claims directory"):
        reg.reserve(_spec("g3", kernel), [DacDriver()])


def test_default_claims_dir_is_host_wide(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SVIRT_CLAIMS_DIR", raising=False)
    assert HostClaims().directory == Path("/run/svirt-claims")
    assert Registry(Path("/nonexistent/run")).claims.directory == Path("/run/svirt-claims")


@pytest.fixture
def second_registry(tmp_path: Path) -> Iterator[Registry]:
    """Registry B: private directories, the host's default claims."""
    reg = _registry(tmp_path / "b", None)
    yield reg
    for record in reg.records():
        reg.release(record)


def test_a_real_guest_and_another_registry_never_share_its_uid(
        launch_guest: object, tiny_uml: TinyGuest, second_registry: Registry,
        kernel: Path) -> None:
    """A UML guest through launch in registry A (the test's), reservations in
    registry B: B never gets the guest's uid, not even when B's scan starts
    at the guest's slot and B reserves before A's hypervisor runs."""
    start = launch_guest  # the launch_guest fixture: a factory
    assert callable(start)
    guest: Guest = start(tiny_spec(tiny_uml, "claims-real", Backend.UML))
    uid = _uid(guest.record)
    assert f"uid-{uid}" in guest.record.claims
    with second_registry.claims.locked() as host:
        host.set_hint(f"uid-{BASE}", guest.record.slot)
    got = [second_registry.reserve(_spec(f"b{i}", kernel), [DacDriver()]) for i in range(10)]
    assert uid not in {_uid(r) for r in got}
    for r in got:
        second_registry.release(r)


def test_reserved_but_not_yet_running_uid_is_not_given_to_another_registry(
        tmp_path: Path, kernel: Path, second_registry: Registry) -> None:
    """The window between reserve and exec, with the host's default claims:
    no process runs as A's uid yet, only its claim protects it."""
    a = _registry(tmp_path / "a", None)
    record = a.reserve(_spec("a0", kernel), [DacDriver()])
    try:
        uid = _uid(record)
        with a.claims.locked() as host:
            host.set_hint(f"uid-{BASE}", record.slot)
        other = second_registry.reserve(_spec("b0", kernel), [DacDriver()])
        assert _uid(other) != uid
    finally:
        a.release(record)
    assert not (a.claims.directory / f"uid-{uid}").exists()


def test_reserve_and_release_stay_fast_with_10k_claims(
        tmp_path: Path, claims_dir: Path, kernel: Path) -> None:
    """10,000 claims of other guests (held: their launcher, this process,
    still runs): reserve + release of one more guest.  The scan starts at
    the hint; rewound to 0 it stats every claimed slot (reads only 8)."""
    with HostClaims(claims_dir).locked():
        pass
    me = Owner(state=str(tmp_path / "other"), name="x", uuid="u", created=1.0, pid=os.getpid(),
               start=start_time(os.getpid()) or 0, boot=boot_id())
    (tmp_path / "other").mkdir()
    for i in range(10_000):
        key = f"uid-{BASE + i}"
        data = {"key": key, "owner": {**me.to_json(), "name": f"x{i}"}, "space": f"uid-{BASE}",
                "slot": i}
        (claims_dir / key).write_text(json.dumps(data))
    reg = _registry(tmp_path / "r", claims_dir)
    timings = {}
    for hint in (10_000, 0):
        costs = []
        for i in range(20):
            with HostClaims(claims_dir).locked() as host:
                host.set_hint(f"uid-{BASE}", hint)
            t = time.perf_counter()
            record = reg.reserve(_spec(f"g{i}", kernel), [DacDriver()])
            reg.release(record)
            costs.append(time.perf_counter() - t)
            assert record.slot == 10_000
        timings[hint] = sorted(costs)[len(costs) // 2]
    # the part the claims add, alone (the registry's own reconcile aside)
    owner = Owner(state=str(reg.state), name="y", uuid="v", created=2.0, pid=os.getpid(),
                  start=me.start, boot=me.boot)
    t = time.perf_counter()
    for _ in range(100):
        with HostClaims(claims_dir).locked() as host:
            slot = host.hint(f"uid-{BASE}")
            assert not host.exists(f"uid-{BASE + slot}")
            host.claim([f"uid-{BASE + slot}"], owner, space=f"uid-{BASE}", slot=slot)
            host.set_hint(f"uid-{BASE}", slot + 1)
        with HostClaims(claims_dir).locked() as host:
            host.release([f"uid-{BASE + slot}"], owner)
    claims_only = (time.perf_counter() - t) / 100
    print(f"reserve+release with 10k claims: {timings[10_000] * 1000:.1f} ms (hint), "
          f"{timings[0] * 1000:.1f} ms (hint rewound); claims alone {claims_only * 1000:.2f} ms")
    assert claims_only < 0.005
    assert timings[10_000] < 0.1 and timings[0] < 0.2  # generous: two shared cores


def test_a_smack_and_dac_stack_claims_both_and_keeps_its_hint(
        tmp_path: Path, claims_dir: Path, kernel: Path) -> None:
    from svirt.security.smack import SmackDriver

    reg = _registry(tmp_path / "r", claims_dir)
    first = reg.reserve(_spec("g0", kernel), [SmackDriver(), DacDriver()])
    second = reg.reserve(_spec("g1", kernel), [SmackDriver(), DacDriver()])
    assert first.claims == [f"smack-svirt-{first.slot}", f"uid-{BASE + first.slot}"]
    space = f"smack-svirt-0_uid-{BASE}"
    with HostClaims(claims_dir).locked() as host:
        assert host.hint(space) == second.slot + 1
    reg.release(first)
    with HostClaims(claims_dir).locked() as host:
        assert host.hint(space) == first.slot  # a release below lowers it
    reg.release(second)
    assert sorted(os.listdir(claims_dir)) == ["hint." + space, "lock"]
