"""GuestSpec validation: every error names the file (TOML), the key and what is wrong.

Parsing never looks at the host; what a spec names on the host (files, RAM)
is checked by svirt.preflight, tested here for the same fields and messages."""

from __future__ import annotations

import os
import re
import uuid as uuidlib
from pathlib import Path
from typing import Any

import pytest

from svirt.errors import SpecError
from svirt.host import host_memory_mib
from svirt.preflight import check_spec
from svirt.spec import (
    MAX_SPEC_BYTES,
    Accel,
    Backend,
    Console,
    ConsoleMode,
    Disk,
    DiskFormat,
    GuestSpec,
    Nic,
    Security,
    SecurityModel,
    load_spec,
    parse_memory,
    spec_from_mapping,
)

FIXED_UUID = "6f1c2e0a-3b7d-4c8e-9a51-0d2f4b6c8e10"
MAC = re.compile(r"([0-9a-f]{2}:){5}[0-9a-f]{2}")


@pytest.fixture
def files(tmp_path: Path) -> Path:
    """A directory with a kernel, an initrd, two disks and a sub-directory."""
    (tmp_path / "vmlinuz").write_bytes(b"kernel")
    (tmp_path / "initrd.img").write_bytes(b"initrd")
    (tmp_path / "disk0.img").write_bytes(b"\0" * 512)
    (tmp_path / "disk1.img").write_bytes(b"\0" * 512)
    (tmp_path / "kdir").mkdir()
    (tmp_path / "sub").mkdir()
    return tmp_path


def write_spec(directory: Path, body: str, name: str = "guest.toml") -> Path:
    path = directory / name
    path.write_text(body)
    return path


BASE = 'name = "web1"\nkernel = "vmlinuz"\n'


def load_error(directory: Path, body: str) -> tuple[Path, SpecError]:
    path = write_spec(directory, body)
    with pytest.raises(SpecError) as info:
        load_spec(path)
    return path, info.value


def preflight_error(spec: GuestSpec) -> SpecError:
    """The SpecError preflight raises for a spec that parsed."""
    with pytest.raises(SpecError) as info:
        check_spec(spec)
    return info.value


def loaded_preflight_error(directory: Path, body: str) -> SpecError:
    return preflight_error(load_spec(write_spec(directory, body)))


# ----------------------------------------------------------------- TOML errors

