"""Bad input through the real ``svirt`` script: one ``svirt: error:`` line, an exit code.

Never a traceback and never a hang: binary garbage, bad TOML, a FIFO or a
directory as the spec, huge numbers, names that read as options, and the
read-only verbs run as an unprivileged user.
"""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from svirt import cli
from svirt.cli import host as cli_host

from .helpers import SVIRT

NOBODY = 65534


def drop_to_nobody() -> None:  # pragma: no cover - runs in the child
    os.setgroups([])
    os.setresgid(NOBODY, NOBODY, NOBODY)
    os.setresuid(NOBODY, NOBODY, NOBODY)


def svirt(*args: str, nobody: bool = False,
          timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [SVIRT, *args], capture_output=True, text=True, timeout=timeout, check=False,
        cwd="/", stdin=subprocess.DEVNULL, preexec_fn=drop_to_nobody if nobody else None,
    )


def assert_one_error(out: subprocess.CompletedProcess[str], rc: int, what: str = "") -> str:
    """Exit code ``rc``, exactly one ``svirt: error:`` line (plus hints/warnings), no traceback."""
    assert "Traceback" not in out.stderr, out.stderr
    assert out.returncode == rc, (out.returncode, out.stderr)
    lines = out.stderr.splitlines()
    errors = [line for line in lines if line.startswith("svirt: error: ")]
    assert len(errors) == 1, out.stderr
    for line in lines:
        assert line.startswith(("svirt: error: ", "svirt: hint: ", "svirt: warning: ")), line
    assert what in errors[0], errors[0]
    return errors[0]


@pytest.fixture
def spec_dir(image_dir: Path) -> Iterator[Path]:
    """A directory other users may traverse, with a kernel in it."""
    (image_dir / "vmlinuz").write_bytes(b"kernel")
    (image_dir / "vmlinuz").chmod(0o644)
    yield image_dir


BASE = b'name = "web1"\nkernel = "vmlinuz"\n'

BAD_SPECS: list[tuple[str, bytes, str]] = [
    ("bad-toml", b'name = "web1"\nkernel = \n', "not valid TOML"),
    ("duplicate-key", BASE + b'name = "again"\n', "not valid TOML"),
    ("binary", b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)) * 4, "not UTF-8"),
    ("nul-bytes", b"\0" * 64, "not valid TOML"),
    ("latin1", BASE + 'cmdline = "caf\xe9"\n'.encode("latin-1"), "not UTF-8 (byte 47, line 3)"),
    ("deep-arrays", BASE + b"x = " + b"[" * 50_000 + b"]" * 50_000 + b"\n", "nested too deeply"),
    ("deep-tables", BASE + b"console = " + b"{a = " * 3000 + b"1" + b"}" * 3000 + b"\n",
     "nested too deeply"),
    ("long-int", BASE + b"memory = " + b"9" * 5000 + b"\n", "a number too long to read"),
    ("huge-memory", BASE + b"memory = " + b"9" * 400 + b"\n", "memory: ~10^"),
    ("huge-memory-string", BASE + b'memory = "99999999999999999999G"\n',
     "MiB is more than this host's"),
    ("long-memory-string", BASE + b'memory = "' + b"9" * 500 + b'G"\n',
     "memory: expected MiB or a size like '256M'"),
    ("memory-spaces", BASE + b'memory = "1' + b" " * 100_000 + b'x"\n', "memory: expected MiB"),
    ("huge-vcpus", BASE + b"vcpus = 100000000000000000000000000000\n", "vcpus: "),
    ("inf-timeout", BASE + b"shutdown_timeout = inf\n", "between 0 and 3600"),
    ("nan-timeout", BASE + b"shutdown_timeout = nan\n", "between 0 and 3600"),
    ("huge-timeout", BASE + b"shutdown_timeout = 1e400\n", "between 0 and 3600"),
    ("dash-name", b'name = "-rf"\nkernel = "vmlinuz"\n', "name: '-rf' may not start with '-'"),
    ("dash-netns", BASE + b'netns = "-n"\n', "netns: '-n' is not a network namespace name"),
    ("dotdot-netns", BASE + b'netns = ".."\n', "netns: '..' is not"),
    ("dash-bridge", BASE + b'[[nic]]\nbridge = "-b"\n', "nic[0].bridge: '-b' is not"),
    ("long-kernel", b'name = "a"\nkernel = "' + b"x" * 5000 + b'"\n', "File name too long"),
    ("newline-kernel", b'name = "a"\nkernel = "a\\nb"\n', "kernel: "),
    ("ints-for-disks", BASE + b"disk = [1, 2]\n", "disk[0]: expected a table"),
    ("array-for-console", BASE + b"console = [1]\n", "console: expected a table"),
    ("nested-roots", BASE + b"[security]\nimage_roots = [[1]]\n", "security.image_roots"),
    ("date-uuid", BASE + b"uuid = 1979-05-27\n", "uuid: expected a string, got date"),
    ("odd-key", BASE + b'"a\\nb" = 1\n', "unknown key"),
    ("too-large", BASE + (b"#" * 1023 + b"\n") * 1100, "more than a spec may have"),
]


@pytest.mark.parametrize(("body", "what"), [(b, w) for _, b, w in BAD_SPECS],
                         ids=[i for i, _, _ in BAD_SPECS])
