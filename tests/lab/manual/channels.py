"""Manual lab checks of the channels a launcher hands to guests (no svirt).

Run inside the lab, enforcing, from the launcher domain::

    LAB_PAYLOAD=tests/lab python3 tests/lab/image.py python3 /lab/manual/channels.py

* stdout/console as a socketpair created with setsockcreatecon(guest
  context): works for QEMU and UML; a socketpair or a pipe created at the
  launcher's level is denied (MCS constraints on unix_stream_socket and
  fifo_file), and the kernel swaps the fd for /dev/null at exec;
* svirt_web_t (the custom guest domain) with svirt_web_image_t files;
* tap: QEMU with a tun fd opened and attached by the launcher; UML attaching
  a fresh persistent tap by name; another guest (or the same one restarted)
  attaching an already attached tap is denied.
"""

from __future__ import annotations

import ctypes
import fcntl
import importlib.util
import os
import shutil
import socket
import struct
import subprocess
import time
from pathlib import Path

import selinux

# tests/lab is the payload, mounted at /lab: load its tiny_guest.py by path.
_spec = importlib.util.spec_from_file_location(
    "tiny_guest", Path(__file__).resolve().parents[1] / "tiny_guest.py"
)
assert _spec is not None and _spec.loader is not None
tiny_guest = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tiny_guest)

W = Path("/var/lib/svirt-channels")
ADDR_NO_RANDOMIZE = 0x0040000
TUNSETIFF = 0x400454CA
IFF_TAP, IFF_NO_PI, IFF_VNET_HDR = 0x0002, 0x1000, 0x4000


def proc_ctx(level: str, domain: str = "svirt_t") -> str:
    return f"system_u:system_r:{domain}:{level}"


def file_ctx(level: str, domain: str = "svirt_t") -> str:
    return f"system_u:object_r:{domain.removesuffix('_t')}_image_t:{level}"


def guest_file(name: str, data: bytes, level: str, domain: str = "svirt_t") -> Path:
    path = W / f"{domain}-{level.replace(':', '_')}" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    selinux.setfilecon_raw(str(path.parent), file_ctx(level, domain))
    path.write_bytes(data)
    selinux.setfilecon_raw(str(path), file_ctx(level, domain))
    return path


def channel(kind: str, sockcreate: str | None) -> tuple[int, int]:
    """(launcher end, guest end)."""
    if kind == "pipe":
        return os.pipe()
    if sockcreate:
        selinux.setsockcreatecon_raw(sockcreate)
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    selinux.setsockcreatecon_raw(None)
    return a.detach(), b.detach()


def launch(
    label: str, argv: list[str], ctx: str, kind: str = "socket", sockcreate: str | None = None,
    stdio: bool = True, extra_fds: tuple[int, ...] = (), uml: bool = False,
) -> str:  # fmt: skip
    mine, theirs = channel(kind, sockcreate)
    argv = [a.replace("@FD@", str(theirs)) for a in argv]

    def pre() -> None:
        if uml:
            ctypes.CDLL(None).personality(ADDR_NO_RANDOMIZE)
        selinux.setexeccon_raw(ctx)

    os.system(f"echo 'channels: {label}' > /dev/kmsg")  # noqa: S605
    t0 = time.monotonic()
    out = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=theirs if stdio else subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, pass_fds=(theirs, *extra_fds), preexec_fn=pre,
    )  # fmt: skip
    os.close(theirs)
    data = b""
    while chunk := os.read(mine, 4096):
        data += chunk
    os.close(mine)
    rc = out.wait()
    text = data.decode(errors="replace")
    ok = tiny_guest.MARKER in text
    print(f"[{label}] rc={rc} marker={'yes' if ok else 'NO'} {time.monotonic() - t0:.1f}s")
    return text


def qemu(kernel: Path, *extra: str) -> list[str]:
    return [
        "qemu-system-x86_64", "-accel", "tcg", "-nographic", "-nodefaults", "-no-user-config",
        "-serial", "stdio", "-monitor", "none", "-no-reboot", "-m", "32", "-kernel", str(kernel),
        *extra,
    ]  # fmt: skip


def uml(initrd: Path, umid: str, *extra: str) -> list[str]:
    return [
        "linux", "mem=128M", f"initrd={initrd}", f"uml_dir={initrd.parent}", f"umid={umid}",
        "con=null", "ssl=null", "con0=null,fd:@FD@", "quiet", *extra,
    ]  # fmt: skip


def main() -> None:
    shutil.rmtree(W, ignore_errors=True)
    W.mkdir()
    g1, web = "s0:c1,c2", "s0:c5,c6"
    kernel = guest_file("mb.bin", tiny_guest.multiboot_kernel(), g1)
    initrd = guest_file("initrd.img", tiny_guest.busybox_initramfs(), g1)
    cases = [("guest socket", "socket", proc_ctx(g1)), ("launcher socket", "socket", None),
             ("launcher pipe", "pipe", None)]  # fmt: skip
    for name, kind, sockcreate in cases:
        launch(f"qemu {name}", qemu(kernel), proc_ctx(g1), kind, sockcreate)
        launch(f"uml {name}", uml(initrd, f"u-{kind}-{sockcreate is None}"), proc_ctx(g1),
               kind, sockcreate, stdio=False, uml=True)  # fmt: skip

    wk = guest_file("mb.bin", tiny_guest.multiboot_kernel(), web, "svirt_web_t")
    wi = guest_file("initrd.img", tiny_guest.busybox_initramfs(), web, "svirt_web_t")
    wctx = proc_ctx(web, "svirt_web_t")
    launch("qemu svirt_web_t", qemu(wk), wctx, sockcreate=wctx)
    launch("uml svirt_web_t", uml(wi, "web"), wctx, sockcreate=wctx, stdio=False, uml=True)

    # tap: fresh persistent taps owned by uid 0 (no CAP_NET_ADMIN needed to attach)
    for tap in ("tap0", "tap1"):
        subprocess.run(["ip", "tuntap", "add", "dev", tap, "mode", "tap", "user", "0"], check=True)
    fd = os.open("/dev/net/tun", os.O_RDWR)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", b"tap0", IFF_TAP | IFF_NO_PI | IFF_VNET_HDR))
    net = ("-netdev", f"tap,id=n0,fd={fd},vhost=off", "-device", "e1000,netdev=n0")
    launch("qemu tap fd from launcher", qemu(kernel, *net), proc_ctx(g1), sockcreate=proc_ctx(g1),
           extra_fds=(fd,))  # fmt: skip
    os.close(fd)
    up = "/bin/busybox ip link set eth0 up && /bin/busybox echo ETH0-UP"
    for level, name in (("s0:c3,c4", "attach"), ("s0:c5,c6", "steal"), ("s0:c3,c4", "restart")):
        ni = guest_file(f"net-{name}.img", tiny_guest.busybox_initramfs(commands=up), level)
        argv = uml(ni, name, "eth0=tuntap,tap1")
        ctx = proc_ctx(level)
        text = launch(
            f"uml tap1 {level} ({name})", argv, ctx, sockcreate=ctx, stdio=False, uml=True
        )
        print(f"    eth0 up: {'ETH0-UP' in text}")


if __name__ == "__main__":
    main()
