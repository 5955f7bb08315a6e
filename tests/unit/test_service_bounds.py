"""The supervisor's own bookkeeping under attack, without a guest: a console
log whose rotation fails never keeps a closed fd number (so it can never
close or write into what the process opens next), and every history the
supervisor keeps per guest has a cap."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from svirt.service.entry import MAX_RESTART_TIMES, MAX_RUNS, Entry
from svirt.service.entry import carry as _carry
from svirt.service.logs import Fd, RotatingLog, follow, log_path
from svirt.service.notes import MAX_TEXT, bounded
from svirt.spec import GuestSpec


def _fds() -> dict[int, str]:
    out = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            out[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue  # the listing's own fd
    return out


def _jam(log: RotatingLog) -> Path:
    """Make the next rotation fail: the oldest name is a non-empty directory
    (unlink EISDIR); what a full disk or a taken name does too."""
    jam = log.path.with_name(f"{log.path.name}.{log.keep - 1}")
    jam.mkdir()
    (jam / "x").write_bytes(b"")
    return jam


def test_a_failed_rotation_never_closes_what_reuses_its_number(tmp_path: Path) -> None:
    log = RotatingLog(tmp_path / "g.log", max_bytes=4096, keep=3)
    log.RETRY_SECONDS = 0.0  # every write tries the rotation again
    jam = _jam(log)
    before = _fds()
    log.write(b"a" * 4096)
    with pytest.raises(OSError):
        log.write(b"b" * 100)  # the rotation fails
    # the process goes on opening things: another guest's pidfd, a client socket...
    victims = [os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC) for _ in range(8)]
    try:
        ids = {v: os.fstat(v).st_ino for v in victims}
        for _ in range(5):
            with pytest.raises(OSError):
                log.write(b"c" * 100)
        assert all(os.fstat(v).st_ino == ids[v] for v in victims), "a victim fd was closed"
        assert _fds() == {**before, **{v: "/dev/null" for v in victims}}
        assert (tmp_path / "g.log").read_bytes() == b"a" * 4096  # nothing past the cap
        assert log.dropped == 600
        # the obstacle goes: rotation resumes
        (jam / "x").unlink()
        jam.rmdir()
        log.write(b"d" * 10)
        assert (tmp_path / "g.log").read_bytes() == b"d" * 10
        assert (tmp_path / "g.log.1").read_bytes() == b"a" * 4096
        log.close()
        log.close()  # closed once; the second is nothing
        assert all(os.fstat(v).st_ino == ids[v] for v in victims)
    finally:
        for v in victims:
            os.close(v)
    after = _fds()
    assert set(after) <= set(before)  # the log's own fd is gone, nothing else


def test_a_failed_rotation_waits_before_it_tries_again(tmp_path: Path) -> None:
    log = RotatingLog(tmp_path / "g.log", max_bytes=4096, keep=2)
    _jam(log)
    log.write(b"a" * 4096)
    with pytest.raises(OSError):
        log.write(b"b")
    log.write(b"c" * 1000)  # within RETRY_SECONDS: dropped quietly, no rename tried
    assert log.dropped == 1001
    log.close()


def test_fd_is_closed_once_and_then_refused(tmp_path: Path) -> None:
    fd = Fd(os.open(tmp_path, os.O_RDONLY | os.O_CLOEXEC))
    number = fd.fileno()
    fd.close()
    victim = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
    try:
        assert victim == number  # the number is reused at once...
        fd.close()  # ...and the owner never closes it again
        with pytest.raises(OSError):
            fd.fileno()
        os.fstat(victim)
    finally:
        os.close(victim)


def test_follow_reads_across_rotations(tmp_path: Path) -> None:
    import threading
    import time

    state = tmp_path
    log = RotatingLog(log_path(state, "g"), max_bytes=4096, keep=3)
    log.write(b"old\n")

    def later() -> None:
        time.sleep(0.3)  # follow has started at the end of the file by then
        for _ in range(5):
            log.write(b"x" * 1000)  # crosses a rotation
            time.sleep(0.05)

    writer = threading.Thread(target=later)
    writer.start()
    stream = follow(state, "g", poll=0.01)  # a generator (typed as an Iterator)
    got = b""
    while len(got) < 5000:
        got += next(stream)
    writer.join()
    assert got == b"x" * 5000
    stream.close()  # type: ignore[attr-defined]
    log.close()


def _spec() -> GuestSpec:
    from svirt.spec import Backend

    return GuestSpec(name="g", backend=Backend.UML, kernel=Path("/usr/bin/linux"), memory=64)


def test_run_history_and_texts_are_capped() -> None:
    entry = Entry("g", _spec(), {}, None, 0.0, adopted=False)
    for i in range(5 * MAX_RUNS):
        entry.add_run({"dac": "1000:1000"}, f"crash: run {i} " + "\x1b]52;c;QQ==\x07" * 1000)
    assert len(entry.runs) == MAX_RUNS and entry.runs_total == 5 * MAX_RUNS
    assert entry.runs[-1]["outcome"].startswith(f"crash: run {5 * MAX_RUNS - 1}")
    assert all(len(r["outcome"]) <= MAX_TEXT and "\x1b" not in r["outcome"] for r in entry.runs)
    assert len(entry.last_outcome) <= MAX_TEXT
    assert bounded("a\nb\x1b[6n") == "a\\nb\\x1b[6n"


def test_a_huge_state_file_is_cut_to_the_caps() -> None:
    """A state file from an older svirt (or one that ran for a year)."""
    data = {"restarts": 10 ** 6, "restart_times": [1.0] * 100000,
            "runs": [{"labels": {}, "outcome": "crash"}] * 10000, "runs_total": 10 ** 6,
            "last_outcome": "x" * 10 ** 6}
    entry = Entry("g", _spec(), {}, None, 0.0, adopted=False)
    _carry(entry, data)
    assert len(entry.runs) == MAX_RUNS and entry.runs_total == 10 ** 6
    assert len(entry.restart_times) == MAX_RESTART_TIMES
    assert len(entry.last_outcome) <= MAX_TEXT
    assert len(json.dumps(entry.runs)) < 64 * 1024


def test_supervisor_log_is_rotated_and_rate_limited(tmp_path: Path) -> None:
    """svirtd.log stays under its cap however often a guest makes the
    supervisor complain (a real stderr, in a child process)."""
    log = tmp_path / "svirtd.log"
    code = f"""
import os, sys
from pathlib import Path
from svirt.service import notes as svirtd_log
fd = os.open({str(log)!r}, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
os.dup2(fd, 2)
svirtd_log.SUPERVISOR_LOG_MAX = 64 * 1024
notes = svirtd_log.SupervisorLog(Path({str(log)!r}))
for i in range(20000):
    notes.note("console log full " + "\\x1b[6n" * 20, subject="g")  # one guest, in a loop
for i in range(700):
    notes.note(f"line {{i}} " + "y" * 100)
"""
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    first = log.read_bytes()
    older = log.with_name("svirtd.log.1").read_bytes()
    assert len(first) <= 64 * 1024 + MAX_TEXT + 16 and len(older) <= 64 * 1024 + MAX_TEXT + 16
    assert (first + older).count(b"console log full") == 1  # rate-limited per subject
    assert b"\x1b" not in first + older
    assert b"line 699 " in first
