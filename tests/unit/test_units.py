"""svirt enable's copy (relative paths made absolute, TOML written back) and
the words of generated units: pure functions, no root, no guest."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest

from svirt.service.enabled import to_toml
from svirt.service.units import systemd_word, template
from svirt.spec import absolute_paths


@pytest.mark.parametrize("data", [
    {"name": "a", "cmdline": 'quote " backslash \\ newline \n tab \t del \x7f nul-ish \x01'},
    {"name": "ü-ß", "memory": 128, "shutdown_timeout": 2.5, "jail": False,
     "security": {"model": "dac", "image_roots": ["/x y", "/z"]}},
    {"name": "b", "disk": [{"path": "/d", "format": "qcow2",
                            "backing": [{"path": "/b", "format": "raw"}]},
                           {"path": "/e", "readonly": True}],
     "nic": [{"bridge": "br0"}], "console": {"log": "/l"}, "limits": {"pids": 256}},
    {"weird key": 1e16, "inf": float("inf"), "neg": -3},
])
def test_toml_written_back_reads_the_same(data: dict[str, Any]) -> None:
    assert tomllib.loads(to_toml(data)) == data


def test_relative_paths_made_absolute_where_the_spec_resolves_them() -> None:
    base = Path("/srv/guests")
    data = {"name": "g", "kernel": "k/vmlinuz", "initrd": "/abs/initrd",
            "cmdline": "root=relative/not/a/path", "console": {"log": "logs/g.log"},
            "security": {"image_roots": [".", "/images"]},
            "disk": [{"path": "d.qcow2", "format": "qcow2",
                      "backing": [{"path": "../base.raw", "format": "raw"}]},
                     {"path": "/abs/disk.img"}]}
    out = absolute_paths(data, base)
    assert out == {"name": "g", "kernel": "/srv/guests/k/vmlinuz", "initrd": "/abs/initrd",
                   "cmdline": "root=relative/not/a/path",
                   "console": {"log": "/srv/guests/logs/g.log"},
                   "security": {"image_roots": ["/srv/guests", "/images"]},
                   "disk": [{"path": "/srv/guests/d.qcow2", "format": "qcow2",
                             "backing": [{"path": "/srv/guests/../base.raw",
                                          "format": "raw"}]},
                            {"path": "/abs/disk.img"}]}
    assert data["kernel"] == "k/vmlinuz"  # the input is left as it was
    assert absolute_paths(out, Path("/elsewhere")) == out


@pytest.mark.parametrize(("word", "command", "written"), [
    ("/usr/bin/svirt", True, "/usr/bin/svirt"),
    ("/opt/my svirt/bin/svirt", True, '"/opt/my svirt/bin/svirt"'),
    ("/opt/100%/svirt", True, "/opt/100%%/svirt"),
    ("/opt/$HOME/svirt", True, "/opt/$$HOME/svirt"),
    ('SVIRT_CONFIG=/a "b"\\c', False, '"SVIRT_CONFIG=/a \\"b\\"\\\\c"'),
    ("SVIRT_RUN_DIR=/run/$x", False, "SVIRT_RUN_DIR=/run/$x"),
])
def test_systemd_words(word: str, command: bool, written: str) -> None:
    assert systemd_word(word, command=command) == written


def test_templates_are_package_data() -> None:
    unit = template("svirt-guests.service")
    for line in ("Type=oneshot", "RemainAfterExit=yes", "After=network-online.target",
                 "Wants=network-online.target", "ExecStart=-@SVIRT@ start --enabled",
                 "ExecStop=@SVIRT@ stop --all", "WantedBy=multi-user.target"):
        assert line in unit.splitlines()
    script = template("svirt-guests.init")
    assert "# Required-Start:    $network $remote_fs" in script.splitlines()
    assert "Restart=on-failure" in template("svirt-guest.service").splitlines()
