"""Guests at boot: svirt enable / disable, svirt start --enabled, svirt stop
--all, the boot unit and init script, and svirt unit NAME; the enabled-guests
directory attacked (symlinks, names, owners)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from svirt.images.build import TinyGuest
from svirt.launcher.registry import Registry
from svirt.service.client import supervisor_pid

from .helpers import SVIRT, svirt_cli, wait_for, write_spec

pytestmark = pytest.mark.integration
READY = "(?m)^SVIRT-READY"


@pytest.fixture
def enabled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private enabled-guests directory (never /etc/svirt/guests)."""
    path = tmp_path / "etc" / "guests"
    monkeypatch.setenv("SVIRT_ENABLED_DIR", str(path))
    return path


@pytest.fixture
def registry(run_root: Path) -> Iterator[Registry]:
    reg = Registry(run_root)
    yield reg
    pid = supervisor_pid(reg)
    if pid is not None:  # a test failed half-way: leave nothing running
        for r in reg.records():
            if r.hypervisor is not None and r.hypervisor.alive():
                os.killpg(r.hypervisor.pid, signal.SIGKILL)
        os.kill(pid, signal.SIGKILL)


def _names(out: str) -> list[str]:
    return [line.split()[0] for line in out.splitlines()]


# --------------------------------------------------------------- enable
def test_enable_copies_with_absolute_paths(tiny_uml: TinyGuest, image_dir: Path,
                                           enabled: Path, tmp_path: Path) -> None:
    spec = write_spec(image_dir / "rel.toml", "en-rel", "uml", tiny_uml)
    # the initrd relative to the spec's directory, a disk beside it
    initrd = os.path.relpath(tiny_uml.initrd, image_dir)
    (image_dir / "disk.img").write_bytes(b"\0" * 4096)
    text = spec.read_text().replace(f'"{tiny_uml.initrd}"', f'"{initrd}"')
    spec.write_text("# a comment\n" + text + '[[disk]]\npath = "disk.img"\n')
    out = svirt_cli("enable", str(spec))
    assert out.returncode == 0, out.stderr
    copy = enabled / "en-rel.toml"
    assert f"enabled: {copy} (relative paths made absolute; uuid " in out.stdout
    st, dst = copy.stat(), enabled.stat()
    assert (st.st_uid, st.st_mode & 0o7777) == (0, 0o600)
    assert (dst.st_uid, dst.st_mode & 0o7777) == (0, 0o700)
    text = copy.read_text()
    assert f'initrd = "{image_dir / initrd}"' in text and f'"{image_dir / "disk.img"}"' in text
    # the copy means the same from anywhere
    checked = subprocess.run([SVIRT, "check", str(copy), "--json"], capture_output=True,
                             text=True, cwd="/", check=False)
    assert checked.returncode == 0, checked.stderr
    assert str(image_dir / "disk.img") in checked.stdout
    # a spec with absolute paths only is copied as it is, comments and all
    plain = write_spec(image_dir / "abs.toml", "en-abs", "uml", tiny_uml)
    plain.write_text("# keep me\n" + plain.read_text())
    assert svirt_cli("enable", str(plain)).returncode == 0
    assert (enabled / "en-abs.toml").read_text().endswith(plain.read_text())
    # no uuid in the spec: the copy pins one, and enabling again keeps it
    pinned = tomllib.loads((enabled / "en-abs.toml").read_text())["uuid"]
    again = svirt_cli("enable", str(plain))
    assert again.returncode == 0 and "replaced the earlier copy" in again.stdout
    assert f"uuid {pinned} pinned" in again.stdout
    assert tomllib.loads((enabled / "en-abs.toml").read_text())["uuid"] == pinned
    # a spec's own uuid is its own
    own = write_spec(image_dir / "own.toml", "en-own", "uml", tiny_uml)
    own.write_text('uuid = "0badc0de-0000-4000-8000-000000000001"\n' + own.read_text())
    out = svirt_cli("enable", str(own))
    assert out.returncode == 0 and "pinned" not in out.stdout, out.stdout
    assert (enabled / "en-own.toml").read_text().endswith(own.read_text())
    assert svirt_cli("disable", "en-own").returncode == 0
    listed = svirt_cli("enable", "--list")
    assert listed.returncode == 0 and _names(listed.stdout) == ["en-abs", "en-rel"]
    assert [g["name"] for g in json.loads(svirt_cli("enable", "--list", "--json").stdout)] \
        == ["en-abs", "en-rel"]
    out = svirt_cli("disable", "en-rel")
    assert out.returncode == 0 and not copy.exists()
    out = svirt_cli("disable", "en-rel")
    assert out.returncode == 1
    assert out.stderr.splitlines()[0] == "svirt: error: guest en-rel is not enabled"
    assert _names(svirt_cli("enable", "--list").stdout) == ["en-abs"]


