"""UML host options are the backend's: spec cmdline words UML would read itself are refused."""

from __future__ import annotations

import os
import re
import struct
from pathlib import Path

import pytest

from svirt.backends import uml_options
from svirt.backends.base import Prepared
from svirt.backends.uml import UmlBackend, build_uml_argv
from svirt.backends.uml_options import (
    FALLBACK_HELP,
    GUEST_KERNEL_OPTIONS,
    help_text,
    host_option_patterns,
    parse_help,
    refuse_host_options,
)
from svirt.errors import SpecError
from svirt.host import UML_BINARY, probe_host
from svirt.images.build import GUEST_MODES, guest_cmdline
from svirt.spec import Backend, GuestSpec

HOST_WORDS = [
    "ubd0=/etc/shadow", "ubd1=/etc/shadow", "ubd1rc=/x", "ubd7t=/x", "ubda=/x",
    "ubd0d=/x,/y", "hostfs=/", "con=null", "con0=fd:0,fd:1", "con1=file:/etc/passwd",
    "ssl=null", "ssl0=pts", "umid=other", "uml_dir=/root", "mem=4G", "eth0=tuntap,tap0",
    "eth12=daemon", "iomem=x,/dev/mem", "initrd=/etc/shadow", "mconsole=notify:/run/x",
    "vec0:transport=tap,ifname=tap0", "xterm=/bin/sh,-T,-e", "virtio_uml.device=/s:1",
    "noreboot", "nosysemu", "ssl-non-raw", "fake_ide", "udbx",
]
GUEST_WORDS = [
    "root=/dev/ubda", "console=tty0", "console=ttyS0", "quiet", "debug", "rdinit=/init",
    "init=/bin/sh", "panic=1", "loglevel=7", "consoleblank=0", "ro", "rw", "single",
    "memmap=1M", "svirt.mode=stay", "GLIBC_TUNABLES=glibc.cpu.hwcaps=-AVX",
]


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SVIRT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(uml_options, "_memo", {})


@pytest.fixture
def installed_uml() -> str:
    """The host's UML binary, as the product's own host probe finds it."""
    binary = probe_host().binary(UML_BINARY)
    if binary is None:
        pytest.skip("User-Mode-Linux is not installed (no 'linux' on PATH)")
    return binary.path


def uml_spec(tmp_path: Path, cmdline: str) -> GuestSpec:
    kernel = tmp_path / "linux"
    if not kernel.exists():
        kernel.write_bytes(b"\x7fELF")
    return GuestSpec(name="u", backend=Backend.UML, kernel=kernel, memory=64, cmdline=cmdline)


def refused(patterns: list[re.Pattern[str]], word: str) -> bool:
    return any(p.match(word) for p in patterns)


def tiny_guest_words() -> list[str]:
    extra = "svirt.net=10.0.0.2/24 svirt.ping=10.0.0.1,10.0.0.3 svirt.pingtries=3"
    return [w for mode in GUEST_MODES for w in guest_cmdline(mode, extra=extra).split()]


def test_installed_help_names_the_host_options(installed_uml: str) -> None:
    options = parse_help(help_text(installed_uml))
    headings = {o.heading for o in options}
    # the generic ones are listed too, and parsed: they are let through on purpose
    assert GUEST_KERNEL_OPTIONS <= headings
    host = [o.pattern for o in options if o.heading not in GUEST_KERNEL_OPTIONS]
    for word in HOST_WORDS:
        assert refused(host, word), word
    for word in [*GUEST_WORDS, *tiny_guest_words()]:
        assert not refused(host, word), word


def test_every_installed_option_is_in_the_fallback(installed_uml: str) -> None:
    """Debian 12's UML: the built-in list knows every option its --help lists."""
    fallback = {o.heading for o in parse_help("\n".join(FALLBACK_HELP))}
    missing = {o.heading for o in parse_help(help_text(installed_uml))} - fallback
    assert not missing, f"add to FALLBACK_HELP: {sorted(missing)}"


def test_installed_binary_patterns(installed_uml: str) -> None:
    patterns = host_option_patterns(installed_uml)
    for word in HOST_WORDS:
        assert refused(patterns, word), word
    for word in [*GUEST_WORDS, *tiny_guest_words()]:
        assert not refused(patterns, word), word


@pytest.mark.parametrize("binary", [None, "/nonexistent/linux", "/bin/false"])
def test_fallback_without_a_usable_binary(binary: str | None) -> None:
    patterns = host_option_patterns(binary)
    for word in HOST_WORDS:
        assert refused(patterns, word), word
    for word in [*GUEST_WORDS, *tiny_guest_words()]:
        assert not refused(patterns, word), word


def fake_uml(tmp_path: Path, option: str) -> Path:
    """A minimal ELF64 file shaped like UML: a .uml.help.init section of
    pointers to help strings (what svirt reads; it never runs the binary)."""
    binary = tmp_path / "fake-linux"
    write_fake_uml(binary, option)
    return binary


