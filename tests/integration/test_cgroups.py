"""Each guest in its own cgroup (v1 hierarchies here, v2 in the lab): real
cgroups, real UML guests, a real fork bomb and a stand-in that eats memory."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from svirt.images.build import TinyGuest
from svirt.launcher import cgroupfs, cgroups
from svirt.launcher.launch import Guest, launch
from svirt.launcher.registry import Registry
from svirt.launcher.supervisor import OutcomeKind
from svirt.spec import Backend, GuestSpec, Limits
from svirt.testing import tiny_spec

from .helpers import pids_of_uid, svirt_cli, wait_for, write_spec

ROOT = Path(__file__).resolve().parents[2]
MIB = 1024 * 1024


@pytest.fixture(autouse=True)
def _needs_cgroups() -> None:
    if cgroupfs.detect() is None:
        pytest.skip("no cgroup hierarchy with memory and pids here")


def _layout() -> cgroupfs.Layout:
    layout = cgroupfs.detect()
    assert layout is not None
    return layout


def _read(path: Path) -> str:
    return path.read_text().strip()


def _cgroup_paths(pid: int) -> dict[str, str]:
    """controller -> cgroup path of a process ("" for the v2 hierarchy)."""
    out = {}
    with open(f"/proc/{pid}/cgroup", encoding="ascii") as f:
        for line in f:
            _id, controllers, path = line.rstrip("\n").split(":", 2)
            for c in controllers.split(",") if controllers else [""]:
                out[c] = path
    return out


def _in_cgroup(pid: int, leaf: str) -> bool:
    paths = _cgroup_paths(pid)
    want = f"/{cgroupfs.PARENT}/{leaf}"
    if _layout().version == 2:
        return paths.get("") == want
    return paths.get("memory") == want and paths.get("pids") == want


def _fork_bomb_cmdline() -> str:
    """A UML /init (busybox sh, straight from rdinit=) that forks for ever.
    No word may start with '-' (UML host options): ${IFS} joins them."""
    script = ("mount -t devtmpfs d /dev; exec >/dev/console 2>&1; echo SVIRT-READY; "
              "while true; do sleep 1000 & echo FORKED; done").replace(" -", "${IFS}-")
    return f'rdinit=/bin/sh "-c" "{script}"'


HOG = """#!/usr/bin/python3 -I
import os, sys
fd = 1
for a in sys.argv[1:]:
    if a.startswith("con0=fd:"):
        fd = int(a[8:].split(",")[0])
os.write(fd, b"SVIRT-READY\\n")
chunks = []
while True:
    chunks.append(b"x" * (16 << 20))  # written, so resident
    os.write(fd, b"HOG %d MiB\\n" % (16 * len(chunks)))