def test_enable_gives_the_errors_of_start(image_dir: Path, enabled: Path) -> None:
    bad = image_dir / "bad.toml"
    bad.write_text('name = "x"\nbackend = "uml"\nmemory = "lots"\n')
    for spec in (bad, image_dir / "missing.toml"):
        started = svirt_cli("start", str(spec))
        out = svirt_cli("enable", str(spec))
        assert out.returncode == started.returncode == 2
        assert out.stderr == started.stderr and out.stderr.startswith("svirt: error:")
    assert not enabled.exists()


def test_enabled_dir_attacks(tiny_uml: TinyGuest, image_dir: Path, enabled: Path,
                             tmp_path: Path) -> None:
    canary = tmp_path / "canary"
    canary.write_text("canary\n")
    spec = write_spec(image_dir / "a.toml", "en-atk", "uml", tiny_uml)
    enabled.mkdir(parents=True, mode=0o700)
    # a symlink planted at the copy's name is replaced, never followed
    (enabled / "en-atk.toml").symlink_to(canary)
    assert svirt_cli("enable", str(spec)).returncode == 0
    assert canary.read_text() == "canary\n"
    assert not (enabled / "en-atk.toml").is_symlink()
    # a spec given as a symlink: copied as a regular file, its relative paths
    # taken from where it points (as svirt start takes them)
    link = tmp_path / "link.toml"
    link.symlink_to(spec)
    assert svirt_cli("enable", str(link)).returncode == 0
    assert not (enabled / "en-atk.toml").is_symlink()
    # names that would leave the directory are no guest names
    for name in ("../../etc/passwd", "a/b", "..", ""):
        out = svirt_cli("disable", name)
        assert out.returncode == 1, name
        assert "not a guest name" in out.stderr or "not enabled" in out.stderr, out.stderr
    out = svirt_cli("unit", "../x")
    assert out.returncode == 1 and "not a guest name" in out.stderr
    # an entry that is a symlink (or not root's) is skipped, with a line saying so
    (enabled / "evil.toml").symlink_to(spec)
    listed = svirt_cli("enable", "--list")
    assert _names(listed.stdout) == ["en-atk"]
    assert "evil.toml: not a regular file" in listed.stderr
    (enabled / "evil.toml").unlink()
    # the directory: someone else's, writable by others, or a symlink: refused
    for attack in ("owner", "mode", "symlink", "parent"):
        if attack == "owner":
            os.chown(enabled, 65534, 65534)
        elif attack == "mode":
            enabled.chmod(0o777)
        elif attack == "parent":
            enabled.parent.chmod(0o777)
        else:
            real = tmp_path / "real"
            enabled.rename(real)
            enabled.symlink_to(real)
        for args in (("enable", str(spec)), ("enable", "--list"), ("start", "--enabled"),
                     ("disable", "en-atk"), ("unit", "en-atk")):
            out = svirt_cli(*args)
            assert out.returncode == 1, (attack, args, out.stdout)
            assert out.stderr.startswith("svirt: error: enabled-guests directory: "), \
                (attack, out.stderr)
        if attack == "owner":
            os.chown(enabled, 0, 0)
        elif attack == "mode":
            enabled.chmod(0o700)
        elif attack == "parent":
            enabled.parent.chmod(0o755)
        else:
            enabled.unlink()
            (tmp_path / "real").rename(enabled)
    assert _names(svirt_cli("enable", "--list").stdout) == ["en-atk"]
    assert canary.read_text() == "canary\n"


