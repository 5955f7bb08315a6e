"""The command line: one clear line plus a hint for every expected failure."""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path

import pytest

from svirt.images.build import TinyGuest
from svirt.launcher.launch import launch
from svirt.launcher.registry import Registry
from svirt.security.dac import ACL_XATTR, DacDriver, parse_acl
from svirt.spec import load_spec

from .helpers import status_field, svirt_cli, write_spec


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
    m = re.search(r"process \(slot (\d+) if launched now\):\n  dac: uid (\d+) gid (\d+)",
                  out.stdout)
    assert m, out.stdout
    uid = int(m.group(2))
    assert f"dac: owner {uid}:{uid} mode 0600\n" in out.stdout
    data = json.loads(svirt_cli("check", "--json", str(spec)).stdout)
    assert data["argv"][0] == str(tiny_uml.kernel)
    disk_plan = next(r for r in data["resources"] if r["path"] == str(disk))
    assert disk_plan["access"] == "rw" and disk_plan["kind"] == "disk" and disk_plan["relabel"]
    assert disk_plan["plan"]["dac"] == {"change": True, "note": "",
                                        "setting": f"owner {uid}:{uid} mode 0600"}
    assert list(run_root.joinpath("guests").glob("*.json")) == []  # nothing launched
    assert DacDriver().uid(int(m.group(1))) == uid  # the slot's uid, not text


def test_check_shows_what_the_launch_then_applies(tiny_uml: TinyGuest, image_dir: Path,
                                                  run_root: Path) -> None:
    """The slot, uid, owner, mode and ACL entry `svirt check` prints are the
    ones a launch right after it gives (host-wide claims are shared with other
    runs: a slot taken in between is retried)."""
    rw, ro, pub = (image_dir / n for n in ("rw.img", "ro.img", "pub.img"))
    for path, mode in ((rw, 0o644), (ro, 0o640), (pub, 0o644)):
        path.write_bytes(b"\0" * 4096)
        path.chmod(mode)
    spec = write_spec(image_dir / "p.toml", "planned", "uml", tiny_uml, extra=(
        f'[[disk]]\npath = "{rw}"\n[[disk]]\npath = "{ro}"\nreadonly = true\n'
        f'[[disk]]\npath = "{pub}"\nreadonly = true\n'))
    for _attempt in range(3):
        out = svirt_cli("check", "--json", str(spec))
        assert out.returncode == 0, out.stderr
        plan = json.loads(out.stdout)
        with launch(load_spec(spec), registry=Registry(run_root)) as guest:
            if guest.record.slot != plan["slot"]:
                continue  # another run took that slot meanwhile
            uid = guest.guest_uid
            assert uid is not None
            assert plan["process"]["dac"]["identity"] == f"uid {uid} gid {uid} groups none"
            assert status_field(guest.pid, "Uid").split() == [str(uid)] * 4
            assert status_field(guest.pid, "Groups") == ""
            by_path = {r["path"]: r["plan"]["dac"] for r in plan["resources"]}
            st = rw.stat()
            assert by_path[str(rw)]["setting"] == (
                f"owner {st.st_uid}:{st.st_gid} mode {stat.S_IMODE(st.st_mode):04o}")
            entries = parse_acl(os.getxattr(ro, ACL_XATTR))
            assert (2, 4, uid) in entries  # ACL_USER, r--, the guest's uid
            assert by_path[str(ro)]["setting"] == f"ACL user:{uid}:r--"
            assert by_path[str(pub)] == {"change": False, "setting": "unchanged",
                                         "note": "others may read it already: mode 0644"}
            assert ACL_XATTR not in os.listxattr(pub)
            home = next(r for r in plan["resources"] if r["kind"] == "run-dir")
            st = Path(home["path"]).stat()
            assert home["plan"]["dac"]["setting"] == (
                f"owner {st.st_uid}:{st.st_gid} mode {stat.S_IMODE(st.st_mode):04o}")
            guest.stop()
            break
    else:
        pytest.fail("three launches in a row got another slot than svirt check showed")


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