# (TOML text, exact key, a fragment of what is wrong)
TOML_ERRORS: list[tuple[str, str, str]] = [
    # unknown keys, at the top level and in every table
    (BASE + 'colour = "red"\n', "colour", "unknown key"),
    (BASE + '[console]\nmode = "none"\nfoo = 1\n', "console.foo", "unknown key"),
    (BASE + '[security]\nlevel = "s0"\n', "security.level", "unknown key"),
    (BASE + '[[disk]]\npath = "disk0.img"\nsize = 1\n', "disk[0].size", "unknown key"),
    (BASE + '[[nic]]\nvlan = 3\n', "nic[0].vlan", "unknown key"),
    (
        BASE + '[[nic]]\nbridge = "br0"\n[[nic]]\nbridge = "br1"\nspeed = 10\n',
        "nic[1].speed",
        "unknown key",
    ),
    # wrong types
    (BASE + 'vcpus = "2"\n', "vcpus", "expected an integer, got str"),
    (BASE + "memory = true\n", "memory", "got a boolean"),
    (BASE + "memory = 256.5\n", "memory", "got float"),
    ('name = { first = "web" }\nkernel = "vmlinuz"\n', "name", "expected a string, got dict"),
    ('name = "web1"\nkernel = 5\n', "kernel", "expected a string, got int"),
    (BASE + 'console = "log"\n', "console", "expected a table, got str"),
    (BASE + 'disk = "disk0.img"\n', "disk", "expected an array, got str"),
    (BASE + "disk = [1]\n", "disk[0]", "expected a table"),
    (BASE + "shutdown_timeout = true\n", "shutdown_timeout", "got a boolean"),
    (BASE + "[[disk]]\npath = 5\n", "disk[0].path", "expected a string, got int"),
    (BASE + '[[disk]]\npath = "disk0.img"\nreadonly = "yes"\n', "disk[0].readonly",
     "expected true/false, got str"),
    (BASE + "[[nic]]\nisolated = 1\n", "nic[0].isolated", "expected true/false, got int"),
    (BASE + '[security]\nrelabel = "no"\n', "security.relabel", "expected true/false"),
    (BASE + "[security]\nimage_roots = [1]\n", "security.image_roots",
     "expected an array of paths"),
    # memory
    (BASE + "memory = 8\n", "memory", "8 MiB is below the minimum of 16 MiB"),
    (BASE + 'memory = "15M"\n', "memory", "15 MiB is below the minimum"),
    (BASE + 'memory = "lots"\n', "memory", "expected MiB or a size like '256M'"),
    (BASE + "[[disk]]\nreadonly = true\n", "disk[0].path", "missing (required)"),
    # names
    ('name = "a/b"\nkernel = "vmlinuz"\n', "name", "is not 1-64 characters"),
    ('name = "a,b"\nkernel = "vmlinuz"\n', "name", "is not 1-64 characters"),
    ('name = "a b"\nkernel = "vmlinuz"\n', "name", "is not 1-64 characters"),
    ('name = ""\nkernel = "vmlinuz"\n', "name", "is not 1-64 characters"),
    ('name = ".hidden"\nkernel = "vmlinuz"\n', "name", "may not start with a dot"),
    (f'name = "{"x" * 65}"\nkernel = "vmlinuz"\n', "name", "is not 1-64 characters"),
    # enums
    (BASE + 'backend = "xen"\n', "backend", "'xen' is not one of: qemu, uml, lguest"),
    (BASE + 'accel = "hvf"\n', "accel", "'hvf' is not one of: auto, kvm, tcg"),
    (BASE + '[[disk]]\npath = "disk0.img"\nformat = "vmdk"\n', "disk[0].format",
     "'vmdk' is not one of: raw, qcow2"),
    (BASE + '[[nic]]\nmodel = "ne2k_pci"\n', "nic[0].model",
     "'ne2k_pci' is not one of: virtio, e1000, rtl8139"),
    (BASE + '[console]\nmode = "serial"\n', "console.mode", "'serial' is not one of"),
    (BASE + '[security]\nmodel = "tomoyo"\n', "security.model",
     "'tomoyo' is not one of: auto, selinux, smack, apparmor, dac, none"),
    # backend constraints
    (BASE + 'backend = "uml"\nvcpus = 2\n', "vcpus", "the uml backend runs exactly 1 vcpu"),
    (BASE + 'backend = "lguest"\nvcpus = 4\n', "vcpus", "the lguest backend runs exactly 1"),
    # nics
    (BASE + '[[nic]]\nmac = "52:54:00:12:34"\n', "nic[0].mac", "is not a MAC address"),
    (BASE + '[[nic]]\nmac = "52-54-00-12-34-56"\n', "nic[0].mac", "is not a MAC address"),
    (BASE + '[[nic]]\nmac = "zz:54:00:12:34:56"\n', "nic[0].mac", "is not a MAC address"),
    (BASE + '[[nic]]\nmac = "01:00:5e:00:00:01"\n', "nic[0].mac", "is a multicast address"),
    (BASE + '[[nic]]\nmac = "33:33:00:00:00:01"\n', "nic[0].mac", "is a multicast address"),
    (BASE + '[[nic]]\nbridge = "br with space"\n', "nic[0].bridge",
     "is not a valid interface name"),
    # required keys
    ('kernel = "vmlinuz"\n', "name", "missing (required)"),
    ('name = "web1"\n', "kernel", "nothing for firmware to boot"),
    # other scalar checks
    (BASE + 'uuid = "not-a-uuid"\n', "uuid", "is not a UUID"),
    (BASE + "vcpus = 0\n", "vcpus", "expected a positive integer, got 0"),
    (BASE + "vcpus = 256\n", "vcpus", "256 is more than 255"),
    (BASE + 'cmdline = "quiet\\ninit=/bin/sh"\n', "cmdline", "single-line"),
    (BASE + "shutdown_timeout = 0\n", "shutdown_timeout", "between 0 and 3600"),
    (BASE + 'netns = "a/b"\n', "netns", "is not a network namespace name"),
    (BASE + '[console]\nmode = "log"\n', "console.log", "needs a log file path"),
    (BASE + '[security]\ntype = "Svirt"\n', "security.type", "is not an SELinux type name"),
    (BASE + '[security]\nlabel = "svirt_t"\n', "security.label", "is not user:role:type:level"),
    # names that read as options or as directories
    ('name = "-rf"\nkernel = "vmlinuz"\n', "name", "'-rf' may not start with '-'"),
    (BASE + 'netns = "-n"\n', "netns", "'-n' is not a network namespace name"),
    (BASE + 'netns = ".."\n', "netns", "'..' is not a network namespace name"),
    (BASE + 'netns = "."\n', "netns", "is not a network namespace name"),
    (BASE + '[[nic]]\nbridge = "-br"\n', "nic[0].bridge", "'-br' is not a valid interface name"),
    (BASE + '[[nic]]\nbridge = ".."\n', "nic[0].bridge", "is not a valid interface name"),
    # huge and odd numbers
    (BASE + f"memory = {-10**400}\n", "memory", "-~10^400 MiB is below the minimum"),
    (BASE + f'memory = "{"9" * 5000}G"\n', "memory", "expected MiB or a size like '256M'"),
    (BASE + 'memory = "\u0661\u0662\u0663M"\n', "memory", "expected MiB or a size"),
    (BASE + f"vcpus = {10**30}\n", "vcpus", f"{10**30} is more than 255"),
    (BASE + f"vcpus = {10**400}\n", "vcpus", "~10^400 is more than 255"),
    (BASE + "shutdown_timeout = inf\n", "shutdown_timeout", "between 0 and 3600"),
    (BASE + "shutdown_timeout = nan\n", "shutdown_timeout", "between 0 and 3600"),
    (BASE + "shutdown_timeout = -inf\n", "shutdown_timeout", "between 0 and 3600"),
    (BASE + "shutdown_timeout = 1e400\n", "shutdown_timeout", "between 0 and 3600"),
    (BASE + f"shutdown_timeout = {10**400}\n", "shutdown_timeout", "between 0 and 3600"),
    # wrong types in odd places
    (BASE + "disk = [[1, 2]]\n", "disk[0]", "expected a table"),
    (BASE + "nic = [1979-05-27]\n", "nic[0]", "expected a table"),
    (BASE + "console = [1, 2]\n", "console", "expected a table, got list"),
    (BASE + "security = 5\n", "security", "expected a table, got int"),
    (BASE + "[security]\nimage_roots = [[1]]\n", "security.image_roots", "an array of paths"),
    (BASE + 'uuid = 1979-05-27\n', "uuid", "expected a string, got date"),
    (BASE + 'initrd = 07:32:00\n', "initrd", "expected a string, got time"),
]


@pytest.mark.parametrize(("body", "key", "what"), TOML_ERRORS)
def test_toml_error(files: Path, body: str, key: str, what: str) -> None:
    path, err = load_error(files, body)
    assert err.source == str(path)
    assert err.key == key
    assert what in err.detail
    # the one-line message names the file, then the key, then what is wrong
    assert err.message.startswith(f"{path}: {key}: ")
    assert str(err) == err.message