def test_bad_spec_is_one_line_and_exit_2(spec_dir: Path, body: bytes, what: str) -> None:
    spec = spec_dir / "guest.toml"
    spec.write_bytes(body)
    for verb in ("check", "run"):
        out = svirt(verb, str(spec))
        line = assert_one_error(out, 2, what)
        assert line.startswith(f"svirt: error: {spec}: ")
        assert len(line) < 1000


def test_fifo_as_spec_does_not_hang(spec_dir: Path) -> None:
    fifo = spec_dir / "fifo.toml"
    os.mkfifo(fifo)
    out = svirt("check", str(fifo), timeout=10)
    assert_one_error(out, 2, f"{fifo}: not a regular file")


def test_directory_as_spec(spec_dir: Path) -> None:
    assert_one_error(svirt("check", str(spec_dir)), 2, f"{spec_dir}: is a directory")


@pytest.mark.parametrize("device", ["/dev/zero", "/dev/null", "/dev/tty"])
def test_device_as_spec(device: str) -> None:
    if not os.path.exists(device):
        pytest.skip(f"{device} is missing")
    assert_one_error(svirt("check", device, timeout=10), 2, f"{device}: ")


def test_odd_spec_paths() -> None:
    assert_one_error(svirt("check", "/nonexistent/guest.toml"), 2, "no such file")
    assert_one_error(svirt("check", "x" * 5000), 2, "File name too long")
    assert_one_error(svirt("check", "/etc/passwd/x"), 2, "Not a directory")
    out = svirt("check", "a\nb.toml")
    assert_one_error(out, 2, "a\\nb.toml")


def test_spec_nobody_may_not_read(spec_dir: Path) -> None:
    spec = spec_dir / "secret.toml"
    spec.write_bytes(BASE)
    spec.chmod(0o600)
    assert_one_error(svirt("check", str(spec), nobody=True), 2, "Permission denied")


# ------------------------------------------------------------- not root


def test_run_as_nobody_says_must_be_root(spec_dir: Path) -> None:
    spec = spec_dir / "guest.toml"
    spec.write_bytes(BASE)
    spec.chmod(0o644)
    assert_one_error(svirt("run", str(spec), nobody=True), 1, "svirt run must be root")
    spec.write_bytes(b"garbage \xff")  # still about root, before the spec is read
    assert_one_error(svirt("run", str(spec), nobody=True), 1, "must be root")
    for verb in (["start", str(spec)], ["stop", "g"], ["kill", "g"], ["restart", "g"],
                 ["stop", "--all"], ["start", "--enabled"]):
        assert_one_error(svirt(*verb, nobody=True), 1, f"svirt {verb[0]} must be root")


def test_check_as_nobody_works_or_says_why(spec_dir: Path) -> None:
    spec = spec_dir / "guest.toml"
    spec.write_bytes(BASE + b'[security]\nmodel = "none"\n')
    spec.chmod(0o644)
    out = svirt("check", str(spec), nobody=True)
    if out.returncode == 0:
        assert "Traceback" not in out.stderr and "argv:" in out.stdout
    else:
        assert_one_error(out, 1)
    spec.write_bytes(BASE)  # the default stack (DAC) needs root: one line says so
    out = svirt("check", str(spec), nobody=True)
    if out.returncode != 0:
        assert_one_error(out, 1)


def test_host_and_list_as_nobody(run_root: Path) -> None:
    out = svirt("host", nobody=True)
    assert out.returncode == 0 and "Traceback" not in out.stderr
    assert "kvm" in out.stdout
    for args in (["list"], ["list", "--json"], ["list", "-Z"], ["gc"]):
        out = svirt(*args, nobody=True)
        assert "Traceback" not in out.stderr, out.stderr
        if out.returncode != 0:
            assert_one_error(out, 1)


# ------------------------------------------- OSError escaping a verb


@pytest.mark.parametrize(
    ("err", "hint"),
    [
        (OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/run/svirt/guests/x.json"),
         "free some space"),
        (OSError(errno.EROFS, os.strerror(errno.EROFS), "/run/svirt"), "read-only"),
        (PermissionError(errno.EACCES, os.strerror(errno.EACCES), "/run/svirt"), None),
        (OSError(errno.EIO, "Input/output error"), None),
    ],
)
def test_oserror_from_a_verb_is_one_line(monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str],
                                         err: OSError, hint: str | None) -> None:
    def verb(args: object) -> int:
        raise err

    monkeypatch.setattr(cli_host, "cmd_gc", verb)
    assert cli.main(["gc"]) == 1
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == (f"svirt: error: {err.filename}: {err.strerror}" if err.filename
                        else f"svirt: error: {err.strerror}")
    if hint:
        assert len(lines) == 2 and hint in lines[1]


def test_unexpected_exception_is_one_line_unless_debugging(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    def verb(args: object) -> int:
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(cli_host, "cmd_gc", verb)
    monkeypatch.delenv("SVIRT_DEBUG", raising=False)
    assert cli.main(["gc"]) == 1
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "svirt: error: internal error: RuntimeError: boom\\nsecond line"
    assert lines[1].startswith("svirt: hint: this is a bug")
    monkeypatch.setenv("SVIRT_DEBUG", "1")
    with pytest.raises(RuntimeError):
        cli.main(["gc"])
