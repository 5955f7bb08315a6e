"""svirt exec, svirt cp, Guest.exec and the cloud-init seed, through the real launch path.

One TCG guest for the module (agent_guest.py's initramfs: busybox and the
host's qemu-ga, plus virtio_blk for the seed disk), launched by
:func:`svirt.launcher.launch.launch` with ``agent = true`` and a
``[cloud_init]`` table: the agent's socket is the launcher's (bound in the
run directory, passed to QEMU as a listening fd), the seed the launch's
(written by fd, held private read-only).  Everything the tests see went
through QEMU's chardev, the virtio port and the guest's qemu-ga, and the
CLI runs in its own process, as a user's would.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from svirt.agent import exit_status
from svirt.errors import AgentError, GuestCommandNotExecutable, GuestCommandNotFound
from svirt.images.cache import resolve_cache
from svirt.images.kernels import qemu_kernel
from svirt.launcher.channels import AGENT_SOCKET
from svirt.launcher.launch import Guest, launch
from svirt.launcher.registry import Registry
from svirt.resources import SEED_NAME
from svirt.security.dac import ACL_XATTR, parse_acl
from svirt.spec import Accel, CloudInit, GuestSpec, spec_to_mapping
from svirt.testing import IMAGE_PARENT

from .agent_guest import BOOT_SECONDS, MODULES, build_initrd
from .helpers import SVIRT, as_uid, open_as, wait_for
from .host_agent import QEMU_GA

pytestmark = pytest.mark.skipif(
    not os.path.exists(QEMU_GA) or shutil.which("qemu-system-x86_64") is None,
    reason="needs qemu-ga (qemu-guest-agent) and qemu-system-x86_64")

NAME = "exec-guest"
USER_DATA = "#cloud-config\n# svirt-seed-marker-7c1f\n"


@dataclass
class Booted:
    guest: Guest
    registry: Registry
    images: Path
    boot_seconds: float

    @property
    def run_dir(self) -> Path:
        return self.registry.run_dir(NAME)


def agent_spec(images: Path, name: str = NAME, **more: object) -> GuestSpec:
    initrd = images / "initrd.gz"
    if not initrd.exists():
        build_initrd(initrd, (*MODULES, "virtio_blk"))
    return GuestSpec(name=name, kernel=qemu_kernel(resolve_cache(None)), initrd=initrd,
                     accel=Accel.TCG, memory=256, cmdline="quiet panic=-1", agent=True,
                     shutdown_timeout=1,  # busybox has no ACPI power button: the ladder goes on
                     **more)  # type: ignore[arg-type]


def wait_for_agent(guest: Guest, started: float) -> float:
    while True:
        try:
            guest.exec(["true"], timeout=3)
            return time.monotonic() - started
        except AgentError:
            if not guest.running or time.monotonic() - started > BOOT_SECONDS:
                raise


@pytest.fixture(scope="module")
def booted() -> Iterator[Booted]:
    root = Path(tempfile.mkdtemp(prefix="svirt-run-", dir="/run"))
    root.chmod(0o755)
    images = Path(tempfile.mkdtemp(prefix="svirt-img-", dir=IMAGE_PARENT))
    images.chmod(0o755)
    saved = os.environ.get("SVIRT_RUN_DIR")
    os.environ["SVIRT_RUN_DIR"] = str(root)  # the CLI's registry is this one
    try:
        registry = Registry(root)
        spec = agent_spec(images, cloud_init=CloudInit(user_data=USER_DATA))
        started = time.monotonic()
        with launch(spec, registry=registry) as guest:
            yield Booted(guest, registry, images, wait_for_agent(guest, started))
        assert not registry.run_dir(NAME).exists()  # seed and socket gone with it
    finally:
        if saved is None:
            os.environ.pop("SVIRT_RUN_DIR", None)
        else:
            os.environ["SVIRT_RUN_DIR"] = saved
        shutil.rmtree(images, ignore_errors=True)
        shutil.rmtree(root, ignore_errors=True)


def svirt(*args: str, input: bytes = b"", timeout: float = 120
          ) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([SVIRT, *args], input=input, capture_output=True,  # noqa: S603
                          timeout=timeout, check=False)


# ------------------------------------------------------------------ exec

def test_guest_exec_api(booted: Booted) -> None:
    result = booted.guest.exec(["sh", "-c", "printf out; printf err >&2; cat; exit 7"],
                               input=b"in\x00\xff")
    assert (result.returncode, result.stdout, result.stderr) == (7, b"outin\x00\xff", b"err")
    assert exit_status(result) == 7
    with pytest.raises(GuestCommandNotFound):
        booted.guest.exec(["no-such-command"])
    with pytest.raises(GuestCommandNotExecutable):
        booted.guest.exec(["/dev"])


def test_exec_cli_argv_streams_status_stdin(booted: Booted) -> None:
    odd = ["a b", "c'd", '"e"', "", "$HOME;x", "--", "-n"]
    done = svirt("exec", NAME, "--", "sh", "-c",
                 'printf "%s|" "$@"; printf E >&2; cat; exit 3', "sh", *odd,
                 input=b"\x00stdin\xff")
    assert done.returncode == 3, done.stderr
    assert done.stdout == ("|".join(odd) + "|").encode() + b"\x00stdin\xff"
    assert done.stderr == b"E"
    assert svirt("exec", "-n", NAME, "--", "cat", input=b"ignored").stdout == b""


def test_exec_cli_127_126_125(booted: Booted) -> None:
    missing = svirt("exec", NAME, "--", "no-such-command")
    assert missing.returncode == 127 and missing.stdout == b""
    assert missing.stderr.count(b"\n") == 1 and b"no-such-command" in missing.stderr
    cannot = svirt("exec", NAME, "--", "/dev")
    assert cannot.returncode == 126 and cannot.stderr.count(b"\n") == 1
    nobody = svirt("exec", "no-such-guest", "--", "true")
    assert nobody.returncode == 125 and b"no guest no-such-guest" in nobody.stderr


def test_exec_round_trip(booted: Booted) -> None:
    """Measured: Guest.exec and svirt exec of `true` (TCG, 2 busy cores)."""
    api, cli = [], []
    for _ in range(5):
        t = time.monotonic()
        booted.guest.exec(["true"])
        api.append(time.monotonic() - t)
        t = time.monotonic()
        assert svirt("exec", NAME, "--", "true").returncode == 0
        cli.append(time.monotonic() - t)
    print(f"\nboot to agent {booted.boot_seconds:.2f} s; exec round trip: Guest.exec "
          f"{statistics.median(api) * 1000:.0f} ms, svirt exec {statistics.median(cli) * 1000:.0f}"
          " ms (median of 5)")
    assert statistics.median(api) < 5 and statistics.median(cli) < 10


# ------------------------------------------------------------------ cp

def test_cp_both_ways_binary(booted: Booted) -> None:
    data = os.urandom((1 << 20) + 777)
    src, back = booted.images / "blob", booted.images / "back"
    src.write_bytes(data)
    assert svirt("cp", str(src), f"{NAME}:/tmp/blob").returncode == 0
    digest = booted.guest.exec(["sha256sum", "/tmp/blob"]).stdout.split()[0]
    assert digest == hashlib.sha256(data).hexdigest().encode()
    done = svirt("cp", f"{NAME}:/tmp/blob", str(back))
    assert done.returncode == 0, done.stderr
    assert back.read_bytes() == data
    again = svirt("cp", f"{NAME}:/tmp/blob", str(back))  # no --force: refused
    assert again.returncode == 125 and b"exists" in again.stderr
    assert svirt("cp", "--force", f"{NAME}:/tmp/blob", str(back)).returncode == 0
    missing = svirt("cp", f"{NAME}:/no/such", str(booted.images / "none"))
    assert missing.returncode == 125 and not (booted.images / "none").exists()


def test_cp_refuses_a_symlink_leaf(booted: Booted) -> None:
    canary = booted.images / "canary"
    canary.write_bytes(b"keep")
    link = booted.images / "link"
    link.symlink_to(canary)
    done = svirt("cp", "--force", f"{NAME}:/tmp/blob", str(link))
    assert done.returncode == 125 and canary.read_bytes() == b"keep"
    assert svirt("cp", str(link), f"{NAME}:/tmp/x").returncode == 125


# ------------------------------------------------------------------ the seed

def test_seed_in_the_guest_and_for_it_alone(booted: Booted) -> None:
    seen = booted.guest.exec(["cat", "/dev/vda"])
    assert seen.returncode == 0
    assert b"CIDATA" in seen.stdout.upper() and USER_DATA.encode() in seen.stdout
    assert f'"local-hostname": "{NAME}"'.encode() in seen.stdout
    assert booted.guest.exec(["sh", "-c", "echo x > /dev/vda"]).returncode != 0  # read-only
    seed = booted.run_dir / SEED_NAME
    st = seed.stat()
    uid = booted.guest.guest_uid
    assert uid is not None
    # root's, 0400, one ACL entry (the group bits show the ACL's mask: r)
    assert (st.st_uid, st.st_mode & 0o7707) == (0, 0o400)
    entries = {(tag, perm, who) for tag, perm, who in parse_acl(os.getxattr(seed, ACL_XATTR))}
    assert (0x02, 4, uid) in entries  # user:UID:r
    assert (0x04, 0, 0xFFFFFFFF) in entries and (0x20, 0, 0xFFFFFFFF) in entries  # group, other
    assert open_as(uid, uid, seed) == 0
    assert open_as(uid, uid, seed, os.O_WRONLY) == errno.EACCES
    assert open_as(uid + 1, uid + 1, seed) == errno.EACCES  # another guest's uid


def test_agent_socket_is_roots(booted: Booted) -> None:
    sock = booted.run_dir / AGENT_SOCKET
    st = sock.lstat()
    assert (st.st_uid, st.st_mode & 0o777) == (0, 0o600)
    run = booted.run_dir.stat()
    assert run.st_uid == 0 and not run.st_mode & 0o022  # the guest cannot swap it
    uid = booted.guest.guest_uid
    assert uid is not None
    assert connect_as(uid, sock) == errno.EACCES  # 0600 root: the guest cannot connect


def connect_as(uid: int, path: Path) -> int:
    """connect() to ``path`` in a child running as ``uid``: 0, else the errno."""
    def connect() -> None:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(2)
            s.connect(str(path))

    return as_uid(uid, connect)


def test_seed_gone_after_sigkill_and_gc(booted: Booted, tmp_path: Path) -> None:
    """A launcher killed with its guest running: gc releases the seed's
    labels and its run directory (storage mount) whole."""
    from svirt.service.enabled import to_toml

    spec = agent_spec(booted.images, name="exec-killed",
                      cloud_init=CloudInit(user_data=USER_DATA))
    path = booted.images / "killed.toml"
    path.write_text(to_toml(spec_to_mapping(spec)))
    proc = subprocess.Popen([sys.executable, "-m", "tests.integration.launcher_proc",  # noqa: S603
                             str(path)], stdout=subprocess.PIPE, cwd=Path(__file__).parents[2])
    try:
        assert proc.stdout is not None and proc.stdout.readline()
        seed = booted.registry.run_dir("exec-killed") / SEED_NAME
        assert seed.exists()
        os.kill(proc.pid, signal.SIGKILL)  # our own child, by its pid
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    done = svirt("gc")
    assert done.returncode == 0, done.stderr
    assert wait_for(lambda: not booted.registry.run_dir("exec-killed").exists(), 10)
    assert not booted.registry.record_path("exec-killed").exists()


def test_exec_in_a_detached_guest(booted: Booted) -> None:
    """svirt start: the guest's supervisor is another process, its agent
    socket the same kind; exec and cp reach it from yet another one."""
    from svirt.service.api import attach
    from svirt.service.enabled import to_toml

    path = booted.images / "detached.toml"
    path.write_text(to_toml(spec_to_mapping(agent_spec(booted.images, name="exec-detached"))))
    started = svirt("start", str(path), "--wait-for", "AGENT-PORT", "--timeout", "180",
                    timeout=240)
    assert started.returncode == 0, started.stderr
    try:
        assert wait_for(lambda: svirt("exec", "exec-detached", "--", "true").returncode == 0, 60)
        done = svirt("exec", "exec-detached", "--", "sh", "-c", "echo hi; echo ho >&2; exit 4")
        assert (done.returncode, done.stdout, done.stderr) == (4, b"hi\n", b"ho\n")
        handle = attach("exec-detached", registry=booted.registry)
        assert handle.exec(["printf", "%s", "a b"]).stdout == b"a b"
    finally:
        stopped = svirt("stop", "exec-detached", "--force")
    assert stopped.returncode == 5, stopped.stderr  # killed, as --force says
    assert svirt("exec", "exec-detached", "--", "true").returncode == 125