def write_fake_uml(binary: Path, option: str) -> None:
    text = f"{option}\n    A new host option.\n    Example: frobnicate=/x\n\n".encode()
    rodata = text + b"\0"
    names = b"\0.rodata\0.uml.help.init\0.shstrtab\0"
    base = 0x60000000
    ro_off = 64
    help_off = ro_off + len(rodata) + (-(ro_off + len(rodata)) % 8)
    names_off = help_off + 8
    sh_off = names_off + len(names) + (-(names_off + len(names)) % 8)
    header = bytearray(64)
    header[:6] = b"\x7fELF\x02\x01"
    struct.pack_into("<Q", header, 0x28, sh_off)
    struct.pack_into("<HHH", header, 0x3A, 64, 4, 3)
    body = bytearray(sh_off - 64)
    body[0:len(rodata)] = rodata
    struct.pack_into("<Q", body, help_off - 64, base + ro_off)
    body[names_off - 64:names_off - 64 + len(names)] = names
    sections = [
        (0, 0, 0, 0, 0, 0),
        (1, 1, 2, base + ro_off, ro_off, len(rodata)),
        (9, 1, 3, base + help_off, help_off, 8),
        (24, 3, 0, 0, names_off, len(names)),
    ]
    table = b"".join(struct.pack("<IIQQQQ", *sec) + bytes(24) for sec in sections)
    binary.write_bytes(bytes(header) + bytes(body) + table)
    binary.chmod(0o755)


def test_binary_help_is_parsed_and_cached(tmp_path: Path) -> None:
    binary = fake_uml(tmp_path, "frob[0-9]*=<file>,<flags>")
    assert refused(host_option_patterns(binary), "frob3=/etc/shadow")
    assert not refused(host_option_patterns(None), "frob3=/etc/shadow")
    assert refused(host_option_patterns(binary), "hostfs=/")  # the built-in list stays
    uml_options._memo.clear()
    assert refused(host_option_patterns(binary), "frob=/x")
    cache = tmp_path / "cache" / "uml-options.json"
    assert "frob[0-9]*=" in cache.read_text()
    # a new binary (other size or mtime) is read again
    write_fake_uml(binary, "zork=<file>")
    os.utime(binary, ns=(0, 10**18))
    uml_options._memo.clear()
    assert refused(host_option_patterns(binary), "zork=/x")


def test_the_help_of_the_installed_uml_is_read_without_running_it() -> None:
    import shutil
    import subprocess

    from svirt.backends.uml_options import help_text

    uml = shutil.which("linux.uml") or shutil.which("linux")
    if uml is None:
        pytest.skip("User-Mode-Linux is not installed")
    ran = subprocess.run([uml, "--help"], capture_output=True, text=True, check=False,
                         timeout=30).stdout
    read = help_text(uml)
    assert read and [line for line in read.splitlines() if line.strip()] == [
        line for line in ran.splitlines() if line.strip()][2:]


def test_a_bad_cache_only_adds(tmp_path: Path) -> None:
    binary = fake_uml(tmp_path, "frob=<file>")
    host_option_patterns(binary)
    cache = tmp_path / "cache" / "uml-options.json"
    cache.write_text(cache.read_text().replace('"frob="', '"(.*"'))
    uml_options._memo.clear()
    patterns = host_option_patterns(binary)
    assert refused(patterns, "ubd0=/etc/shadow") and not refused(patterns, "quiet")
    cache.write_text("[1, 2")
    uml_options._memo.clear()
    assert refused(host_option_patterns(binary), "frob=/x")  # unreadable: asked again


@pytest.mark.parametrize("word", [*HOST_WORDS, '"ubd1=/etc/shadow"', "uml-dir=/x",
                                  "virtio-uml.device=/s:1"])
def test_refused_with_the_word_and_a_hint(tmp_path: Path, word: str) -> None:
    spec = uml_spec(tmp_path, f"quiet {word} root=/dev/ubda")
    with pytest.raises(SpecError) as info:
        refuse_host_options(spec)
    err = info.value
    assert err.key == "cmdline"
    assert repr(word) in err.message and "host option" in err.message
    assert err.hint and "sets" in err.hint
    assert "\n" not in err.message


@pytest.mark.parametrize("word", ["--help", "--version", "--showconfig", "-s", "--", "-"])
def test_dash_words_are_refused(tmp_path: Path, word: str) -> None:
    with pytest.raises(SpecError, match="starting with '-'"):
        refuse_host_options(uml_spec(tmp_path, f"quiet {word}"))


def test_tiny_guest_cmdlines_pass(tmp_path: Path) -> None:
    refuse_host_options(uml_spec(tmp_path, " ".join([*GUEST_WORDS, *tiny_guest_words()])))
    refuse_host_options(uml_spec(tmp_path, ""))


def test_long_words_are_shortened(tmp_path: Path) -> None:
    with pytest.raises(SpecError) as info:
        refuse_host_options(uml_spec(tmp_path, "ubd0=/" + "x" * 5000))
    assert len(info.value.message) < 300


def test_preflight_refuses_first(tmp_path: Path) -> None:
    """Before the kernel check or anything else: the kernel here is not executable."""
    spec = uml_spec(tmp_path, "hostfs=/")
    with pytest.raises(SpecError, match="hostfs="):
        UmlBackend().preflight(spec, probe_host())


def test_backend_words_are_not_the_spec_s(tmp_path: Path) -> None:
    """The backend's own argv words are what the refusal protects."""
    spec = uml_spec(tmp_path, "")
    argv = build_uml_argv(spec, Prepared(run_dir=tmp_path))
    patterns = host_option_patterns(None)
    backend_words = [w for w in argv[1:] if w != "console=tty0"]
    assert backend_words and all(refused(patterns, w) for w in backend_words)