# --------------------------------------------------------------- units
def _verify(unit: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is missing (apt-get install systemd)")
    out = subprocess.run([analyze, "verify", "--man=no", "--generators=no", str(unit)],
                         capture_output=True, text=True, check=False)
    assert out.returncode == 0 and out.stdout + out.stderr == "", out.stdout + out.stderr


def test_units_verify(tiny_uml: TinyGuest, image_dir: Path, enabled: Path,
                      tmp_path: Path) -> None:
    boot = svirt_cli("unit", "--boot")
    assert boot.returncode == 0, boot.stderr
    lines = boot.stdout.splitlines()
    for line in ("Type=oneshot", "RemainAfterExit=yes", "KillMode=control-group",
                 f"Environment=SVIRT_ENABLED_DIR={enabled}"):
        assert line in lines
    assert any(line.startswith("ExecStart=-/") and line.endswith(" start --enabled")
               for line in lines)
    unit = tmp_path / "svirt-guests.service"
    unit.write_text(boot.stdout)
    _verify(unit)
    spec = write_spec(image_dir / "u.toml", "en-unit", "uml", tiny_uml)
    assert svirt_cli("enable", str(spec)).returncode == 0
    one = svirt_cli("unit", "en-unit")
    assert one.returncode == 0, one.stderr
    assert (f"run {enabled / 'en-unit.toml'} --console none" in one.stdout
            and "TimeoutStopSec=80" in one.stdout)  # shutdown_timeout 20 + the ladder
    unit = tmp_path / "svirt-en-unit.service"
    unit.write_text(one.stdout)
    _verify(unit)
    out = svirt_cli("unit", "nosuch")
    assert out.returncode == 1
    assert out.stderr.splitlines()[0] == "svirt: error: guest nosuch is not enabled"
    script = svirt_cli("unit", "--boot", "--sysv")
    assert script.returncode == 0 and script.stdout.startswith("#!/bin/sh\n### BEGIN INIT INFO")
    path = tmp_path / "svirt-guests"
    path.write_text(script.stdout)
    assert subprocess.run(["sh", "-n", str(path)], check=False).returncode == 0
    assert subprocess.run(["sh", str(path), "bogus"], capture_output=True,
                          check=False).returncode == 3


# --------------------------------------------------------------- at boot
def test_start_enabled_and_the_init_script(tiny_uml: TinyGuest, tiny_qemu: TinyGuest,
                                           image_dir: Path, enabled: Path, tmp_path: Path,
                                           registry: Registry) -> None:
    specs = [write_spec(image_dir / "u.toml", "boot-uml", "uml", tiny_uml),
             write_spec(image_dir / "q.toml", "boot-qemu", "qemu", tiny_qemu)]
    # a third guest that was fine when enabled and cannot start now
    disk = image_dir / "gone.img"
    disk.write_bytes(b"\0" * 4096)
    specs.append(write_spec(image_dir / "b.toml", "boot-bad", "uml", tiny_uml,
                            extra=f'[[disk]]\npath = "{disk}"\n'))
    for spec in specs:
        out = svirt_cli("enable", str(spec))
        assert out.returncode == 0, out.stderr
    disk.unlink()
    started = time.monotonic()
    out = svirt_cli("start", "--enabled", "--wait-for", READY, timeout=240)
    took = time.monotonic() - started
    assert out.returncode == 1, out.stderr
    assert sorted(line.split()[2] for line in out.stdout.splitlines()) \
        == ["boot-qemu", "boot-uml"], out.stdout
    assert all(" started: pid " in line for line in out.stdout.splitlines())
    errors = [e for e in out.stderr.splitlines() if not e.startswith("svirt: warning:")]
    assert len(errors) == 1 and errors[0].startswith("svirt: error: guest boot-bad: "), errors
    assert "gone.img" in errors[0]
    status = json.loads(svirt_cli("status", "--json").stdout)
    assert {g["name"] for g in status["guests"]} == {"boot-uml", "boot-qemu"}
    pids = {g["name"]: g["pid"] for g in status["guests"]}
    # again: the running ones are skipped, the bad one fails again on its own
    again = svirt_cli("start", "--enabled", timeout=120)
    assert again.returncode == 1
    assert sorted(again.stdout.splitlines()) == [
        "svirt: guest boot-qemu: already running, skipped",
        "svirt: guest boot-uml: already running, skipped"]
    # the init script, with this test's registry (its SVIRT_* are in it)
    script = tmp_path / "svirt-guests"
    script.write_text(svirt_cli("unit", "--boot", "--sysv").stdout)
    script.chmod(0o755)

    def init(verb: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(script), verb], capture_output=True, text=True,
                              timeout=240, check=False)

    st = init("status")
    assert st.returncode == 0 and sorted(_names(st.stdout)) == ["boot-qemu:", "boot-uml:"]
    stop = init("stop")
    assert stop.returncode == 0, stop.stderr
    assert sorted(e for e in stop.stderr.splitlines() if "warning" not in e) == [
        "svirt: guest boot-qemu: poweroff: the guest powered off on request",
        "svirt: guest boot-uml: poweroff: the guest powered off on request"], stop.stderr
    assert registry.records() == []
    assert not any(_alive(p) for p in pids.values())
    assert init("status").returncode == 3
    assert svirt_cli("disable", "boot-bad").returncode == 0
    start = init("start")
    assert start.returncode == 0, start.stderr
    assert {line.split()[2] for line in start.stdout.splitlines()} == {"boot-uml", "boot-qemu"}
    for name in ("boot-uml", "boot-qemu"):  # booted: a power-off request is heard
        assert wait_for(lambda n=name: svirt_cli("logs", n, "-n", "5000").stdout.count(
            "\nSVIRT-READY") == 2, 120), name  # the log holds the first boot too
    daemon = supervisor_pid(registry)
    assert daemon is not None
    out = svirt_cli("stop", "--all", "--timeout", "20", timeout=120)
    assert out.returncode == 0, out.stderr
    assert registry.records() == []
    out = svirt_cli("stop", "--all")
    assert out.returncode == 0 and "no detached guest is running" in out.stderr
    for name in ("boot-uml", "boot-qemu"):
        assert svirt_cli("disable", name).returncode == 0
    assert svirt_cli("enable", "--list").stdout == ""
    assert wait_for(lambda: not _alive(daemon), timeout=15)  # idle: it left
    print(f"start --enabled of two guests (one failing): {took:.1f}s")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"
