"""Taps in a network namespace the test makes itself: ping matrix, isolation,
ownership, cleanup on every exit path.  No address is ever put on anything
outside these namespaces."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from svirt.errors import NetworkError
from svirt.images.build import TinyGuest
from svirt.launcher import network
from svirt.launcher.launch import Guest, launch
from svirt.launcher.registry import Registry
from svirt.spec import Backend, Nic
from svirt.testing import tiny_spec

from .helpers import svirt_cli, write_spec

ROOT = Path(__file__).resolve().parents[2]
ENDPOINT = "10.77.0.254"


@pytest.fixture
def netns() -> Iterator[str]:
    """A namespace with bridge br0 and a veth endpoint (10.77.0.254) on it."""
    from pyroute2 import NetNS
    from pyroute2 import netns as nsmod

    name = f"svt-{uuid.uuid4().hex[:8]}"
    nsmod.create(name)
    ns = NetNS(name)
    try:
        ns.link("add", ifname="br0", kind="bridge")
        ns.link("add", ifname="vbr", kind="veth", peer="vend")
        br = ns.link_lookup(ifname="br0")[0]
        vbr = ns.link_lookup(ifname="vbr")[0]
        vend = ns.link_lookup(ifname="vend")[0]
        ns.link("set", index=vbr, master=br)
        ns.addr("add", index=vend, address=ENDPOINT, prefixlen=24)
        for idx in (br, vbr, vend, ns.link_lookup(ifname="lo")[0]):
            ns.link("set", index=idx, state="up")
    finally:
        ns.close()
    yield name
    nsmod.remove(name)


def _taps(ns: str) -> list[str]:
    with network.in_netns(ns):
        ipr = network.iproute()
        try:
            return [link.get_attr("IFLA_IFNAME") for link in ipr.get_links()
                    if network._kind(link) == "tun"]
        finally:
            ipr.close()


def _ping_results(guest: Guest, targets: list[str]) -> dict[str, str]:
    out = {}
    for ip in targets:
        m = guest.console.expect(re.compile(rb"SVIRT-PING " + re.escape(ip.encode()) +
                                            rb" (ok|fail)"), timeout=180)
        out[ip] = m.split()[-1].decode()
    return out


GUESTS = {"q1": ("10.77.0.1", Backend.QEMU), "q2": ("10.77.0.2", Backend.QEMU),
          "u3": ("10.77.0.3", Backend.UML)}


def _ping_matrix(netns: str, isolated: set[str], tiny_uml: TinyGuest, tiny_qemu: TinyGuest,
                 launch_guest: Callable[..., Guest]) -> dict[str, dict[str, str]]:
    guests = {}
    for name, (ip, backend) in GUESTS.items():
        targets = [other for o, (other, _) in GUESTS.items() if o != name] + [ENDPOINT]
        extra = f"svirt.net={ip}/24 svirt.ping={','.join(targets)} svirt.pingtries=20"
        tiny = tiny_uml if backend is Backend.UML else tiny_qemu
        spec = tiny_spec(tiny, f"net-{name}", backend, extra_cmdline=extra, netns=netns,
                         nics=(Nic(bridge="br0", isolated=name in isolated),))
        guests[name] = (launch_guest(spec), targets)
    matrix = {name: _ping_results(g, targets) for name, (g, targets) in guests.items()}
    print(json.dumps({"isolated": sorted(isolated), "matrix": matrix}))
    return matrix


def test_three_guests_on_one_bridge_ping_each_other(
    netns: str, tiny_uml: TinyGuest, tiny_qemu: TinyGuest, launch_guest: Callable[..., Guest]
) -> None:
    matrix = _ping_matrix(netns, set(), tiny_uml, tiny_qemu, launch_guest)
    for src, row in matrix.items():
        for dst, result in row.items():
            assert result == "ok", f"{src} -> {dst}"


def test_isolated_ports_cannot_reach_each_other_but_reach_the_rest(
    netns: str, tiny_uml: TinyGuest, tiny_qemu: TinyGuest, launch_guest: Callable[..., Guest]
) -> None:
    matrix = _ping_matrix(netns, {"q1", "q2"}, tiny_uml, tiny_qemu, launch_guest)
    assert matrix["q1"]["10.77.0.2"] == "fail"
    assert matrix["q2"]["10.77.0.1"] == "fail"
    for src in ("q1", "q2"):
        assert matrix[src][ENDPOINT] == "ok"
        assert matrix[src]["10.77.0.3"] == "ok"  # the non-isolated guest
    assert all(result == "ok" for result in matrix["u3"].values())


def _tunsetiff_as(uid: int, gid: int, ns: str, name: str) -> int:
    """TUNSETIFF on tap ``name`` from a child in ``ns`` running as uid; 0 or errno."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 255
        try:
            with network.in_netns(ns):
                # as guest B's hypervisor sees it: its own tun node (the host's is 0600 here)
                network.private_tun_in_child(uid, gid)()
                os.setgroups([])
                os.setresgid(gid, gid, gid)
                os.setresuid(uid, uid, uid)
                fd = os.open("/dev/net/tun", os.O_RDWR)
                try:
                    fcntl.ioctl(fd, network.TUNSETIFF,
                                network._ifreq(name, network.IFF_TAP | network.IFF_NO_PI))
                    code = 0
                except OSError as err:
                    code = err.errno or 255
        finally:
            os.write(w, bytes([code]))
            os._exit(0)
    os.close(w)
    data = os.read(r, 1)
    os.close(r)
    os.waitpid(pid, 0)
    return data[0]


