"""UML on AMX hosts: the probe and the argv word (its seccomp program:
tests/unit/test_seccomp.py)."""

from __future__ import annotations

from pathlib import Path

from svirt.backends.base import Prepared
from svirt.backends.uml import NO_AVX_TUNABLES, build_uml_argv
from svirt.host import probe_uml_xstate_fallback
from svirt.spec import Backend, GuestSpec


def test_probe_reads_the_amx_flag(tmp_path: Path) -> None:
    amx = tmp_path / "amx"
    amx.write_text("processor : 0\nflags : fpu sse avx512f amx_tile amx_int8\n")
    plain = tmp_path / "plain"
    plain.write_text("processor : 0\nflags : fpu sse avx2 avx512f\n")
    assert probe_uml_xstate_fallback(amx) is True
    assert probe_uml_xstate_fallback(plain) is False
    assert probe_uml_xstate_fallback(tmp_path / "missing") is False


def test_no_avx_word_only_when_asked(tmp_path: Path) -> None:
    kernel = tmp_path / "linux"
    kernel.write_bytes(b"\x7fELF")
    spec = GuestSpec(name="u", backend=Backend.UML, kernel=kernel, memory=64)
    assert NO_AVX_TUNABLES not in build_uml_argv(spec, Prepared(run_dir=tmp_path))
    argv = build_uml_argv(spec, Prepared(run_dir=tmp_path, no_avx=True))
    assert NO_AVX_TUNABLES in argv
    assert argv.index(NO_AVX_TUNABLES) == argv.index("console=tty0") + 1

