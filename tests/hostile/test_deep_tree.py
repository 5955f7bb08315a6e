"""Attack: the guest fills its home with a tree built to break the remover.

A recursive remover dies of RecursionError on ~1,000 nested directories, and
every reconcile (every launch, ``list``, ``gc``, the supervisor's adoption)
died with it.  ``safefs.remove_tree`` is iterative: these tests build trees
100,000 directories deep and wide as a real guest uid, remove them with few
fds and a tiny recursion limit, and race it with guest processes that keep
building, renaming and swapping directories for symlinks to canaries while
root removes.  Then the same through the real launch path: a stand-in UML
guest builds the tree in its own home.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from svirt.errors import StateError
from svirt.host import HostInfo
from svirt.launcher.launch import launch
from svirt.launcher.registry import Registry
from svirt.safefs import remove_tree

from .helpers import (
    PYTHON,
    ROOT,
    SVIRT,
    Canaries,
    build_spec,
    kill_uid,
    pids_of_uid,
    read_info,
    run_as,
    snapshot_tree,
    spec_dict,
    wait_for,
)

GUEST = 2_900_000  # a guest uid of these tests alone, outside every DAC range (safefs level)


# ----------------------------------------------------------------- helpers
@pytest.fixture
def layout() -> Iterator[tuple[Path, Path, Path]]:
    """The registry's shape on a tmpfs: BASE (root, 0755) / g.d (root, 0755) /
    home (the guest's, 0700); and a canary directory next to BASE."""
    base = Path(tempfile.mkdtemp(prefix="svirt-tree-", dir="/dev/shm"))
    base.chmod(0o755)
    canary = Path(tempfile.mkdtemp(prefix="svirt-tree-canary-", dir="/dev/shm"))
    canary.chmod(0o755)
    (canary / "secret").write_text("root's\n")
    (canary / "sub").mkdir()
    (canary / "sub" / "inner").write_text("deep\n")
    _make_home(base)
    yield base, base / "g.d", canary
    kill_uid(GUEST)
    with contextlib.suppress(BaseException):
        fd = os.open(base.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            remove_tree(fd, base.name)
        finally:
            os.close(fd)
    subprocess.run(["rm", "-rf", "--one-file-system", str(canary)], check=False)


def _make_home(base: Path) -> None:
    top = base / "g.d"
    top.mkdir(mode=0o755, exist_ok=True)
    home = top / "home"
    with contextlib.suppress(FileExistsError):
        home.mkdir(mode=0o700)
        os.chown(home, GUEST, GUEST)


def _as_guest(fn: Callable[..., Any], *args: Any) -> int:
    """Run ``fn(*args)`` in a child that is really the guest uid, in the
    background; its pid."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            os.setgroups([])
            os.setresgid(GUEST, GUEST, GUEST)
            os.setresuid(GUEST, GUEST, GUEST)
            fn(*args)
        finally:
            os._exit(0)
    return pid


def build_tree(home: str, depth: int, wide: int, targets: list[str]) -> None:
    """As the guest: one chain ``depth`` deep (a file every 100 levels, a
    symlink to a canary every 1,000), ``wide`` directories side by side, a
    FIFO and a socket."""
    os.chdir(home)
    os.mkdir("w")
    for i in range(wide):
        os.mkdir(f"w/{i}")
        os.close(os.open(f"w/{i}/f", os.O_WRONLY | os.O_CREAT, 0o600))
    os.mkfifo("fifo")
    socket.socket(socket.AF_UNIX).bind("sock")
    for i in range(depth):
        os.mkdir("d")
        os.chdir("d")
        if i % 100 == 0:
            os.close(os.open("f", os.O_WRONLY | os.O_CREAT, 0o600))
        if i % 1000 == 0:
            os.symlink(targets[i // 1000 % len(targets)], "link")


REMOVE_BOUNDED = """
import os, resource, sys, time
from svirt.safefs import remove_tree
resource.setrlimit(resource.RLIMIT_NOFILE, (12, 12))  # 0-2, the parent fd, ours
sys.setrecursionlimit(30)  # a recursive remover needs one frame per level
fd = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECTORY)
started = time.monotonic()
n = remove_tree(fd, sys.argv[2])
print(n, round(time.monotonic() - started, 2))
"""


def _tree_canaries(canary: Path) -> dict[str, Any]:
    return snapshot_tree(canary)


# ------------------------------------------------------------ safefs level
def test_remove_tree_takes_deep_and_wide_trees_with_bounded_fds(
        layout: tuple[Path, Path, Path]) -> None:
    base, top, canary = layout
    before = _tree_canaries(canary)
    targets = [str(canary), str(canary / "secret"), str(canary / "sub")]
    started = time.monotonic()
    error = run_as(GUEST, GUEST, build_tree, str(top / "home"), 100_000, 20_000, targets)
    assert not error, error
    built = time.monotonic() - started
    out = subprocess.run([PYTHON, "-c", REMOVE_BOUNDED, str(base), "g.d"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    removed, seconds = out.stdout.split()
    assert not top.exists() and os.listdir(base) == []
    # 100,000 + 20,000 directories, 1,000 + 20,000 files, 100 links, fifo, socket
    assert int(removed) >= 141_000, out.stdout
    assert _tree_canaries(canary) == before
    print(f"deep 100,000 + wide 20,000: built {built:.1f} s, removed {removed} entries in "
          f"{seconds} s (RLIMIT_NOFILE 12, recursion limit 30)")


def _builder(home: str, deadline: float, seed: int) -> None:
    """Nest directories as fast as it can, chains of up to 5,000, each from
    the home again (or from where it was, when root pulled that away)."""
    rnd = random.Random(seed)  # noqa: S311 - fuzzing
    while time.monotonic() < deadline:
        try:
            os.chdir(home)
            for n in range(rnd.randrange(50, 5000)):
                os.mkdir("d")
                os.chdir("d")
                if n % 10 == 0:
                    os.close(os.open(f"f{n}", os.O_WRONLY | os.O_CREAT, 0o600))
        except OSError:
            time.sleep(0.001)


def _shuffler(top: str, targets: list[str], seed: int, deadline: float) -> None:
    """Rename directories around (deep ones up, shallow ones down), swap
    directories for symlinks to canaries, plant links and files, anywhere
    below the top it can write (root's renamed-up directories included)."""
    rnd = random.Random(seed)  # noqa: S311 - fuzzing
    n = 0
    while time.monotonic() < deadline:
        n += 1
        try:
            start = os.path.join(top, rnd.choice(os.listdir(top)))
            path = start
            for _ in range(rnd.randrange(1, 40)):
                names = os.listdir(path)
                if not names:
                    break
                nxt = os.path.join(path, rnd.choice(names))
                if os.path.islink(nxt) or not os.path.isdir(nxt):
                    break
                path = nxt
            if path == start:
                os.symlink(rnd.choice(targets), os.path.join(path, f"l{n}"))
                continue
            action = rnd.randrange(5)
            if action == 0:  # a deep directory up to where root already was
                os.rename(path, os.path.join(start, f"up{n}"))
            elif action == 1:  # a directory for a symlink to a canary
                os.rename(path, f"{path}.{n}")
                os.symlink(rnd.choice(targets), path)
            elif action == 2:  # files and links where root is reading
                for i in range(20):
                    os.close(os.open(os.path.join(path, f"x{n}.{i}"),
                                     os.O_WRONLY | os.O_CREAT, 0o600))
                os.symlink(rnd.choice(targets), os.path.join(path, f"l{n}"))
            elif action == 3:  # a shallow directory down into a deep one
                os.rename(start, os.path.join(path, f"down{n}"))
            else:  # a new subtree
                os.makedirs(os.path.join(path, f"n{n}", "a", "b", "c"))
        except (OSError, IndexError):
            pass


def test_remove_tree_races_a_guest_that_keeps_writing(
        layout: tuple[Path, Path, Path]) -> None:
    base, top, canary = layout
    before = _tree_canaries(canary)
    targets = [str(canary), str(canary / "secret"), str(canary / "sub"), "/etc",
               "/etc/passwd", str(base)]
    base_fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY)
    fds = sorted(os.listdir("/proc/self/fd"))
    deadline = time.monotonic() + 6
    attackers = [_as_guest(_builder, str(top / "home"), deadline + 1, seed)
                 for seed in range(2)]
    attackers += [_as_guest(_shuffler, str(top), targets, seed, deadline + 1)
                  for seed in range(3)]
    rounds = completed = gave_up = 0
    try:
        while time.monotonic() < deadline:
            _make_home(base)
            time.sleep(0.15)  # the guest builds; then root removes while it goes on
            try:
                remove_tree(base_fd, "g.d", max_entries=100_000)
                completed += 1
                assert not top.exists(), "remove_tree returned with the top still there"
            except StateError as err:
                assert "not empty after" in err.message, err.message
                gave_up += 1
            rounds += 1
        for pid in attackers:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        assert wait_for(lambda: not pids_of_uid(GUEST), 5)
        remove_tree(base_fd, "g.d")  # the writers are gone: it finishes
        assert os.listdir(base) == []
        assert sorted(os.listdir("/proc/self/fd")) == fds, "remove_tree leaked an fd"
    finally:
        for pid in attackers:
            with contextlib.suppress(ChildProcessError, ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
        os.close(base_fd)
    assert _tree_canaries(canary) == before
    assert completed >= 1, f"{rounds} rounds, none finished while the guest wrote"
    print(f"race: {rounds} rounds, {completed} finished, {gave_up} gave up at the bound")


def test_remove_tree_never_crosses_a_mount_point(layout: tuple[Path, Path, Path]) -> None:
    """A bind mount of the same filesystem (same st_dev) below the tree: the
    walk refuses to cross it, and what it shows is untouched."""
    base, top, canary = layout
    before = _tree_canaries(canary)
    assert not run_as(GUEST, GUEST, os.makedirs, str(top / "home/a/b/mnt"))
    mnt = top / "home/a/b/mnt"
    subprocess.run(["mount", "--bind", str(canary), str(mnt)], check=True)
    try:
        base_fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY)
        try:
            with pytest.raises(StateError, match="mount point"):
                remove_tree(base_fd, "g.d")
        finally:
            os.close(base_fd)
        assert _tree_canaries(canary) == before
        mounted = next(top.rglob("mnt"))
        assert subprocess.run(["mountpoint", "-q", str(mounted)], check=False).returncode == 0
    finally:
        for path in [mnt, *top.rglob("mnt")]:
            subprocess.run(["umount", str(path)], check=False, capture_output=True)
    assert _tree_canaries(canary) == before


# ------------------------------------------------------- the real launch path
@pytest.fixture(autouse=True)
def _private_uids(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Guest uids of this file alone (after ``dirs`` set the hostile range):
    another suite's ``svirt gc`` running meanwhile must not take these
    guests for its orphans, nor ours its."""
    if "dirs" in request.fixturenames:
        request.getfixturevalue("dirs")
        monkeypatch.setenv("SVIRT_UID_BASE", "2800000")


def _tree_spec(standin: Path, name: str, depth: int, variant: int = 0) -> dict[str, Any]:
    spec = spec_dict(standin, name, "tree", variant)
    spec["cmdline"] += f" depth={depth}"
    return spec


def test_a_deep_tree_in_a_uml_home_is_released(
        standin: Path, hostile_registry: Registry, canaries: Canaries, host: HostInfo,
        guest_uids: set[int]) -> None:
    canaries.baseline()
    for variant, depth in ((0, 20_000), (1, 5_000)):
        name = f"tree{variant}"
        with launch(build_spec(_tree_spec(standin, name, depth, variant)),
                    registry=hostile_registry, host=host) as guest:
            info = read_info(guest, timeout=60)
            guest_uids.add(info["uid"])
            run_dir = hostile_registry.run_dir(name)
            assert (run_dir / "home" / "tree").is_dir()
            started = time.monotonic()
        # the context's release ran: no exception, nothing left
        print(f"variant {variant} depth {depth}: stop + release "
              f"{time.monotonic() - started:.1f} s")
        assert not run_dir.exists()
        assert hostile_registry.records() == []
        assert not pids_of_uid(info["uid"])
    assert canaries.changes() == []


def test_a_deep_tree_stops_neither_list_nor_gc_nor_other_guests(
        standin: Path, dirs: tuple[Path, Path], hostile_registry: Registry, host: HostInfo,
        guest_uids: set[int]) -> None:
    """Guest A's launcher dies with a deep tree in A's home; guest B runs.
    ``svirt list``, ``svirt gc`` and a new launch all work; A is released."""
    import json

    spec_file = dirs[0] / "spec-a.json"
    spec_file.write_text(json.dumps(_tree_spec(standin, "tree-a", 5_000)))
    proc = subprocess.Popen([PYTHON, "-m", "tests.hostile.driver", str(spec_file), "--hold"],
                            cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line, "the launcher died before its guest was up"
        msg = json.loads(line)
        guest_uids.add(msg["info"]["uid"])
    finally:
        proc.kill()
        proc.wait(10)
    assert wait_for(lambda: not os.path.exists(f"/proc/{msg['pid']}"), 5)
    with launch(build_spec(spec_dict(standin, "tree-b")), registry=hostile_registry,
                host=host) as b:
        guest_uids.add(read_info(b)["uid"])
        listed = subprocess.run([SVIRT, "list", "--json"], capture_output=True, text=True,
                                timeout=120, check=False)
        assert listed.returncode == 0 and "Traceback" not in listed.stderr, listed.stderr
        assert [g["name"] for g in json.loads(listed.stdout)] == ["tree-b"]
        assert not hostile_registry.run_dir("tree-a").exists()  # list released A
        with launch(build_spec(spec_dict(standin, "tree-c")), registry=hostile_registry,
                    host=host) as c:
            guest_uids.add(read_info(c)["uid"])
        gc = subprocess.run([SVIRT, "gc"], capture_output=True, text=True, timeout=120,
                            check=False)
        assert gc.returncode == 0 and "Traceback" not in gc.stderr, gc
        assert b.running
    assert hostile_registry.records() == []


def test_stop_of_a_detached_guest_with_a_deep_tree_ends(
        standin: Path, dirs: tuple[Path, Path], hostile_registry: Registry,
        guest_uids: set[int]) -> None:
    """svirt start, then svirt stop: the supervisor's release of the deep
    tree ends, and so does the stop (it waited forever)."""
    spec = dirs[0] / "tree.toml"
    spec.write_text(f'name = "tree-d"\nbackend = "uml"\nkernel = "{standin}"\nmemory = 32\n'
                    'cmdline = "attack=tree variant=2 depth=5000"\nshutdown_timeout = 15\n')
    from svirt.service.client import supervisor_pid

    try:
        out = subprocess.run([SVIRT, "start", str(spec), "--wait-for", "HOSTILE"],
                             capture_output=True, text=True, timeout=120, check=False)
        assert out.returncode == 0, out.stderr
        record = next(r for r in hostile_registry.records() if r.name == "tree-d")
        dac = record.labels["dac"]
        guest_uids.add(int(dac.process.split(":")[0]))
        started = time.monotonic()
        out = subprocess.run([SVIRT, "stop", "tree-d"], capture_output=True, text=True,
                             timeout=120, check=False)
        assert out.returncode == 0, out.stderr
        print(f"svirt stop of a detached guest with a tree: {time.monotonic() - started:.1f} s")
        assert wait_for(lambda: hostile_registry.records() == [], 10)
        assert not hostile_registry.run_dir("tree-d").exists()
        listed = subprocess.run([SVIRT, "list"], capture_output=True, text=True, timeout=60,
                                check=False)
        assert listed.returncode == 0 and "Traceback" not in listed.stderr, listed.stderr
    finally:
        pid = supervisor_pid(hostile_registry)
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
        for r in hostile_registry.records():  # a failed test: leave nothing running
            if "dac" in r.labels:
                kill_uid(int(r.labels["dac"].process.split(":")[0]))
        hostile_registry.reconcile()


def test_guests_with_deep_trees_are_adopted_and_stopped(
        standin: Path, dirs: tuple[Path, Path], hostile_registry: Registry,
        guest_uids: set[int]) -> None:
    """The supervisor is SIGKILLed; one detached guest dies meanwhile, the
    other runs on, both with deep trees.  The next command's supervisor
    adopts the live one (the dead one released) and its stop ends."""
    from svirt.service.client import supervisor_pid

    uids = {}
    try:
        for name in ("adopt-a", "adopt-b"):
            spec = dirs[0] / f"{name}.toml"
            spec.write_text(f'name = "{name}"\nbackend = "uml"\nkernel = "{standin}"\n'
                            'memory = 32\ncmdline = "attack=tree variant=0 depth=5000"\n'
                            'shutdown_timeout = 15\n')
            out = subprocess.run([SVIRT, "start", str(spec), "--wait-for", "HOSTILE"],
                                 capture_output=True, text=True, timeout=120, check=False)
            assert out.returncode == 0, out.stderr
            record = next(r for r in hostile_registry.records() if r.name == name)
            uids[name] = int(record.labels["dac"].process.split(":")[0])
            guest_uids.add(uids[name])
        daemon = supervisor_pid(hostile_registry)
        assert daemon is not None
        os.kill(daemon, signal.SIGKILL)
        assert wait_for(lambda: not os.path.exists(f"/proc/{daemon}/stat")
                        or open(f"/proc/{daemon}/stat").read().split(") ")[1][0] == "Z", 10)
        kill_uid(uids["adopt-b"])  # b's hypervisor dies while nobody supervises it
        out = subprocess.run([SVIRT, "status", "--json"], capture_output=True, text=True,
                             timeout=120, check=False)
        assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr
        names = {r.name for r in hostile_registry.records()}
        assert names == {"adopt-a"}, (names, out.stdout, [
            (p.name, p.read_text()[-600:]) for d in ("services", "logs", "supervised")
            if (dirs[1] / d).is_dir() for p in (dirs[1] / d).iterdir()])
        assert not hostile_registry.run_dir("adopt-b").exists()
        new = supervisor_pid(hostile_registry)
        assert new is not None and new != daemon
        out = subprocess.run([SVIRT, "stop", "adopt-a"], capture_output=True, text=True,
                             timeout=120, check=False)
        assert out.returncode == 0, out.stderr
        assert wait_for(lambda: hostile_registry.records() == [], 10)
        assert not hostile_registry.run_dir("adopt-a").exists()
    finally:
        pid = supervisor_pid(hostile_registry)
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
        for uid in uids.values():
            kill_uid(uid)
        hostile_registry.reconcile()
