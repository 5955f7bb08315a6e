"""Taps for guests: create, own, attach to a bridge, isolate, delete.

Every netlink operation goes through pyroute2, imported only when a guest
has a nic (it costs ~100 ms).  A tap is persistent, owned by the guest's DAC
uid/gid (so UML, which opens its tap by name, needs no privilege, and no
other guest uid can attach: TUNSETIFF fails with EPERM), attached to the
spec's bridge (with bridge port isolation when asked) and up.  QEMU gets an
fd the launcher opened (TUNSETIFF with IFF_TAP|IFF_NO_PI|IFF_VNET_HDR), so it
needs no CAP_NET_ADMIN.  The launcher never relabels the tun fd: that would
relabel /dev/net/tun itself for every guest.

A guest-level ``netns`` puts the taps (and the hypervisor) in an existing
network namespace (``/run/netns/NAME``); the launcher's thread enters it with
setns() only for the netlink and ioctl calls.
"""

from __future__ import annotations

import ctypes
import fcntl
import hashlib
import os
import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from svirt.errors import NetworkError

TUNSETIFF = 0x400454CA
TUNSETPERSIST = 0x400454CB
TUNSETOWNER = 0x400454CC
TUNSETGROUP = 0x400454CE
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
IFNAMSIZ = 16
CLONE_NEWNET = 0x40000000
NETNS_DIR = "/run/netns"


def tap_name(guest: str, slot: int, index: int) -> str:
    """``sv<slot>n<index>`` plus as much of the guest name as fits IFNAMSIZ.

    The slot makes it unique among running guests; the name part makes it
    readable; characters an interface name may not hold become a hash digit.
    """
    head = f"sv{slot}n{index}-"
    room = IFNAMSIZ - 1 - len(head)
    if room < 1:
        raise NetworkError(f"slot {slot} and nic {index} leave no room for a tap name")
    clean = "".join(c for c in guest if c.isascii() and (c.isalnum() or c in "_."))
    if len(clean) > room:
        digest = hashlib.sha256(guest.encode()).hexdigest()
        clean = clean[: max(room - 3, 0)] + digest[: min(3, room)]
    return (head + clean[:room]).rstrip("-")


def _libc() -> Any:
    return ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc().setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise NetworkError(f"setns: {os.strerror(err)}")


def netns_path(name: str) -> str:
    return os.path.join(NETNS_DIR, name)


@contextmanager
def in_netns(name: str | None) -> Iterator[None]:
    """Run the block in network namespace ``name`` (this thread only)."""
    if name is None:
        yield
        return
    try:
        target = os.open(netns_path(name), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NetworkError(f"network namespace {name} does not exist",
                           hint=f"create it first (ip netns add {name})") from None
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        _setns(target)
        try:
            yield
        finally:
            _setns(home)
    finally:
        os.close(target)
        os.close(home)


def enter_netns_in_child(name: str) -> Callable[[], None]:
    """A child setup step: move the hypervisor into ``name`` before exec."""
    path = netns_path(name)

    def setup() -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            _setns(fd)
        finally:
            os.close(fd)

    return setup


CLONE_NEWNS = 0x00020000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
MS_NOSUID = 0x2
MS_NOEXEC = 0x8
TUN_MAJOR, TUN_MINOR = 10, 200


def private_tun_in_child(uid: int, gid: int) -> Callable[[], None]:
    """A child setup step for hypervisors that open /dev/net/tun by path (UML).

    The host's /dev/net/tun may be 0600 (it is here); svirt never changes that
    shared node.  Instead the child gets a mount namespace of its own with a
    small tmpfs on /dev/net holding a tun node owned by the guest's uid.  The
    device itself checks the tap's owner at TUNSETIFF, so this grants nothing
    but what the tap's ownership already allows.
    """
    libc = _libc()
    try:  # the node gets the host node's SELinux label (tun_tap_device_t)
        label: bytes | None = os.getxattr("/dev/net/tun", "security.selinux")
    except OSError:
        label = None

    def setup() -> None:
        if libc.unshare(CLONE_NEWNS) != 0:
            raise NetworkError(f"unshare(CLONE_NEWNS): {os.strerror(ctypes.get_errno())}")
        # nothing mounted here may propagate back to the host's namespace;
        # in a chroot "/" is no mount point, but /dev (which we mount on) is
        if (libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None) != 0
                and libc.mount(b"none", b"/dev", None, MS_REC | MS_PRIVATE, None) != 0):
            raise NetworkError(f"make /dev private: {os.strerror(ctypes.get_errno())}")
        if libc.mount(b"svirt-tun", b"/dev/net", b"tmpfs", MS_NOSUID | MS_NOEXEC,
                      b"mode=0755,size=4k") != 0:
            raise NetworkError(f"mount tmpfs on /dev/net: {os.strerror(ctypes.get_errno())}")
        os.mknod("/dev/net/tun", 0o600 | 0o020000, os.makedev(TUN_MAJOR, TUN_MINOR))
        os.chown("/dev/net/tun", uid, gid)
        if label is not None:
            os.setxattr("/dev/net/tun", "security.selinux", label)

    return setup


