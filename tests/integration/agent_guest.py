"""A real TCG guest running the real qemu-ga, reached the way svirt will reach it.

The guest: Debian's cloud kernel (the tiny QEMU guests' kernel, from the
image cache) and an initramfs of static busybox, the virtio-serial modules,
and the host's own qemu-ga with its shared libraries; its /init finds the
port named ``org.qemu.guest_agent.0`` in sysfs (no udev, so no
/dev/virtio-ports link) and execs qemu-ga on it.  QEMU 7.2 gets the port
as the launcher will give it: a socket root binds in a root-only directory,
handed over as a listening fd::

    -chardev socket,id=qga0,fd=N,server=on,wait=off
    -device virtio-serial-pci,id=vser0
    -device virtserialport,bus=vser0.0,chardev=qga0,name=org.qemu.guest_agent.0

QEMU runs as an unprivileged uid with ``-sandbox`` as svirt runs it (not in
svirt's jail: the launch path is wired to the agent after this change).
"""

from __future__ import annotations

import contextlib
import gzip
import os
import shutil
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, cast

from svirt.agent import PORT_NAME, AgentClient
from svirt.backends.qemu import SANDBOX
from svirt.errors import AgentError
from svirt.images.cache import resolve_cache
from svirt.images.cpio import CpioEntry, write_cpio
from svirt.images.kernels import qemu_kernel, qemu_kernel_tree
from svirt.images.kmod import kernel_modules
from svirt.launcher.channels import listen_private

from .host_agent import QEMU_GA, agent_uid, kill_uid

_DIR, _EXE, _FILE = stat.S_IFDIR | 0o755, stat.S_IFREG | 0o755, stat.S_IFREG | 0o644
_LINK = stat.S_IFLNK | 0o777
AGENT_FD = 50
BOOT_SECONDS = 120  # TCG on 2 busy cores: about 5 s when idle
APPLETS = ("sh", "mount", "insmod", "cat", "true", "sleep", "printf", "head", "id",
           "sha256sum", "wc", "kill", "ls")
INIT = f"""#!/bin/sh
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
for m in $(cat /modules.order); do insmod /lib/modules/$m.ko; done
n=0; dev=
while [ -z "$dev" ] && [ $n -lt 400 ]; do
  for p in /sys/class/virtio-ports/*; do
    [ "$(cat $p/name 2>/dev/null)" = {PORT_NAME} ] && dev=/dev/${{p##*/}}
  done
  n=$((n+1)); sleep 0.05
done
echo "AGENT-PORT $dev"; echo SVIRT-READY
export PATH=/bin
exec /usr/sbin/qemu-ga -m virtio-serial -p "$dev" -t /run -f /run/qga.pid
"""


def _libraries(binary: str) -> list[Path]:
    """The shared objects ``binary`` loads (ldd of a trusted host binary)."""
    out = subprocess.run(["ldd", binary], capture_output=True, text=True, check=True,  # noqa: S603,S607
                         timeout=30).stdout
    found = []
    for line in out.splitlines():
        words = line.split()
        path = words[2] if "=>" in words and len(words) > 2 else words[0]
        if path.startswith("/"):
            found.append(Path(path))
    return found


#: the modules /init loads: the PCI transport and the virtio-serial port
MODULES = ("virtio_pci", "virtio_console")


def build_initrd(dest: Path, modules: tuple[str, ...] = MODULES) -> None:
    """The initramfs (``modules``: more, e.g. virtio_blk for a seed disk)."""
    release, mods = kernel_modules(qemu_kernel_tree(resolve_cache(None)), modules)
    dirs = ("bin", "dev", "proc", "sys", "tmp", "run", "usr", "usr/sbin", "lib", "lib/modules")
    entries = [CpioEntry(d, _DIR) for d in dirs]
    entries.append(CpioEntry("bin/busybox", _EXE, Path("/bin/busybox").read_bytes()))
    entries += [CpioEntry(f"bin/{a}", _LINK, b"busybox") for a in APPLETS]
    made = set(dirs)
    for lib in _libraries(QEMU_GA):
        parent = str(lib.parent).lstrip("/")
        for i in range(1, parent.count("/") + 2):
            part = "/".join(parent.split("/")[:i])
            if part not in made:
                made.add(part)
                entries.append(CpioEntry(part, _DIR))
        entries.append(CpioEntry(str(lib).lstrip("/"), _EXE, lib.read_bytes()))
    entries.append(CpioEntry("usr/sbin/qemu-ga", _EXE, Path(QEMU_GA).read_bytes()))
    entries += [CpioEntry(f"lib/modules/{n}.ko", _FILE, data) for n, data in mods]
    order = "".join(n + "\n" for n, _ in mods).encode()
    entries += [CpioEntry("modules.order", _FILE, order), CpioEntry("init", _EXE, INIT.encode())]
    with open(dest, "wb") as f, gzip.GzipFile(fileobj=f, mode="wb", compresslevel=1) as gz:
        write_cpio(entries, cast(BinaryIO, gz))
    dest.chmod(0o644)


@dataclass
class AgentGuest:
    client: AgentClient
    boot_seconds: float
    console: Path
    process: subprocess.Popen[bytes]


@contextlib.contextmanager
def agent_guest() -> Iterator[AgentGuest]:
    """Boot the guest; yield a client whose ping already answered."""
    work = Path(tempfile.mkdtemp(prefix="svirt-agent-guest-"))
    work.chmod(0o755)  # QEMU's uid reads the initrd and writes the console log
    run_dir = Path(tempfile.mkdtemp(prefix="svirt-agent-run-"))  # 0700 root: the socket
    uid = agent_uid()
    build_initrd(work / "initrd.gz")
    console = work / "console.log"
    console.touch()
    os.chown(console, uid, uid)
    listener = listen_private(run_dir / "agent.sock")
    os.dup2(listener.fileno(), AGENT_FD, inheritable=True)
    listener.close()
    argv = ["qemu-system-x86_64", "-nodefaults", "-no-user-config", "-nographic",
            "-accel", "tcg", "-m", "256", "-kernel", str(qemu_kernel(resolve_cache(None))),
            "-initrd", str(work / "initrd.gz"), "-append", "console=ttyS0 quiet panic=-1",
            "-serial", f"file:{console}", "-no-reboot", "-sandbox", SANDBOX,
            "-chardev", f"socket,id=qga0,fd={AGENT_FD},server=on,wait=off",
            "-device", "virtio-serial-pci,id=vser0",
            "-device", f"virtserialport,bus=vser0.0,chardev=qga0,name={PORT_NAME}"]
    start = time.monotonic()
    try:
        qemu = subprocess.Popen(argv, pass_fds=(AGENT_FD,), user=uid, group=uid,  # noqa: S603
                                extra_groups=[], stdin=subprocess.DEVNULL, cwd=work)
    finally:
        os.close(AGENT_FD)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.connect(str(run_dir / "agent.sock"))
        client = AgentClient(sock, timeout=2.0)
        while True:
            try:
                client.ping()
                break
            except AgentError:
                if qemu.poll() is not None or time.monotonic() - start > BOOT_SECONDS:
                    raise
        yield AgentGuest(client, time.monotonic() - start, console, qemu)
    finally:
        sock.close()
        qemu.kill()  # our own child, by its pid
        qemu.wait(timeout=30)
        kill_uid(uid)
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(run_dir, ignore_errors=True)
