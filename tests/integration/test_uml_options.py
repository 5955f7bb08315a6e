"""A UML spec whose cmdline carries a host option: exit 2, one error line, nothing touched."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from svirt.host import UML_BINARY, probe_host

from .helpers import svirt_cli


@pytest.fixture
def uml_kernel() -> str:
    binary = probe_host().binary(UML_BINARY)
    if binary is None:
        pytest.skip("User-Mode-Linux is not installed (no 'linux' on PATH)")
    return binary.path


def snapshot(path: Path) -> tuple[object, ...]:
    st = os.stat(path, follow_symlinks=False)
    xattrs = {n: os.getxattr(path, n, follow_symlinks=False) for n in
              os.listxattr(path, follow_symlinks=False)}
    return (st.st_uid, st.st_gid, st.st_mode, st.st_ctime_ns, st.st_mtime_ns, xattrs)


def tree(root: Path) -> dict[str, tuple[object, ...]]:
    return {str(p): snapshot(p) for p in [root, *sorted(root.rglob("*"))]}


def assert_one_error(out: subprocess.CompletedProcess[str], what: str) -> None:
    assert "Traceback" not in out.stderr, out.stderr
    assert out.returncode == 2, (out.returncode, out.stderr)
    lines = out.stderr.splitlines()
    errors = [line for line in lines if line.startswith("svirt: error: ")]
    assert len(errors) == 1, out.stderr
    assert all(line.startswith(("svirt: error: ", "svirt: hint: ")) for line in lines), lines
    assert "cmdline:" in errors[0] and what in errors[0] and "host option" in errors[0]
    assert out.stdout == "", out.stdout


@pytest.mark.parametrize("verb", ["check", "run"])
@pytest.mark.parametrize("cmdline", ["ubd1=/etc/shadow", "hostfs=/"])
def test_host_option_in_cmdline_is_refused(verb: str, cmdline: str, uml_kernel: str,
                                           image_dir: Path, run_root: Path) -> None:
    disk = image_dir / "d.img"
    disk.write_bytes(b"\0" * 4096)
    spec = image_dir / "g.toml"
    spec.write_text(
        f'name = "hostopt"\nbackend = "uml"\nkernel = "{uml_kernel}"\nmemory = 64\n'
        f'cmdline = "quiet {cmdline}"\nshutdown_timeout = 5\n'
        f'[[disk]]\npath = "{disk}"\n'
    )
    watched = [Path("/etc/shadow"), disk, image_dir]
    before = ([snapshot(p) for p in watched], tree(run_root))
    out = svirt_cli(verb, str(spec), timeout=60)
    assert_one_error(out, repr(cmdline))
    assert ([snapshot(p) for p in watched], tree(run_root)) == before