def _ifreq(name: str, flags: int) -> bytes:
    return struct.pack("16sH22x", name.encode(), flags)


def open_tap(name: str, *, vnet_hdr: bool = True) -> int:
    """Open /dev/net/tun attached to tap ``name`` (in the current netns)."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    flags = IFF_TAP | IFF_NO_PI | (IFF_VNET_HDR if vnet_hdr else 0)
    try:
        fcntl.ioctl(fd, TUNSETIFF, _ifreq(name, flags))
    except OSError as err:
        os.close(fd)
        raise NetworkError(f"cannot attach to tap {name}: {err.strerror}") from err
    return fd


def create_tap(name: str, uid: int, gid: int) -> None:
    """Create a persistent tap owned by uid/gid (-1: no owner)."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, TUNSETIFF, _ifreq(name, IFF_TAP | IFF_NO_PI | IFF_VNET_HDR))
        if uid >= 0:
            fcntl.ioctl(fd, TUNSETOWNER, uid)
        if gid >= 0:
            fcntl.ioctl(fd, TUNSETGROUP, gid)
        fcntl.ioctl(fd, TUNSETPERSIST, 1)
    except OSError as err:
        raise NetworkError(f"cannot create tap {name}: {err.strerror}") from err
    finally:
        os.close(fd)


def _kind(link: Any) -> str | None:
    info = link.get_attr("IFLA_LINKINFO")
    return info.get_attr("IFLA_INFO_KIND") if info is not None else None


def check_bridge(ipr: Any, bridge: str) -> int:
    found = ipr.link_lookup(ifname=bridge)
    if not found:
        raise NetworkError(f"bridge {bridge} does not exist",
                           hint=f"create it first (ip link add {bridge} type bridge)")
    kind = _kind(ipr.get_links(found[0])[0])
    if kind != "bridge":
        raise NetworkError(f"{bridge} is a {kind or 'plain'} interface, not a bridge")
    return int(found[0])


def check_free(ipr: Any, name: str) -> None:
    if ipr.link_lookup(ifname=name):
        raise NetworkError(f"interface name {name} is already taken",
                           hint="another tool created an interface with svirt's tap name")


def attach_tap(ipr: Any, name: str, bridge: str | None, isolated: bool) -> None:
    idx = ipr.link_lookup(ifname=name)[0]
    if bridge is not None:
        ipr.link("set", index=idx, master=check_bridge(ipr, bridge))
        if isolated:
            ipr.brport("set", index=idx, isolated=1)
    ipr.link("set", index=idx, state="up")


def iproute() -> Any:
    from pyroute2 import IPRoute

    return IPRoute()


def delete_tap(name: str, netns: str | None = None) -> bool:
    """Delete tap ``name`` (in ``netns``); False when it is gone or not a tap."""
    try:
        with in_netns(netns):
            ipr = iproute()
            try:
                idx = ipr.link_lookup(ifname=name)
                if not idx or _kind(ipr.get_links(idx[0])[0]) != "tun":
                    return False
                ipr.link("del", index=idx[0])
                return True
            finally:
                ipr.close()
    except NetworkError:
        return False  # the namespace itself is gone: so is the tap
