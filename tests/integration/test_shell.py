"""Talking to a guest: Console.send, Guest.shell and ``svirt run SPEC -- COMMAND``,
on real UML and QEMU-TCG guests whose tiny /init runs a shell on the console."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from svirt.errors import ConsoleClosed, ConsoleTimeout
from svirt.images.build import TinyGuest
from svirt.launcher.launch import Guest
from svirt.spec import Backend
from svirt.testing import tiny_spec

from .helpers import svirt_cli, write_spec

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("backend", [Backend.UML, Backend.QEMU])
def test_shell_gives_exact_output_and_status(
    backend: Backend, tiny_uml: TinyGuest, tiny_qemu: TinyGuest,
    launch_guest: Callable[..., Guest],
) -> None:
    tiny = tiny_uml if backend is Backend.UML else tiny_qemu
    guest = launch_guest(tiny_spec(tiny, f"sh-{backend}", backend, mode="shell"))
    assert guest.shell("echo hello; echo to-stderr >&2; exit 3", timeout=90) == \
        (3, "hello\nto-stderr\n")
    assert guest.shell("printf 'no newline'") == (0, "no newline")
    assert guest.shell("true") == (0, "")
    # a comment, quotes, a line the command reads from stdin (it gets /dev/null)
    assert guest.shell("echo 'a  b' \"$((6 * 7))\" # ) trailing comment") == (0, "a  b 42\n")
    assert guest.shell("cat; echo after-cat") == (0, "after-cat\n")
    # exit ends only the command's subshell: the shell stays
    assert guest.shell("exit 0")[0] == 0 and guest.shell("echo still")[1] == "still\n"
    # kernel noise around a command does not leak into its output
    status, out = guest.shell("echo before >/dev/kmsg; echo out; echo after >/dev/kmsg")
    assert (status, out) == (0, "out\n")
    big = guest.shell("i=0; while [ $i -lt 2000 ]; do echo line-$i; i=$((i+1)); done")[1]
    assert big.splitlines() == [f"line-{i}" for i in range(2000)]
    assert guest.stop().ok


def test_send_types_into_the_console(tiny_uml: TinyGuest,
                                     launch_guest: Callable[..., Guest]) -> None:
    guest = launch_guest(tiny_spec(tiny_uml, "sh-send", Backend.UML, mode="shell"))
    guest.shell("true", timeout=60)  # the shell is up
    guest.console.sendline("echo typed-$((40 + 2))")
    guest.console.expect_line("typed-42", timeout=10)
    guest.console.send(b"echo part")
    guest.console.send(b"ial\n")
    guest.console.expect_line("partial", timeout=10)
    assert guest.stop().ok
    with pytest.raises(ConsoleClosed):
        guest.console.send(b"echo too late\n", timeout=1)


def test_shell_on_a_guest_without_one_times_out_clearly(
    tiny_uml: TinyGuest, launch_guest: Callable[..., Guest],
) -> None:
    guest = launch_guest(tiny_spec(tiny_uml, "sh-none", Backend.UML, mode="stay"))
    guest.console.expect_line("SVIRT-READY", timeout=60)
    with pytest.raises(ConsoleTimeout) as info:
        guest.shell("echo hi", timeout=3)
    assert "no shell answers" in info.value.message and info.value.hint
    assert guest.stop().ok


def test_shell_on_a_guest_that_ended(tiny_uml: TinyGuest,
                                     launch_guest: Callable[..., Guest]) -> None:
    guest = launch_guest(tiny_spec(tiny_uml, "sh-gone", Backend.UML, mode="poweroff"))
    guest.wait(60)
    with pytest.raises((ConsoleTimeout, ConsoleClosed)):
        guest.shell("echo hi", timeout=5)


def test_cli_run_with_a_command(tiny_uml: TinyGuest, image_dir: Path, run_root: Path) -> None:
    spec = write_spec(image_dir / "cmd.toml", "sh-cli", "uml", tiny_uml, mode="shell")
    out = svirt_cli("run", str(spec), "--", "echo", "from-guest;", "uname", "-m;", "exit", "7",
                    timeout=120)
    assert out.returncode == 7, out.stderr
    assert out.stdout == "from-guest\nx86_64\n", out.stdout  # only the command's output
    assert "Linux version" not in out.stdout
    ok = svirt_cli("run", str(spec), "--", "true", timeout=120)
    assert (ok.returncode, ok.stdout) == (0, ""), ok.stderr
    assert list((run_root / "guests").glob("*.json")) == []  # released


def test_cli_run_command_without_a_shell_is_one_error(tiny_uml: TinyGuest, image_dir: Path,
                                                      run_root: Path) -> None:
    spec = write_spec(image_dir / "noshell.toml", "sh-cli2", "uml", tiny_uml, mode="poweroff")
    out = svirt_cli("run", "--timeout", "20", str(spec), "--", "true", timeout=120)
    assert out.returncode == 1
    assert "svirt: error:" in out.stderr and "Traceback" not in out.stderr
    assert list((run_root / "guests").glob("*.json")) == []