def test_tap_is_owned_by_the_guest_and_other_guests_cannot_attach(
    netns: str, tiny_uml: TinyGuest, launch_guest: Callable[..., Guest]
) -> None:
    a = launch_guest(tiny_spec(tiny_uml, "own-a", Backend.UML, netns=netns,
                               nics=(Nic(bridge="br0"),)))
    b = launch_guest(tiny_spec(tiny_uml, "own-b", Backend.UML, netns=netns,
                               nics=(Nic(bridge="br0"),)))
    a.console.expect_line("SVIRT-READY", timeout=60)
    b.console.expect_line("SVIRT-READY", timeout=60)  # else its stop waits out the ladder
    tap_a = network.tap_name("own-a", a.record.slot, 0)
    assert tap_a in _taps(netns)
    uid_a, gid_a = (int(x) for x in a.labels["dac"].split(":"))
    uid_b, gid_b = (int(x) for x in b.labels["dac"].split(":"))
    assert _tunsetiff_as(uid_b, gid_b, netns, tap_a) == errno.EPERM
    # its owner passes the permission check (the tap is busy: UML holds it)
    assert _tunsetiff_as(uid_a, gid_a, netns, tap_a) != errno.EPERM


@pytest.mark.parametrize("how", ["clean-stop", "hypervisor-sigkill"])
def test_no_tap_survives(how: str, netns: str, tiny_qemu: TinyGuest,
                         registry: Registry) -> None:
    spec = tiny_spec(tiny_qemu, f"tap-{how}", Backend.QEMU, netns=netns,
                     nics=(Nic(bridge="br0"), Nic()))
    with launch(spec, registry=registry) as guest:
        guest.console.expect_line("SVIRT-READY", timeout=90)
        assert len(_taps(netns)) == 2
        if how == "hypervisor-sigkill":
            os.kill(guest.pid, signal.SIGKILL)
            guest.wait(10)
    assert _taps(netns) == []


def test_no_tap_survives_launcher_sigkill_and_gc(
    netns: str, tiny_uml: TinyGuest, image_dir: Path, run_root: Path
) -> None:
    spec = write_spec(image_dir / "t.toml", "tap-gc", "uml", tiny_uml,
                      extra=f'netns = "{netns}"\n[[nic]]\nbridge = "br0"\n')
    # netns must be a top-level key: write_spec appends after the top-level keys
    proc = subprocess.Popen([sys.executable, "-m", "tests.integration.launcher_proc", str(spec)],
                            cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    json.loads(proc.stdout.readline())
    assert len(_taps(netns)) == 1
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    gc = svirt_cli("gc")
    assert "deleted" in gc.stdout, gc.stdout + gc.stderr
    assert _taps(netns) == []


def test_missing_bridge_fails_clearly_and_leaves_nothing(
    netns: str, tiny_uml: TinyGuest, registry: Registry
) -> None:
    spec = tiny_spec(tiny_uml, "nobridge", Backend.UML, netns=netns, nics=(Nic(bridge="br9"),))
    with pytest.raises(NetworkError, match="bridge br9 does not exist"):
        with launch(spec, registry=registry):
            pass
    assert registry.records() == [] and _taps(netns) == []


def test_bridge_of_wrong_kind_fails(netns: str, tiny_uml: TinyGuest, registry: Registry) -> None:
    spec = tiny_spec(tiny_uml, "wrongkind", Backend.UML, netns=netns, nics=(Nic(bridge="vend"),))
    with pytest.raises(NetworkError, match="not a bridge"):
        with launch(spec, registry=registry):
            pass
    assert registry.records() == []


def test_taken_tap_name_fails_and_the_other_interface_stays(
    netns: str, tiny_uml: TinyGuest, registry: Registry
) -> None:
    spec = tiny_spec(tiny_uml, "taken", Backend.UML, netns=netns, nics=(Nic(),))
    # the slot this launch will get: slots are unique on the host (claims), so
    # it need not be one of the lowest; a reservation released at once tells
    from svirt.security.dac import DacDriver

    probe = registry.reserve(spec, [DacDriver()])
    registry.release(probe)
    names = [network.tap_name("taken", slot, 0) for slot in range(probe.slot, probe.slot + 8)]
    with network.in_netns(netns):
        ipr = network.iproute()
        for name in names:
            ipr.link("add", ifname=name, kind="bridge")
        ipr.close()
    with pytest.raises(NetworkError, match="already taken"):
        with launch(spec, registry=registry):
            pass
    with network.in_netns(netns):
        ipr = network.iproute()
        assert all(ipr.link_lookup(ifname=name) for name in names)  # not ours: kept
        ipr.close()
    assert registry.records() == []


def test_missing_netns_fails(tiny_uml: TinyGuest, registry: Registry) -> None:
    spec = tiny_spec(tiny_uml, "nons", Backend.UML, netns="svt-does-not-exist",
                     nics=(Nic(),))
    with pytest.raises(NetworkError, match="does not exist"):
        with launch(spec, registry=registry):
            pass
    assert registry.records() == []