# (TOML text, exact key, a fragment of what is wrong): the spec parses, preflight refuses
PREFLIGHT_ERRORS: list[tuple[str, str, str]] = [
    # files
    ('name = "web1"\nkernel = "missing-kernel"\n', "kernel", "does not exist"),
    ('name = "web1"\nkernel = "kdir"\n', "kernel", "is not a regular file or block device"),
    (BASE + 'initrd = "missing-initrd"\n', "initrd", "does not exist"),
    (BASE + '[[disk]]\npath = "missing.img"\n', "disk[0].path", "does not exist"),
    (BASE + '[[disk]]\npath = "disk0.img"\n[[disk]]\npath = "missing.img"\n', "disk[1].path",
     "does not exist"),
    # "" is joined to the spec's directory (a directory, so still refused)
    (BASE + '[[disk]]\npath = ""\n', "disk[0].path", "is not a regular file"),
    (BASE + '[[disk]]\npath = "disk0.img"\nformat = "qcow2"\n'
     'backing = [{path = "missing.img", format = "raw"}]\n', "disk[0].backing[0].path",
     "does not exist"),
    (BASE + '[console]\nlog = "nodir/console.log"\n', "console.log", "does not exist"),
    # memory
    (BASE + f"memory = {10**400}\n", "memory", "~10^400 MiB is more than this host's"),
    (BASE + 'memory = "99999999999999999999G"\n', "memory", "MiB is more than this host's"),
    # paths the kernel refuses
    (f'name = "a"\nkernel = "{"x" * 300}"\n', "kernel", "File name too long"),
    (BASE + f'[console]\nlog = "{"x" * 300}/c.log"\n', "console.log", "File name too long"),
    (BASE + f'[[disk]]\npath = "{"y" * 300}"\n', "disk[0].path", "File name too long"),
    ('name = "a"\nkernel = "vmlinuz/x"\n', "kernel", "Not a directory"),
]


@pytest.mark.parametrize(("body", "key", "what"), PREFLIGHT_ERRORS)
def test_preflight_error(files: Path, body: str, key: str, what: str) -> None:
    err = loaded_preflight_error(files, body)
    assert err.source is None  # the spec object does not know its file; svirt check adds it
    assert err.key == key
    assert what in err.detail
    assert err.message == f"{key}: {err.detail}"
    assert "\n" not in err.message


def test_toml_memory_above_host(files: Path) -> None:
    host = host_memory_mib()
    assert host > 16
    spec = load_spec(write_spec(files, BASE + f"memory = {host + 1}\n"))
    assert spec.memory == host + 1  # parsing does not ask the host
    err = preflight_error(spec)
    assert err.key == "memory"
    assert f"{host + 1} MiB is more than this host's {host} MiB" in err.message


def test_toml_memory_above_host_as_string(files: Path) -> None:
    host_gib = host_memory_mib() // 1024 + 1
    err = loaded_preflight_error(files, BASE + f'memory = "{host_gib}G"\n')
    assert err.key == "memory"
    assert f"{host_gib * 1024} MiB is more than this host's" in err.message


def test_toml_unknown_key_hint_lists_known_keys(files: Path) -> None:
    _, err = load_error(files, BASE + '[[disk]]\npath = "disk0.img"\nsize = 1\n')
    assert err.hint == ("known keys: backing, ephemeral, format, path, readonly, relabel, "
                        "shared")


def test_toml_duplicate_disk_same_path(files: Path) -> None:
    body = BASE + '[[disk]]\npath = "disk0.img"\n[[disk]]\npath = "disk0.img"\n'
    path, err = load_error(files, body)
    assert err.source == str(path)
    assert err.key is not None and re.fullmatch(r"disk(\[1\])?\.path", err.key)
    assert f"{files / 'disk0.img'} is listed twice" in err.message


def test_toml_duplicate_disk_through_dotdot(files: Path) -> None:
    body = BASE + '[[disk]]\npath = "disk0.img"\n[[disk]]\npath = "sub/../disk0.img"\n'
    _, err = load_error(files, body)
    assert err.key is not None and err.key.startswith("disk")
    assert "is listed twice" in err.message


def test_toml_duplicate_disk_through_hard_link(files: Path) -> None:
    os.link(files / "disk0.img", files / "alias.img")
    body = BASE + '[[disk]]\npath = "disk0.img"\n[[disk]]\npath = "alias.img"\n'
    err = loaded_preflight_error(files, body)  # one file under two names: the host knows
    assert err.key == "disk[1].path"
    assert f"{files / 'alias.img'} is listed twice (also as {files / 'disk0.img'})" in err.message


def test_toml_duplicate_disk_through_symlink(files: Path) -> None:
    (files / "link.img").symlink_to(files / "disk1.img")
    body = BASE + '[[disk]]\npath = "disk1.img"\n[[disk]]\npath = "link.img"\n'
    err = loaded_preflight_error(files, body)
    assert err.key == "disk[1].path"
    assert "is listed twice" in err.message


def test_toml_qcow2_with_uml(files: Path) -> None:
    body = (BASE + 'backend = "uml"\n[[disk]]\npath = "disk0.img"\n'
            '[[disk]]\npath = "disk1.img"\nformat = "qcow2"\n')
    path, err = load_error(files, body)
    assert err.source == str(path)
    assert err.key is not None and re.fullmatch(r"disk(\[1\])?\.format", err.key)
    assert "the uml backend supports raw disks only" in err.message


def test_bad_toml_syntax(files: Path) -> None:
    path, err = load_error(files, 'name = "web1"\nkernel = \n')
    assert str(path) in err.message
    assert "not valid TOML" in err.message


def test_bad_toml_duplicate_key(files: Path) -> None:
    path, err = load_error(files, BASE + 'name = "again"\n')
    assert err.message.startswith(f"{path}: not valid TOML")


def test_missing_spec_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert info.value.message == f"{path}: no such file"


def test_spec_file_is_a_directory(tmp_path: Path) -> None:
    with pytest.raises(SpecError) as info:
        load_spec(tmp_path)
    assert str(tmp_path) in info.value.message
    assert info.value.message == f"{tmp_path}: is a directory, not a spec file"


def file_error(path: Path | str) -> str:
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert "\n" not in info.value.message
    return info.value.message


