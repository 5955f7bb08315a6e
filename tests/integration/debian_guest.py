"""The built Debian image booted with plain QEMU under TCG (not through
svirt: the firmware wiring of the launcher is another change), through
SeaBIOS or OVMF, with a NoCloud seed made by :mod:`svirt.images.seed`,
reached through qemu-ga on a socket root binds and hands to QEMU as a
listening fd, as the launcher will.

QEMU runs as an unprivileged uid of the test's own range with ``-sandbox``;
the cached image is opened ``snapshot=on`` (QEMU's temporary overlay in the
work directory), never written.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from svirt.agent import PORT_NAME, AgentClient
from svirt.backends.qemu import SANDBOX
from svirt.errors import AgentError
from svirt.images.firmware import OVMF_CODE, OVMF_VARS
from svirt.images.seed import CloudInit, build_iso, seed_files
from svirt.launcher.channels import listen_private

from .host_agent import kill_uid

AGENT_FD = 51
#: TCG on 2 busy cores: about 45 s to the agent when idle
BOOT_SECONDS = 420
UID_OFFSET = 90_002
HOSTNAME = "svirt-debian"
MARKER = "written-by-cloud-init"
USER_DATA = f"""#cloud-config
write_files:
- path: /run/svirt-cloud-init
  content: {MARKER}
"""


def guest_uid() -> int:
    return int(os.environ.get("SVIRT_UID_BASE", "3800000")) + UID_OFFSET


@dataclass
class DebianGuest:
    client: AgentClient
    firmware: str
    #: QEMU start to the first answer of qemu-ga, and to cloud-init's hostname
    agent_seconds: float
    hostname_seconds: float
    console: Path
    process: subprocess.Popen[bytes]


def _argv(image: Path, work: Path, firmware: str) -> list[str]:
    argv = ["qemu-system-x86_64", "-nodefaults", "-no-user-config", "-nographic",
            "-accel", "tcg", "-m", "1024", "-smp", "2", "-no-reboot", "-sandbox", SANDBOX,
            "-drive", f"file={image},format=qcow2,if=virtio,snapshot=on",
            "-drive", f"file={work / 'seed.iso'},format=raw,if=virtio,readonly=on",
            "-serial", f"file:{work / 'console.log'}", "-monitor", "none", "-nic", "none",
            "-chardev", f"socket,id=qga0,fd={AGENT_FD},server=on,wait=off",
            "-device", "virtio-serial-pci,id=vser0",
            "-device", f"virtserialport,bus=vser0.0,chardev=qga0,name={PORT_NAME}"]
    if firmware == "uefi":
        argv += ["-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}",
                 "-drive", f"if=pflash,format=raw,unit=1,file={work / 'vars.fd'}"]
    return argv


def _prepare(work: Path, uid: int, firmware: str) -> None:
    files = seed_files(CloudInit(user_data=USER_DATA), uuid=f"svirt-test-{firmware}",
                       name=HOSTNAME)
    (work / "seed.iso").write_bytes(build_iso(files))
    (work / "console.log").touch()
    os.chown(work / "console.log", uid, uid)
    if firmware == "uefi":
        shutil.copyfile(OVMF_VARS, work / "vars.fd")
        os.chown(work / "vars.fd", uid, uid)
    os.chown(work, uid, uid)  # QEMU's snapshot=on overlay goes here (TMPDIR)


def _wait_for(client: AgentClient, qemu: subprocess.Popen[bytes], start: float) -> float:
    while True:
        try:
            client.ping(timeout=2.0)
            return time.monotonic() - start
        except AgentError:
            if qemu.poll() is not None or time.monotonic() - start > BOOT_SECONDS:
                raise


def _wait_hostname(client: AgentClient, start: float) -> float:
    while True:
        if client.exec(["hostname"], timeout=30).stdout.strip() == HOSTNAME.encode():
            return time.monotonic() - start
        if time.monotonic() - start > BOOT_SECONDS:
            raise AssertionError("cloud-init did not set the hostname")
        time.sleep(0.5)


@contextlib.contextmanager
def debian_guest(image: Path, firmware: str) -> Iterator[DebianGuest]:
    """Boot ``image`` through ``firmware`` (``bios`` or ``uefi``); yield once
    qemu-ga answers and cloud-init has set the hostname."""
    work = Path(tempfile.mkdtemp(prefix=f"svirt-debian-{firmware}-", dir="/var/tmp"))
    work.chmod(0o755)
    run_dir = Path(tempfile.mkdtemp(prefix="svirt-debian-run-"))  # 0700 root: the socket
    uid = guest_uid()
    _prepare(work, uid, firmware)
    listener = listen_private(run_dir / "agent.sock")
    os.dup2(listener.fileno(), AGENT_FD, inheritable=True)
    listener.close()
    start = time.monotonic()
    try:
        qemu = subprocess.Popen(_argv(image, work, firmware), pass_fds=(AGENT_FD,),  # noqa: S603
                                user=uid, group=uid, extra_groups=[], cwd=work,
                                env={"PATH": "/usr/bin:/bin", "TMPDIR": str(work)},
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
    finally:
        os.close(AGENT_FD)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.connect(str(run_dir / "agent.sock"))
        client = AgentClient(sock, timeout=10.0)
        agent = _wait_for(client, qemu, start)
        hostname = _wait_hostname(client, start)
        yield DebianGuest(client, firmware, agent, hostname, work / "console.log", qemu)
    finally:
        sock.close()
        qemu.kill()  # our own child, by its pid
        qemu.wait(timeout=30)
        kill_uid(uid)
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(run_dir, ignore_errors=True)
