"""Real UML and QEMU (TCG here) guests: boot, stop, panic, crash, Ctrl-C, chatty."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from svirt.errors import HostError
from svirt.host import HostInfo
from svirt.images.build import TinyGuest
from svirt.launcher.launch import Guest, launch
from svirt.launcher.registry import Registry
from svirt.launcher.supervisor import OutcomeKind, Step
from svirt.spec import Accel, Backend, Console, ConsoleMode
from svirt.testing import require_kvm, tiny_spec

from .helpers import SVIRT, wait_for, write_spec

BACKENDS = [Backend.UML, Backend.QEMU]


def _tiny(backend: Backend, tiny_uml: TinyGuest, tiny_qemu: TinyGuest) -> TinyGuest:
    return tiny_uml if backend is Backend.UML else tiny_qemu


@pytest.mark.parametrize("backend", BACKENDS)
def test_boots_to_marker_and_stops_gracefully(
    backend: Backend, tiny_uml: TinyGuest, tiny_qemu: TinyGuest,
    launch_guest: Callable[..., Guest],
) -> None:
    guest = launch_guest(tiny_spec(_tiny(backend, tiny_uml, tiny_qemu), f"boot-{backend}",
                                   backend))
    guest.console.expect_line("SVIRT-READY", timeout=90)
    assert guest.running
    outcome = guest.stop()
    assert outcome.kind is OutcomeKind.POWEROFF, outcome
    assert outcome.step is Step.GRACEFUL  # mconsole cad / QMP system_powerdown did it
    assert "SVIRT-POWEROFF" in guest.console.text()


@pytest.mark.parametrize("backend", BACKENDS)
def test_guest_that_powers_off_by_itself(
    backend: Backend, tiny_uml: TinyGuest, tiny_qemu: TinyGuest,
    launch_guest: Callable[..., Guest],
) -> None:
    guest = launch_guest(tiny_spec(_tiny(backend, tiny_uml, tiny_qemu), f"self-{backend}",
                                   backend, mode="poweroff"))
    outcome = guest.wait(90)
    assert outcome is not None and outcome.kind is OutcomeKind.POWEROFF, outcome
    assert outcome.step is Step.NONE
    assert outcome.exit_code == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_panic_is_reported_as_panic(
    backend: Backend, tiny_uml: TinyGuest, tiny_qemu: TinyGuest,
    launch_guest: Callable[..., Guest],
) -> None:
    guest = launch_guest(tiny_spec(_tiny(backend, tiny_uml, tiny_qemu), f"panic-{backend}",
                                   backend, mode="panic", extra_cmdline="panic=-1"))
    outcome = guest.wait(90)
    assert outcome is not None, "the hypervisor did not end after the guest panicked"
    assert outcome.kind is OutcomeKind.PANIC, outcome


@pytest.mark.parametrize("backend", BACKENDS)
def test_sigkill_of_hypervisor_is_a_crash(
    backend: Backend, tiny_uml: TinyGuest, tiny_qemu: TinyGuest,
    launch_guest: Callable[..., Guest],
) -> None:
    guest = launch_guest(tiny_spec(_tiny(backend, tiny_uml, tiny_qemu), f"kill-{backend}",
                                   backend))
    guest.console.expect_line("SVIRT-READY", timeout=90)
    os.kill(guest.pid, signal.SIGKILL)
    outcome = guest.wait(10)
    assert outcome is not None
    assert outcome.kind is OutcomeKind.CRASH
    assert outcome.signal == signal.SIGKILL


@pytest.mark.parametrize("backend", BACKENDS)
def test_chatty_guest_never_deadlocks_the_console(
    backend: Backend, tiny_uml: TinyGuest, tiny_qemu: TinyGuest,
    launch_guest: Callable[..., Guest], image_dir: Path,
) -> None:
    log = image_dir / f"chatty-{backend}.log"
    spec = tiny_spec(_tiny(backend, tiny_uml, tiny_qemu), f"chatty-{backend}", backend,
                     mode="chatty", console=Console(log=log), extra_cmdline="quiet")
    guest = launch_guest(spec)
    outcome = guest.wait(120)
    assert outcome is not None and outcome.kind is OutcomeKind.POWEROFF, outcome
    assert guest.console.total >= 1_000_000
    # a kernel message may land inside a line of the flood: look for the text
    assert "SVIRT-READY" in guest.console.text()
    assert log.stat().st_size >= 1_000_000  # everything reached the log too


def test_console_log_gets_everything(
    tiny_uml: TinyGuest, launch_guest: Callable[..., Guest], image_dir: Path
) -> None:
    log = image_dir / "uml.log"
    guest = launch_guest(tiny_spec(tiny_uml, "logged", Backend.UML, mode="poweroff",
                                   console=Console(log=log)))
    assert guest.wait(60) is not None
    assert "SVIRT-READY" in log.read_text(errors="replace")


def test_ctrl_c_during_svirt_run_stops_guest_and_leaves_nothing(
    tiny_uml: TinyGuest, image_dir: Path, run_root: Path
) -> None:
    spec = write_spec(image_dir / "g.toml", "ctrlc", "uml", tiny_uml)
    proc = subprocess.Popen([SVIRT, "run", str(spec)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={**os.environ,
                                                         "SVIRT_RUN_DIR": str(run_root)})
    assert proc.stdout is not None
    seen = b""
    deadline = time.monotonic() + 60
    while b"\nSVIRT-READY" not in seen and time.monotonic() < deadline:
        chunk = os.read(proc.stdout.fileno(), 4096)
        if not chunk:
            break
        seen += chunk
    assert b"SVIRT-READY" in seen
    records = Registry(run_root).records()
    assert len(records) == 1 and records[0].hypervisor is not None
    hv_pid = records[0].hypervisor.pid
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err  # graceful stop: the guest powered off on request
    assert b"powered off on request" in err
    assert wait_for(lambda: not os.path.exists(f"/proc/{hv_pid}"), 5)
    assert Registry(run_root).records() == []
    assert not any(run_root.joinpath("guests").iterdir())


def test_sigterm_to_svirt_run_stops_guest(
    tiny_qemu: TinyGuest, image_dir: Path, run_root: Path
) -> None:
    spec = write_spec(image_dir / "g.toml", "sigterm", "qemu", tiny_qemu)
    proc = subprocess.Popen([SVIRT, "run", "--console", "stdio", str(spec)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "SVIRT_RUN_DIR": str(run_root)})
    assert proc.stdout is not None
    seen = b""
    while b"\nSVIRT-READY" not in seen:
        chunk = os.read(proc.stdout.fileno(), 4096)
        assert chunk, "svirt run ended before the marker"
        seen += chunk
    hv = Registry(run_root).records()[0].hypervisor
    assert hv is not None
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    assert proc.returncode == 0
    assert not os.path.exists(f"/proc/{hv.pid}")


def test_accel_kvm_fails_before_launch_when_kvm_cannot_boot(
    host: HostInfo, tiny_qemu: TinyGuest, registry: Registry
) -> None:
    if host.kvm.usable:
        pytest.skip(f"KVM boots standard guests here ({host.kvm.reason})")
    spec = tiny_spec(tiny_qemu, "kvm-required", Backend.QEMU, accel=Accel.KVM)
    with pytest.raises(HostError) as info:
        with launch(spec, registry=registry):
            pass
    assert host.kvm.reason in info.value.message
    assert registry.records() == []


def test_qemu_kvm_guest_boots(
    host: HostInfo, tiny_qemu: TinyGuest, launch_guest: Callable[..., Guest]
) -> None:
    require_kvm(host)
    guest = launch_guest(tiny_spec(tiny_qemu, "kvm", Backend.QEMU, accel=Accel.KVM))
    guest.console.expect_line("SVIRT-READY", timeout=60)
    assert guest.stop().kind is OutcomeKind.POWEROFF


def test_svirt_run_exit_code_for_panic(tiny_uml: TinyGuest, image_dir: Path,
                                       run_root: Path) -> None:
    spec = write_spec(image_dir / "p.toml", "runpanic", "uml", tiny_uml, mode="panic")
    proc = subprocess.run([SVIRT, "run", "--console", "none", str(spec)], capture_output=True,
                          text=True, timeout=90,
                          env={**os.environ, "SVIRT_RUN_DIR": str(run_root)})
    assert proc.returncode == 3, proc.stderr
    assert "panic" in proc.stderr


def test_pty_console_carries_output(
    tiny_uml: TinyGuest, launch_guest: Callable[..., Guest]
) -> None:
    guest = launch_guest(tiny_spec(tiny_uml, "pty", Backend.UML,
                                   console=Console(mode=ConsoleMode.PTY)))
    assert guest.console_pty is not None and guest.console_pty.startswith("/dev/pts/")
    fd = os.open(guest.console_pty, os.O_RDWR | os.O_NOCTTY)
    try:
        guest.console.expect_line("SVIRT-READY", timeout=60)
        seen = b""
        deadline = time.monotonic() + 10
        while b"SVIRT-READY" not in seen and time.monotonic() < deadline:
            seen += os.read(fd, 65536)
        assert b"SVIRT-READY" in seen
    finally:
        os.close(fd)
    assert guest.stop().kind is OutcomeKind.POWEROFF