def test_spec_file_is_a_fifo_and_does_not_hang(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo.toml"
    os.mkfifo(fifo)  # no writer: a blocking open would wait for ever
    assert file_error(fifo) == f"{fifo}: not a regular file"


@pytest.mark.parametrize("device", ["/dev/null", "/dev/zero"])
def test_spec_file_is_a_device(device: str) -> None:
    assert file_error(device) == f"{device}: not a regular file"


def test_spec_file_too_large(tmp_path: Path) -> None:
    path = tmp_path / "big.toml"
    path.write_bytes(BASE.encode() + b"#" * MAX_SPEC_BYTES)
    assert "more than a spec may have" in file_error(path)
    path.write_bytes(BASE.encode() + b"#" * (MAX_SPEC_BYTES - len(BASE) - 1) + b"\n")
    assert load_spec(path).kernel == tmp_path / "vmlinuz"  # exactly the cap is read


def test_spec_file_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(BASE.encode() + 'cmdline = "caf\xe9"\n'.encode("latin-1"))
    assert file_error(path) == f"{path}: not valid TOML: not UTF-8 (byte 47, line 3)"


def test_spec_file_deeply_nested(tmp_path: Path) -> None:
    path = tmp_path / "deep.toml"
    path.write_text(BASE + "x = " + "[" * 100_000 + "]" * 100_000 + "\n")
    assert file_error(path) == f"{path}: not valid TOML: nested too deeply"


def test_spec_file_integer_too_long(tmp_path: Path) -> None:
    path = tmp_path / "long.toml"
    path.write_text(BASE + "memory = " + "9" * 5000 + "\n")
    assert file_error(path) == f"{path}: not valid TOML: a number too long to read"


def test_spec_file_odd_paths(tmp_path: Path) -> None:
    assert file_error(tmp_path / ("x" * 300)).endswith(": File name too long")
    assert file_error(str(tmp_path) + "/a\0b").endswith(": not a valid file name")
    assert file_error(str(tmp_path) + "/a\ud800b").endswith(": not a valid file name")
    (tmp_path / "f").write_text("")
    assert file_error(tmp_path / "f" / "x").endswith(": Not a directory")
    assert "expected the path of a spec file" in file_error("")
    newline = tmp_path / "a\nb.toml"
    assert repr(str(newline)) in file_error(newline)  # escaped: one line
    long = tmp_path / ("y" * 200) / ("z" * 200)
    assert f"{str(long)[:120]}...{str(long)[-120:]}: no such file" == file_error(long)


# ----------------------------------------------------- TOML: relative paths


def test_relative_paths_resolve_against_the_spec_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    images = tmp_path / "images"
    images.mkdir()
    (images / "vmlinuz").write_bytes(b"k")
    (images / "initrd.img").write_bytes(b"i")
    (images / "root.img").write_bytes(b"\0" * 512)
    logs = tmp_path / "logs"
    logs.mkdir()
    specs = tmp_path / "specs"
    specs.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the cwd must not matter
    path = write_spec(specs, (
        'name = "rel"\nkernel = "../images/vmlinuz"\ninitrd = "../images/initrd.img"\n'
        '[console]\nlog = "../logs/console.log"\n'
        '[security]\nimage_roots = ["../images"]\n'
        '[[disk]]\npath = "../images/root.img"\n'
    ))
    spec = load_spec(path)
    assert spec.kernel == images / "vmlinuz"
    assert spec.initrd == images / "initrd.img"
    assert spec.disks[0].path == images / "root.img"
    assert spec.console.log == logs / "console.log"
    assert spec.console.mode is ConsoleMode.LOG
    assert spec.security.image_roots == (images,)


def test_relative_spec_path_is_resolved(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "vmlinuz").write_bytes(b"k")
    write_spec(tmp_path, BASE)
    monkeypatch.chdir(tmp_path)
    spec = load_spec("guest.toml")
    assert spec.kernel == tmp_path / "vmlinuz"
    assert spec.kernel.is_absolute()


def test_absolute_paths_are_kept(files: Path, tmp_path: Path) -> None:
    specs = tmp_path / "specs"
    specs.mkdir()
    path = write_spec(specs, f'name = "abs"\nkernel = "{files / "vmlinuz"}"\n')
    assert load_spec(path).kernel == files / "vmlinuz"


# -------------------------------------------------- Python construction errors


def py_error(**kwargs: Any) -> SpecError:
    with pytest.raises(SpecError) as info:
        GuestSpec(**kwargs)
    return info.value


PY_ERRORS: list[tuple[dict[str, Any], str, str]] = [
    ({"vcpus": "2"}, "vcpus", "expected a positive integer, got '2'"),
    ({"vcpus": True}, "vcpus", "expected a positive integer, got True"),
    ({"vcpus": 2.0}, "vcpus", "expected a positive integer"),
    ({"memory": True}, "memory", "expected MiB or a size like '256M', got True"),
    ({"memory": 12.5}, "memory", "expected MiB or a size like '256M', got 12.5"),
    ({"memory": 8}, "memory", "8 MiB is below the minimum of 16 MiB"),
    ({"memory": "1M"}, "memory", "1 MiB is below the minimum"),
    ({"name": {"first": "web"}}, "name", "is not 1-64 characters"),
    ({"name": 7}, "name", "is not 1-64 characters"),
    ({"name": "a/b"}, "name", "is not 1-64 characters"),
    ({"name": "a,b"}, "name", "is not 1-64 characters"),
    ({"name": "a b"}, "name", "is not 1-64 characters"),
    ({"name": ".dot"}, "name", "may not start with a dot"),
    ({"name": "x" * 65}, "name", "is not 1-64 characters"),
    ({"backend": "xen"}, "backend", "'xen' is not one of: qemu, uml, lguest"),
    ({"accel": "whpx"}, "accel", "'whpx' is not one of: auto, kvm, tcg"),
    ({"backend": "uml", "vcpus": 2}, "vcpus", "the uml backend runs exactly 1 vcpu"),
    ({"uuid": "xyz"}, "uuid", "'xyz' is not a UUID"),
    ({"cmdline": "a\nb"}, "cmdline", "single-line"),
    ({"cmdline": 3}, "cmdline", "single-line"),
    ({"shutdown_timeout": "30"}, "shutdown_timeout", "expected seconds"),
    ({"shutdown_timeout": 3601}, "shutdown_timeout", "between 0 and 3600"),
    ({"netns": "bad ns"}, "netns", "is not a network namespace name"),
    # wrong types anywhere are SpecErrors, not TypeError/AttributeError
    ({"name": "-web"}, "name", "may not start with '-'"),
    ({"name": [[[[["deep"]]]]]}, "name", "is not 1-64 characters"),
    ({"uuid": 5}, "uuid", "expected a UUID, got 5"),
    ({"uuid": b"x" * 16}, "uuid", "expected a UUID"),
    ({"netns": 5}, "netns", "5 is not a network namespace name"),
    ({"netns": "-ns"}, "netns", "is not a network namespace name"),
    ({"memory": "1" + " " * 100_000 + "x"}, "memory", "expected MiB or a size like '256M'"),
    ({"vcpus": 10**5000}, "vcpus", "~10^5000 is more than 255"),
    ({"shutdown_timeout": float("nan")}, "shutdown_timeout", "between 0 and 3600"),
    ({"shutdown_timeout": float("inf")}, "shutdown_timeout", "between 0 and 3600"),
    ({"shutdown_timeout": 10**5000}, "shutdown_timeout", "between 0 and 3600"),
    ({"shutdown_timeout": 1j}, "shutdown_timeout", "expected seconds, got 1j"),
    ({"disks": [1, 2]}, "disk", "expected a tuple of Disk"),
    ({"disks": "disk0.img"}, "disk", "expected a tuple of Disk"),
    ({"nics": (None,)}, "nic", "expected a tuple of Nic"),
    ({"console": "log"}, "console", "expected a Console, got 'log'"),
    ({"security": {"model": "dac"}}, "security", "expected a Security"),
    ({"kernel": 5}, "kernel", "expected a path, got 5"),
    ({"kernel": "/tmp/a\ud800b"}, "kernel", "is not a valid file name"),
    ({"initrd": b"/initrd"}, "initrd", "expected a path"),
]


@pytest.mark.parametrize(("kwargs", "key", "what"), PY_ERRORS)
def test_python_error(files: Path, kwargs: dict[str, Any], key: str, what: str) -> None:
    args: dict[str, Any] = {"name": "web1", "kernel": files / "vmlinuz", **kwargs}
    err = py_error(**args)
    assert err.source is None
    assert err.key == key
    assert what in err.detail
    assert err.message == f"{key}: {err.detail}"


PY_PREFLIGHT_ERRORS: list[tuple[dict[str, Any], str, str]] = [
    ({"memory": 10**5000}, "memory", "~10^5000 MiB is more than this host's"),
    ({"kernel": "x" * 5000}, "kernel", "File name too long"),
]


@pytest.mark.parametrize(("kwargs", "key", "what"), PY_PREFLIGHT_ERRORS)
def test_python_preflight_error(files: Path, kwargs: dict[str, Any], key: str,
                                what: str) -> None:
    err = preflight_error(GuestSpec(**{"name": "web1", "kernel": files / "vmlinuz", **kwargs}))
    assert err.key == key
    assert what in err.detail
    assert err.message == f"{key}: {err.detail}"


def test_python_memory_above_host(files: Path) -> None:
    host = host_memory_mib()
    err = preflight_error(GuestSpec(name="big", kernel=files / "vmlinuz", memory=host + 1))
    assert err.key == "memory"
    assert f"is more than this host's {host} MiB" in err.message


def test_python_memory_at_limits(files: Path) -> None:
    assert GuestSpec(name="lo", kernel=files / "vmlinuz", memory=16).memory == 16
    host = host_memory_mib()
    spec = GuestSpec(name="hi", kernel=files / "vmlinuz", memory=host)
    assert spec.memory == host
    check_spec(spec)


def test_python_name_limits(files: Path) -> None:
    assert GuestSpec(name="x" * 64, kernel=files / "vmlinuz").name == "x" * 64
    assert GuestSpec(name="a-b_c.d9", kernel=files / "vmlinuz").name == "a-b_c.d9"


@pytest.mark.parametrize(
    ("kernel", "what"),
    [("missing", "does not exist"), ("kdir", "is not a regular file or block device")],
)
def test_python_kernel_errors(files: Path, kernel: str, what: str) -> None:
    err = preflight_error(GuestSpec(name="k", kernel=files / kernel))
    assert err.key == "kernel"
    assert f"{files / kernel} {what}" in err.message


def test_python_kernel_empty_path(files: Path) -> None:
    err = py_error(name="k", kernel="")
    assert err.key == "kernel"
    assert "expected a path" in err.message


def test_python_initrd_missing(files: Path) -> None:
    err = preflight_error(GuestSpec(name="k", kernel=files / "vmlinuz", initrd=files / "nope"))
    assert err.key == "initrd"
    assert "does not exist" in err.message


def test_python_disk_errors(files: Path) -> None:
    with pytest.raises(SpecError) as info:
        Disk(files / "disk0.img", format="vmdk")  # type: ignore[arg-type]
    assert info.value.key == "disk.format"
    assert "'vmdk' is not one of" in info.value.message


@pytest.mark.parametrize(
    ("path", "what"),
    [("missing.img", "does not exist"), ("kdir", "is not a regular file")],
)
def test_python_disk_file_errors(files: Path, path: str, what: str) -> None:
    disk = Disk(files / path)  # parsing does not look
    err = preflight_error(GuestSpec(name="k", kernel=files / "vmlinuz",
                                    disks=(Disk(files / "disk0.img"), disk)))
    assert err.key == "disk[1].path"
    assert what in err.message


@pytest.mark.parametrize(
    ("kwargs", "key", "what"),
    [
        ({"mac": "52:54:00:12:34"}, "nic.mac", "is not a MAC address"),
        ({"mac": "01:00:5e:00:00:01"}, "nic.mac", "is a multicast address"),
        ({"mac": "FF:FF:FF:FF:FF:FF"}, "nic.mac", "is a multicast address"),
        ({"model": "ne2k_pci"}, "nic.model", "'ne2k_pci' is not one of"),
        ({"bridge": "x" * 16}, "nic.bridge", "is not a valid interface name"),
    ],
)
def test_python_nic_errors(kwargs: dict[str, Any], key: str, what: str) -> None:
    with pytest.raises(SpecError) as info:
        Nic(**kwargs)
    assert info.value.key == key
    assert what in info.value.message


@pytest.mark.parametrize(
    ("cls", "kwargs", "key", "what"),
    [
        (Nic, {"bridge": 5}, "nic.bridge", "5 is not a valid interface name"),
        (Nic, {"bridge": "-br"}, "nic.bridge", "is not a valid interface name"),
        (Nic, {"bridge": "."}, "nic.bridge", "is not a valid interface name"),
        (Nic, {"mac": 0x525400123456}, "nic.mac", "is not a MAC address"),
        (Nic, {"model": ["virtio"]}, "nic.model", "is not one of"),
        (Nic, {"isolated": "yes"}, "nic.isolated", "expected true/false, got 'yes'"),
        (Disk, {"path": "disk0.img", "readonly": 1}, "disk.readonly", "expected true/false"),
        (Disk, {"path": "disk0.img", "shared": None}, "disk.shared", "expected true/false"),
        (Disk, {"path": "disk0.img", "relabel": "no"}, "disk.relabel", "expected true/false"),
        (Disk, {"path": "disk0.img", "format": 10**5000}, "disk.format", "is not one of"),
        (Security, {"type": 5}, "security.type", "is not an SELinux type name"),
        (Security, {"type": "a" * 300 + "_t"}, "security.type", "is not an SELinux type name"),
        (Security, {"label": 5}, "security.label", "is not user:role:type:level"),
        (Security, {"label": "u:r:t:s0\nx"}, "security.label", "is not user:role:type:level"),
        (Security, {"relabel": 0}, "security.relabel", "expected true/false"),
        (Security, {"image_roots": "/srv"}, "security.image_roots", "expected a list of paths"),
        (Security, {"image_roots": (5,)}, "security.image_roots", "expected a path"),
        (Console, {"log": 5}, "console.log", "expected a path"),
    ],
)
def test_python_wrong_types_in_parts(files: Path, monkeypatch: pytest.MonkeyPatch,
                                     cls: type[Any], kwargs: dict[str, Any], key: str,
                                     what: str) -> None:
    monkeypatch.chdir(files)
    with pytest.raises(SpecError) as info:
        cls(**kwargs)
    assert info.value.key == key
    assert what in info.value.message
    assert "\n" not in info.value.message


def test_python_disks_as_list_become_a_tuple(files: Path) -> None:
    spec = GuestSpec(name="l", kernel=files / "vmlinuz",
                     disks=[Disk(files / "disk0.img")])  # type: ignore[arg-type]
    assert spec.disks == (Disk(files / "disk0.img"),)


def test_python_relative_path_with_the_cwd_gone(tmp_path: Path, files: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    gone = tmp_path / "gone"
    gone.mkdir()
    monkeypatch.chdir(gone)
    gone.rmdir()
    err = py_error(name="c", kernel="vmlinuz")
    assert err.key == "kernel"
    assert "No such file or directory" in err.message


def test_spec_from_mapping_refuses_a_non_table() -> None:
    with pytest.raises(SpecError) as info:
        spec_from_mapping([1, 2])  # type: ignore[arg-type]
    assert "expected a table, got list" in info.value.message


def test_python_console_and_security_errors(tmp_path: Path) -> None:
    with pytest.raises(SpecError) as info:
        Console(mode="log")  # type: ignore[arg-type]
    assert info.value.key == "console.log"
    console = Console(log=tmp_path / "missing" / "c.log")  # parsing does not look
    (tmp_path / "vmlinuz").write_bytes(b"k")
    err = preflight_error(GuestSpec(name="c", kernel=tmp_path / "vmlinuz", console=console))
    assert err.key == "console.log"
    assert f"directory {tmp_path / 'missing'} does not exist" in err.message
    with pytest.raises(SpecError) as info:
        Security(model="tomoyo")  # type: ignore[arg-type]
    assert info.value.key == "security.model"
    with pytest.raises(SpecError) as info:
        Security(type="svirt")
    assert info.value.key == "security.type"
    with pytest.raises(SpecError) as info:
        Security(label="a:b:c")
    assert info.value.key == "security.label"


def test_python_duplicate_disk_same_path(files: Path) -> None:
    disk = Disk(files / "disk0.img")
    err = py_error(name="d", kernel=files / "vmlinuz", disks=(disk, Disk(files / "disk0.img")))
    assert err.key == "disk.path"
    assert f"{files / 'disk0.img'} is listed twice" in err.message


def test_python_duplicate_disk_through_dotdot(files: Path) -> None:
    disks = (Disk(files / "disk0.img"), Disk(Path(f"{files}/sub/../disk0.img")))
    err = py_error(name="d", kernel=files / "vmlinuz", disks=disks)
    assert err.key == "disk.path"
    assert "is listed twice" in err.message


def test_python_duplicate_disk_through_hard_link(files: Path) -> None:
    os.link(files / "disk1.img", files / "hard.img")
    disks = (Disk(files / "disk0.img"), Disk(files / "disk1.img"), Disk(files / "hard.img"))
    err = preflight_error(GuestSpec(name="d", kernel=files / "vmlinuz", disks=disks))
    assert err.key == "disk[2].path"
    assert f"{files / 'hard.img'} is listed twice (also as {files / 'disk1.img'})" in err.message


def test_python_two_distinct_disks_are_fine(files: Path) -> None:
    spec = GuestSpec(name="d", kernel=files / "vmlinuz",
                     disks=(Disk(files / "disk0.img"), Disk(files / "disk1.img")))
    assert [d.path for d in spec.disks] == [files / "disk0.img", files / "disk1.img"]


def test_python_qcow2_with_uml(files: Path) -> None:
    err = py_error(name="u", kernel=files / "vmlinuz", backend=Backend.UML,
                   disks=(Disk(files / "disk0.img", format=DiskFormat.QCOW2),))
    assert err.key == "disk.format"
    assert "the uml backend supports raw disks only" in err.message


def test_python_too_many_disks_and_nics(files: Path) -> None:
    disks = []
    for i in range(17):
        p = files / f"many{i}.img"
        p.write_bytes(b"\0")
        disks.append(Disk(p))
    err = py_error(name="m", kernel=files / "vmlinuz", disks=tuple(disks))
    assert err.key == "disk"
    assert "at most 16 disks" in err.message
    err = py_error(name="m", kernel=files / "vmlinuz", nics=tuple(Nic() for _ in range(9)))
    assert err.key == "nic"
    assert "at most 8 nics" in err.message


# -------------------------------------------------------- equal, normalised


def test_toml_and_python_give_equal_specs(files: Path) -> None:
    path = write_spec(files, (
        f'name = "web1"\nkernel = "vmlinuz"\ninitrd = "initrd.img"\nuuid = "{FIXED_UUID}"\n'
        'backend = "qemu"\naccel = "kvm"\nmemory = "256M"\nvcpus = 2\n'
        'cmdline = "root=/dev/vda quiet"\nshutdown_timeout = 12.5\n'
        '[console]\nlog = "console.log"\n'
        '[security]\nmodel = "selinux"\ntype = "svirt_web_t"\n'
        '[[disk]]\npath = "disk0.img"\n'
        '[[disk]]\npath = "disk1.img"\nformat = "qcow2"\nreadonly = true\n'
        '[[nic]]\nbridge = "br0"\nmac = "52:54:00:AB:CD:EF"\n'
        '[[nic]]\nisolated = true\nmodel = "e1000"\n'
    ))
    from_toml = load_spec(path)
    from_python = GuestSpec(
        name="web1",
        kernel=files / "vmlinuz",
        initrd=str(files / "initrd.img"),  # type: ignore[arg-type]
        uuid=uuidlib.UUID(FIXED_UUID),
        backend=Backend.QEMU,
        accel=Accel.KVM,
        memory=256,
        vcpus=2,
        cmdline="root=/dev/vda quiet",
        shutdown_timeout=12.5,
        console=Console(log=files / "console.log"),
        security=Security(model=SecurityModel.SELINUX, type="svirt_web_t"),
        disks=(Disk(files / "disk0.img"),
               Disk(files / "disk1.img", format=DiskFormat.QCOW2, readonly=True)),
        nics=(Nic(bridge="br0", mac="52:54:00:ab:cd:ef"), Nic(isolated=True, model="e1000")),
    )
    assert from_toml == from_python
    assert from_toml.uuid == uuidlib.UUID(FIXED_UUID)
    assert from_toml.nics[0].mac == "52:54:00:ab:cd:ef"
    assert from_toml.console.mode is ConsoleMode.LOG
    assert from_toml.disks[1].format is DiskFormat.QCOW2


def test_python_strings_are_normalised(files: Path) -> None:
    spec = GuestSpec(name="s", kernel=str(files / "vmlinuz"),  # type: ignore[arg-type]
                     backend="uml", accel="tcg", uuid=FIXED_UUID)  # type: ignore[arg-type]
    assert spec.backend is Backend.UML
    assert spec.accel is Accel.TCG
    assert spec.uuid == uuidlib.UUID(FIXED_UUID)
    assert spec.kernel == files / "vmlinuz"


@pytest.mark.parametrize(
    ("value", "mib"),
    [("256M", 256), ("1G", 1024), (512, 512), ("2g", 2048), ("64MiB", 64), (" 128 M ", 128),
     ("1048576K", 1024), ("96", 96)],
)
def test_memory_values(files: Path, value: int | str, mib: int) -> None:
    assert parse_memory(value) == mib
    spec = GuestSpec(name="m", kernel=files / "vmlinuz", memory=value)  # type: ignore[arg-type]
    assert spec.memory == mib
    path = write_spec(files, BASE + (f'memory = "{value}"\n' if isinstance(value, str)
                                     else f"memory = {value}\n"))
    assert load_spec(path).memory == mib


@pytest.mark.parametrize("value", ["1.5G", "G", "256X", "-1G", "", [256]])
def test_memory_rejected(value: object) -> None:
    with pytest.raises(SpecError) as info:
        parse_memory(value)
    assert info.value.key == "memory"
    assert "expected MiB or a size like '256M'" in info.value.message


def test_memory_bytes_suffix_is_not_mib(files: Path) -> None:
    with pytest.raises(SpecError):
        GuestSpec(name="m", kernel=files / "vmlinuz", memory="256B")  # type: ignore[arg-type]


def test_defaults(files: Path) -> None:
    spec = GuestSpec(name="d", kernel=files / "vmlinuz")
    assert spec.backend is Backend.QEMU
    assert spec.accel is Accel.AUTO
    assert spec.memory == 256
    assert spec.vcpus == 1
    assert spec.console == Console(mode=ConsoleMode.NONE)
    assert spec.security.model is SecurityModel.AUTO
    assert spec.disks == () and spec.nics == ()


def test_default_uuid_is_generated_and_distinct(files: Path) -> None:
    a = GuestSpec(name="a", kernel=files / "vmlinuz")
    b = GuestSpec(name="a", kernel=files / "vmlinuz")
    assert isinstance(a.uuid, uuidlib.UUID)
    assert a.uuid.version == 4
    assert a.uuid != b.uuid
    assert a != b
    path = write_spec(files, BASE)
    assert load_spec(path).uuid != load_spec(path).uuid


def test_with_changes_revalidates(files: Path) -> None:
    spec = GuestSpec(name="w", kernel=files / "vmlinuz")
    assert spec.with_changes(memory="1G").memory == 1024
    with pytest.raises(SpecError) as info:
        spec.with_changes(name="bad name")
    assert info.value.key == "name"


# ------------------------------------------------------------------ nic_mac


def spec_with_nics(files: Path, uuid: str, count: int = 8) -> GuestSpec:
    return GuestSpec(name="n", kernel=files / "vmlinuz", uuid=uuidlib.UUID(uuid),
                     nics=tuple(Nic() for _ in range(count)))


def test_nic_mac_is_stable_for_one_uuid(files: Path) -> None:
    a = spec_with_nics(files, FIXED_UUID)
    b = spec_with_nics(files, FIXED_UUID)
    assert [a.nic_mac(i) for i in range(8)] == [b.nic_mac(i) for i in range(8)]
    assert a.nic_mac(0) == a.nic_mac(0)


def test_nic_mac_is_locally_administered_unicast(files: Path) -> None:
    for uuid in (FIXED_UUID, str(uuidlib.uuid4()), str(uuidlib.uuid4())):
        spec = spec_with_nics(files, uuid)
        for i in range(8):
            mac = spec.nic_mac(i)
            assert MAC.fullmatch(mac), mac
            first = int(mac[:2], 16)
            assert first == 0x52
            assert first & 1 == 0  # unicast
            assert first & 2 == 2  # locally administered
            assert mac.startswith("52:54:")


def test_nic_mac_differs_per_index_and_uuid(files: Path) -> None:
    a = spec_with_nics(files, FIXED_UUID)
    b = spec_with_nics(files, "0e6b9d2c-1111-4222-8333-444455556666")
    macs_a = [a.nic_mac(i) for i in range(8)]
    macs_b = [b.nic_mac(i) for i in range(8)]
    assert len(set(macs_a)) == 8
    assert len(set(macs_b)) == 8
    assert not set(macs_a) & set(macs_b)


def test_nic_mac_given_is_used_lowercased(files: Path) -> None:
    spec = GuestSpec(name="n", kernel=files / "vmlinuz",
                     nics=(Nic(mac="52:54:00:AA:BB:CC"), Nic()))
    assert spec.nic_mac(0) == "52:54:00:aa:bb:cc"
    assert spec.nic_mac(1) != "52:54:00:aa:bb:cc"
    with pytest.raises(IndexError):
        spec.nic_mac(2)


# ------------------------------------------------------------------ [limits]


def test_limits_default_is_empty(files: Path) -> None:
    from svirt.spec import Limits

    spec = load_spec(write_spec(files, BASE))
    assert spec.limits == Limits()
    assert (spec.limits.pids, spec.limits.cpu_weight, spec.limits.cpus) == (None, None, None)


def test_limits_from_toml(files: Path) -> None:
    spec = load_spec(write_spec(
        files, BASE + '[limits]\npids = 64\ncpu_weight = 200\ncpus = "0-1,3"\n'))
    assert spec.limits.pids == 64
    assert spec.limits.cpu_weight == 200
    assert spec.limits.cpus == "0-1,3"


@pytest.mark.parametrize(("body", "key", "what"), [
    ("pids = 0", "limits.pids", "between 8 and"),
    ("pids = 5_000_000", "limits.pids", "between 8 and"),
    ("pids = true", "limits.pids", "got a boolean"),
    ('pids = "64"', "limits.pids", "expected an integer"),
    ("cpu_weight = 0", "limits.cpu_weight", "between 1 and 10000"),
    ("cpu_weight = 10001", "limits.cpu_weight", "between 1 and 10000"),
    ("cpu_weight = 1.5", "limits.cpu_weight", "expected an integer"),
    ('cpus = ""', "limits.cpus", "not a cpu list"),
    ('cpus = "1-0"', "limits.cpus", "goes backwards"),
    ('cpus = "0-"', "limits.cpus", "not a cpu list"),
    ('cpus = "a"', "limits.cpus", "not a cpu list"),
    ('cpus = "0,,1"', "limits.cpus", "not a cpu list"),
    ('cpus = "0-9000"', "limits.cpus", "stop at 8191"),
    ('cpus = "0\\n1"', "limits.cpus", "not a cpu list"),
    ("cpus = 1", "limits.cpus", "expected a string"),
    ("memory = 1", "limits.memory", "unknown key"),
])
def test_limits_errors(files: Path, body: str, key: str, what: str) -> None:
    _path, err = load_error(files, BASE + "[limits]\n" + body + "\n")
    assert err.key == key, err
    assert what in err.message, err.message


def test_limits_not_a_table(files: Path) -> None:
    _path, err = load_error(files, BASE + "limits = 3\n")
    assert err.key == "limits"


def test_limits_in_python(files: Path) -> None:
    from svirt.spec import Limits

    spec = GuestSpec(name="l", kernel=files / "vmlinuz", limits=Limits(pids=100, cpus=" 0 "))
    assert spec.limits.cpus == "0"
    with pytest.raises(SpecError) as info:
        Limits(cpu_weight=-1)
    assert info.value.key == "limits.cpu_weight"
    with pytest.raises(SpecError) as info:
        GuestSpec(name="l", kernel=files / "vmlinuz", limits={"pids": 3})  # type: ignore[arg-type]
    assert info.value.key == "limits"


def test_console_log_caps_from_spec_and_host_config() -> None:
    from svirt.config import parse
    from svirt.errors import ConfigError
    from svirt.spec import Console

    assert Console(max_bytes=65536, keep=2).keep == 2
    for bad in ({"max_bytes": 10}, {"keep": 0}, {"keep": True}, {"max_bytes": "2M"}):
        with pytest.raises(SpecError):
            Console(**bad)
    config = parse({"console_log_max_bytes": 1 << 20, "console_log_keep": 5})
    assert (config.console_log_max_bytes, config.console_log_keep) == (1 << 20, 5)
    assert parse({}).console_log_max_bytes == 2 * 1024 * 1024
    with pytest.raises(ConfigError):
        parse({"console_log_keep": 0})