"""


@pytest.fixture
def hog(image_dir: Path) -> Path:
    """A stand-in UML kernel that allocates memory until something stops it."""
    kernel = image_dir / "linux-hog"
    kernel.write_text(HOG)
    kernel.chmod(0o755)
    return kernel


@pytest.fixture
def leftovers() -> Iterator[list[Path]]:
    """cgroup directories a test made by hand: removed afterwards."""
    made: list[Path] = []
    yield made
    for path in made:
        try:
            path.rmdir()
        except OSError:
            pass


def test_uml_guest_and_its_helpers_run_in_its_cgroup_with_its_limits(
    tiny_uml: TinyGuest, launch_guest: Callable[..., Guest], registry: Registry
) -> None:
    spec = tiny_spec(tiny_uml, "cg-limits", Backend.UML,
                     limits=Limits(pids=100, cpu_weight=200))
    guest = launch_guest(spec)
    guest.console.expect_line("SVIRT-READY", timeout=90)
    cg = guest.cgroup
    assert cg is not None
    tag = cgroupfs.registry_tag(registry.state)
    assert cg.leaf == f"cg-limits.{guest.record.slot}.{tag}"
    # the record journals it, so a crash of this launcher still removes it
    assert cg.journal_entry() in guest.record.journal
    uid = guest.guest_uid
    assert uid is not None
    procs = pids_of_uid(uid)
    assert guest.pid in procs and len(procs) >= 2  # UML forks helper processes
    tasks = cg.tasks()
    for pid in procs:
        try:
            assert _in_cgroup(pid, cg.leaf), (pid, _cgroup_paths(pid))
        except FileNotFoundError:
            continue  # a short-lived UML helper, gone meanwhile
        assert pid in tasks or not os.path.exists(f"/proc/{pid}")
    # RAM + overhead + the storage mount's tmpfs, whose pages the guest pays for
    assert guest.storage is not None
    assert cg.memory_max == (128 + cgroups.OVERHEAD_MIB["uml"] + guest.storage.size_mib) * MIB
    if cg.version == 2:
        assert int(_read(cg.dirs["memory"] / "memory.max")) == cg.memory_max
        assert _read(cg.dirs["pids"] / "pids.max") == "100"
        assert _read(cg.dirs["cpu"] / "cpu.weight") == "200"
    else:
        assert int(_read(cg.dirs["memory"] / "memory.limit_in_bytes")) == cg.memory_max
        assert _read(cg.dirs["pids"] / "pids.max") == "100"
        assert _read(cg.dirs["cpu"] / "cpu.shares") == "2048"
    usage = cg.usage()
    assert usage["memory"] > 1 * MIB and usage["cpu_ns"] > 0 and usage["pids"] >= 2
    listed = svirt_cli("list", "--usage")
    assert listed.returncode == 0, listed.stderr
    assert "MEM" in listed.stdout.splitlines()[0]
    line = next(x for x in listed.stdout.splitlines() if x.startswith("cg-limits"))
    assert line.split()[5].endswith("M") and line.split()[6].endswith("s"), line
    data = json.loads(svirt_cli("list", "--json", "--usage").stdout)
    assert data[0]["usage"]["memory"] > 0
    assert guest.stop().kind is OutcomeKind.POWEROFF


def test_default_pids_and_removed_after_stop(
    tiny_uml: TinyGuest, registry: Registry
) -> None:
    with launch(tiny_spec(tiny_uml, "cg-stop", Backend.UML), registry=registry) as guest:
        guest.console.expect_line("SVIRT-READY", timeout=90)
        assert guest.cgroup is not None
        paths = guest.cgroup.paths
        assert all(p.is_dir() for p in paths)
        assert _read(guest.cgroup.dirs["pids"] / "pids.max") == str(cgroups.DEFAULT_PIDS["uml"])
        guest.stop()
    assert not any(p.exists() for p in paths)
    assert registry.records() == []


def test_removed_after_sigkill_of_the_hypervisor(
    tiny_uml: TinyGuest, registry: Registry
) -> None:
    with launch(tiny_spec(tiny_uml, "cg-kill", Backend.UML), registry=registry) as guest:
        guest.console.expect_line("SVIRT-READY", timeout=90)
        assert guest.cgroup is not None
        paths = guest.cgroup.paths
        os.kill(guest.pid, signal.SIGKILL)
        outcome = guest.wait(10)
        assert outcome is not None and outcome.kind is OutcomeKind.CRASH
    assert not any(p.exists() for p in paths)
    assert registry.records() == []


def test_removed_after_sigkill_of_the_launcher_and_gc(
    tiny_uml: TinyGuest, image_dir: Path, run_root: Path
) -> None:
    spec = write_spec(image_dir / "k.toml", "cg-launcher", "uml", tiny_uml)
    proc = subprocess.Popen([sys.executable, "-m", "tests.integration.launcher_proc", str(spec)],
                            cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    info = json.loads(proc.stdout.readline())
    registry = Registry(run_root)
    leaf = cgroupfs.leaf_name("cg-launcher", info["slot"], cgroupfs.registry_tag(registry.state))
    layout = _layout()
    paths = [base / leaf for base in {layout.base(c) for c in ("memory", "pids")} if base]
    try:
        assert all(p.is_dir() for p in paths)
        assert _in_cgroup(info["pid"], leaf)
    finally:
        proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    proc.stdout.close()
    assert wait_for(lambda: not os.path.exists(f"/proc/{info['pid']}"), 5)
    assert all(p.is_dir() for p in paths)  # left for gc, with the record
    gc = svirt_cli("gc")
    assert gc.returncode == 0, gc.stdout + gc.stderr
    assert "released guest cg-launcher" in gc.stdout
    assert not any(p.exists() for p in paths)
    assert registry.records() == []


def test_gc_sweeps_only_its_own_empty_leftovers(
    registry: Registry, leftovers: list[Path]
) -> None:
    tag = cgroupfs.registry_tag(registry.state)
    layout = _layout()
    bases = [b for b in layout.bases() if b.parent in (layout.mounts["memory"],
                                                          layout.mounts["pids"])]
    for base in bases:
        base.mkdir(exist_ok=True)
    mine = [b / cgroupfs.leaf_name("lost", 7, tag) for b in bases]
    other = [b / cgroupfs.leaf_name("lost", 7, "0badf00d") for b in bases]
    busy = [b / cgroupfs.leaf_name("busy", 8, tag) for b in bases]
    for p in mine + other + busy:
        p.mkdir()
        leftovers.append(p)
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        for p in busy:
            (p / "cgroup.procs").write_text(str(sleeper.pid))
        done = dict(registry.reconcile())
        report = done.get("(cgroups no record holds)", [])
        assert not any(p.exists() for p in mine), report
        assert all(p.exists() for p in other)  # another registry's
        assert all(p.exists() for p in busy)  # it has a process: left alone, said so
        assert any("has processes" in line for line in report), report
    finally:
        sleeper.kill()
        sleeper.wait()
    assert wait_for(lambda: not cgroupfs.tasks_of(busy), 5)
    registry.reconcile()
    assert not any(p.exists() for p in busy)


def test_release_with_a_process_left_in_the_cgroup_is_restore_failed(
    tiny_uml: TinyGuest, registry: Registry
) -> None:
    """A cgroup that does not empty keeps the record (restore-failed) for gc."""
    sleeper = subprocess.Popen(["sleep", "60"])  # root's: not a guest leftover
    try:
        with pytest.raises(Exception, match="still has processes"):
            with launch(tiny_spec(tiny_uml, "cg-stuck", Backend.UML),
                        registry=registry) as guest:
                guest.console.expect_line("SVIRT-READY", timeout=90)
                assert guest.cgroup is not None
                paths = guest.cgroup.paths
                (guest.cgroup.dirs["pids"] / "cgroup.procs").write_text(str(sleeper.pid))
                guest.stop()
        [record] = registry.records()
        assert record.restore_failed and "still has processes" in record.status
    finally:
        sleeper.kill()
        sleeper.wait()
    # this process (its supervisor) is alive, so gc would wait for it: retry by hand
    registry.release(record)
    assert registry.records() == []
    assert not any(p.exists() for p in paths)


def test_fork_bomb_in_a_uml_guest_stops_at_pids_max(
    tiny_uml: TinyGuest, launch_guest: Callable[..., Guest]
) -> None:
    spec = GuestSpec(name="cg-forkbomb", backend=Backend.UML, kernel=tiny_uml.kernel,
                     initrd=tiny_uml.initrd, memory=128, cmdline=_fork_bomb_cmdline(),
                     shutdown_timeout=5, limits=Limits(pids=32))
    guest = launch_guest(spec)
    guest.console.expect_line("SVIRT-READY", timeout=90)
    cg = guest.cgroup
    assert cg is not None
    pids = cg.dirs["pids"]

    def limited() -> bool:
        events = dict(line.split() for line in _read(pids / "pids.events").splitlines())
        return int(events.get("max", 0)) > 0

    assert wait_for(limited, 60), guest.console.tail(2000)
    for _ in range(20):  # it keeps trying; the count never passes the limit
        assert int(_read(pids / "pids.current")) <= 32
        assert len(cg.tasks()) <= 32
        time.sleep(0.1)
    assert guest.console.text().count("FORKED") < 64
    guest.stop()  # the launcher still stops it, and the release removes the cgroup


def test_memory_hog_is_stopped_at_memory_max(hog: Path, registry: Registry) -> None:
    spec = GuestSpec(name="cg-hog", backend=Backend.UML, kernel=hog, memory=16,
                     shutdown_timeout=5)
    limit = (16 + cgroups.OVERHEAD_MIB["uml"]) * MIB
    with launch(spec, registry=registry) as guest:
        guest.console.expect_line("SVIRT-READY", timeout=30)
        assert guest.storage is not None  # its tmpfs pages count, so its size is added
        limit += guest.storage.size_mib * MIB
        assert guest.cgroup is not None and guest.cgroup.memory_max == limit
        outcome = guest.wait(60)
        assert outcome is not None and outcome.kind is OutcomeKind.CRASH, outcome
        assert outcome.signal == signal.SIGKILL  # the OOM killer, inside the cgroup
        usage = guest.cgroup.usage()
        assert usage["memory_peak"] <= limit
        mem = guest.cgroup.dirs["memory"]
        if guest.cgroup.version == 2:
            events = dict(x.split() for x in _read(mem / "memory.events").splitlines())
            assert int(events["oom_kill"]) >= 1
        else:
            oom = dict(x.split() for x in _read(mem / "memory.oom_control").splitlines())
            assert int(oom["oom_kill"]) >= 1
        allocated = [int(x.split()[1]) for x in guest.console.text().splitlines()
                     if x.startswith("HOG ")]
        assert allocated and max(allocated) * MIB <= limit
