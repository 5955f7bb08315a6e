"""The command line: one clear line plus a hint for every expected failure."""

from __future__ import annotations

import json
from pathlib import Path

from svirt.images.build import TinyGuest

from .helpers import svirt_cli, write_spec


def test_version_and_host() -> None:
    out = svirt_cli("--version")
    assert out.returncode == 0 and out.stdout.startswith("svirt ")
    host = svirt_cli("host", "--json")
    data = json.loads(host.stdout)
    assert "kvm" in data and "usable" in data["kvm"] and data["binaries"]["linux"]
    text = svirt_cli("host")
    assert "kvm" in text.stdout and "selinux" in text.stdout


def test_check_prints_argv_and_label_plan(tiny_uml: TinyGuest, image_dir: Path,
                                          run_root: Path) -> None:
    disk = image_dir / "c.img"
    disk.write_bytes(b"\0" * 4096)
    spec = write_spec(image_dir / "c.toml", "checked", "uml", tiny_uml,
                      extra=f'[[disk]]\npath = "{disk}"\n')
    out = svirt_cli("check", str(spec))
    assert out.returncode == 0, out.stderr
    assert "argv:" in out.stdout and "mem=128M" in out.stdout
    assert "label plan:" in out.stdout
    assert f"disk         rw      {disk}" in out.stdout
    assert "chown to the guest's uid/gid" in out.stdout
    data = json.loads(svirt_cli("check", "--json", str(spec)).stdout)
    assert data["argv"][0] == str(tiny_uml.kernel)
    assert {"path": str(disk), "access": "rw", "kind": "disk", "relabel": True} in \
        data["resources"]
    assert list(run_root.joinpath("guests").glob("*.json")) == []  # nothing launched


def test_bad_spec_is_one_line_and_exit_2(image_dir: Path, run_root: Path) -> None:
    spec = image_dir / "bad.toml"
    spec.write_text('name = "a,b"\nkernel = "/nonexistent"\n')
    out = svirt_cli("run", str(spec))
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert lines[0].startswith(f"svirt: error: {spec}: name:")
    assert lines[1].startswith("svirt: hint:")


def test_missing_spec_file(run_root: Path) -> None:
    out = svirt_cli("check", "/nonexistent/guest.toml")
    assert out.returncode == 2 and "no such file" in out.stderr
    assert "Traceback" not in out.stderr


def test_missing_disk_is_named_at_check_and_run(tiny_uml: TinyGuest, image_dir: Path,
                                                run_root: Path) -> None:
    """The spec parses (it could be for another host); preflight names the file,
    the field and the missing path, exit 2 as for any invalid spec."""
    gone = image_dir / "gone.img"
    spec = write_spec(image_dir / "m.toml", "missing", "uml", tiny_uml,
                      extra=f'[[disk]]\npath = "{gone}"\n')
    for verb in ("check", "run"):
        out = svirt_cli(verb, str(spec))
        assert out.returncode == 2, out.stderr
        assert "Traceback" not in out.stderr
        assert out.stderr.splitlines()[0] == (
            f"svirt: error: {spec}: disk[0].path: {gone} does not exist")
    assert list(run_root.joinpath("guests").glob("*.json")) == []  # nothing reserved


def test_lguest_fails_before_launch_with_reason(tiny_uml: TinyGuest, image_dir: Path,
                                                run_root: Path) -> None:
    spec = write_spec(image_dir / "l.toml", "lg", "lguest", tiny_uml)
    out = svirt_cli("run", str(spec))
    assert out.returncode == 1
    assert "/dev/lguest does not exist" in out.stderr
    assert "4.14" in out.stderr  # the hint says why
    assert "Traceback" not in out.stderr


def test_list_empty(run_root: Path) -> None:
    out = svirt_cli("list")
    assert out.returncode == 0 and out.stdout.splitlines()[0].startswith("NAME")
    assert json.loads(svirt_cli("list", "--json").stdout) == []


def test_check_says_loudly_when_the_jail_is_off(tiny_uml: TinyGuest, image_dir: Path) -> None:
    on = write_spec(image_dir / "on.toml", "jailon", "uml", tiny_uml)
    off = write_spec(image_dir / "off.toml", "jailoff", "uml", tiny_uml, extra="jail = false\n")
    proc = svirt_cli("check", str(on))
    assert proc.returncode == 0 and "jail on" in proc.stdout and "warning" not in proc.stderr
    proc = svirt_cli("check", str(off))
    assert proc.returncode == 0 and "jail OFF" in proc.stdout, proc
    assert "warning: jail = false" in proc.stderr
