"""The jail, attacked from inside: a stand-in hypervisor (``attack=jail``),
running as its guest's uid as PID 2 of its own PID namespace (tini is PID 1),
tries to reach the host and another guest, and reports each attempt on its
console; every attempt must fail, while its own disk and console work.  Then
a real UML guest, booted jailed, is inspected from the host side."""

from __future__ import annotations

import ast
import contextlib
import ctypes
import json
import os
import re
import secrets
import socket
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from svirt.host import HostInfo
from svirt.images.build import TinyGuest
from svirt.launcher.jail import DEVICES, SYSTEM_LINKS
from svirt.launcher.launch import Guest, launch
from svirt.launcher.state import Registry
from svirt.spec import Backend
from svirt.testing import tiny_spec

from .helpers import build_spec, read_info, spec_dict

JAIL_LINE = re.compile(rb"JAIL (\{[^\n]*\})\r?\n")
IPC_CREAT = 0o1000
IPC_RMID = 0
#: host paths no jail may show: the hypervisor's own objects are all it gets
HOST_ONLY = ("/etc", "/home", "/root", "/sys")


@dataclass
class Bait:
    """What the test puts on the host for the jailed guest to find."""

    token: str
    etc_canary: Path
    var_canary: Path
    var_sock: Path
    run_sock: Path
    shm_key: int
    shm_id: int
    abstract: str
    tcp_port: int

    def words(self) -> str:
        return (f" token={self.token} canary={self.etc_canary} canary2={self.var_canary}"
                f" sock={self.var_sock} sock2={self.run_sock} shmkey={self.shm_key}"
                f" hostpid={os.getpid()}")


def _listen_unix(path: Path | str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.listen(4)
    if isinstance(path, Path):
        path.chmod(0o666)
    return s


@pytest.fixture
def bait() -> Iterator[Bait]:
    token = secrets.token_hex(6)
    etc_canary = Path(f"/etc/svirt-jail-canary-{token}")
    etc_canary.write_text("host /etc canary\n")
    etc_canary.chmod(0o644)
    fd, name = tempfile.mkstemp(prefix="svirt-jail-canary-", dir="/var/tmp")
    os.write(fd, b"host /var/tmp canary\n")
    os.close(fd)
    var_canary = Path(name)
    var_canary.chmod(0o644)
    var_sock = Path(f"/var/tmp/svirt-jail-sock-{token}")
    run_sock = Path(f"/run/svirt-jail-sock-{token}")
    abstract = f"svirt-jail-abstract-{token}"
    libc = ctypes.CDLL(None, use_errno=True)
    shm_key = 0x5A000000 | (int(token[:6], 16) & 0xFFFFFF)
    shm_id = libc.shmget(shm_key, 4096, IPC_CREAT | 0o666)
    assert shm_id >= 0, os.strerror(ctypes.get_errno())
    with contextlib.ExitStack() as stack:
        for s in (_listen_unix(var_sock), _listen_unix(run_sock),
                  _listen_unix("\0" + abstract)):
            stack.callback(s.close)
        tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        stack.callback(tcp.close)
        tcp.bind(("127.0.0.1", 0))
        tcp.listen(4)
        try:
            yield Bait(token, etc_canary, var_canary, var_sock, run_sock, shm_key, shm_id,
                       abstract, tcp.getsockname()[1])
        finally:
            libc.shmctl(shm_id, IPC_RMID, None)
            for p in (etc_canary, var_canary, var_sock, run_sock,
                      Path(f"/tmp/svirt-jail-{token}"), Path(f"/dev/shm/svirt-jail-{token}")):
                p.unlink(missing_ok=True)


def _disk(path: Path) -> Path:
    path.write_bytes(b"DISK" + b"\0" * 65532)
    path.chmod(0o644)
    return path


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children", encoding="ascii") as f:
        return [int(p) for p in f.read().split()]


def _status(pid: int) -> dict[str, str]:
    out = {}
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            key, _, value = line.partition(":")
            out[key] = value.strip()
    return out


def _read_jail(guest: Guest, timeout: float = 20.0) -> dict[str, Any]:
    line = guest.console.expect(JAIL_LINE, timeout)
    m = JAIL_LINE.search(line)
    assert m is not None
    report: dict[str, Any] = json.loads(m.group(1))
    return report


def _failed(result: str) -> bool:
    return result == "absent" or result.startswith("denied: ")


def _table(attempts: dict[str, str]) -> str:
    width = max(len(k) for k in attempts)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in attempts.items())


@dataclass
class Attack:
    report: dict[str, Any]
    info: dict[str, Any]
    leaked: list[str]  # the guest's private /tmp, /dev/shm files seen on the host
    host_pids: list[int]  # the stand-in's host pid (tini's child)
    own_disk: Path
    other_disk: Path

    @property
    def attempts(self) -> dict[str, str]:
        t: dict[str, str] = self.report["attempts"]
        return t


def _attack(standin: Path, image_dir: Path, registry: Registry, host: HostInfo,
            uids: set[int], bait: Bait, name: str, extra: str = "") -> Attack:
    """Run the jail probe next to a real second guest (the victim) and return
    what it reported; both are stopped before this returns."""
    own_disk = _disk(image_dir / f"{name}-own.img")
    other_disk = _disk(image_dir / f"{name}-other.img")
    victim_spec = spec_dict(standin, f"{name}-victim", disks=[other_disk])
    with launch(build_spec(victim_spec), registry=registry, host=host) as victim:
        uids.add(read_info(victim)["uid"])
        (victim_pid,) = _children(victim.pid)
        spec = spec_dict(standin, name, "jail", disks=[own_disk])
        spec["cmdline"] += bait.words() + f" other={other_disk} victim={victim_pid}" + extra
        with launch(build_spec(spec), registry=registry, host=host) as guest:
            report = _read_jail(guest)
            info = read_info(guest)
            uids.add(info["uid"])
            leaked = [p for p in (f"/tmp/svirt-jail-{bait.token}",
                                  f"/dev/shm/svirt-jail-{bait.token}") if os.path.exists(p)]
            host_pids = _children(guest.pid)
            guest.stop()
        victim.stop()
    a = Attack(report, info, leaked, host_pids, own_disk, other_disk)
    print(f"\njail attempts of {name} (pid {report['pid']}, uid {info['uid']}):\n"
          f"{_table(a.attempts)}\nstatus {report['status']}\nmounts {report['mounts']}\n"
          f"fds {report['fds']}")
    return a


#: attempts asserted by their own tests below (each a hole found when written)
OWN_TESTS = ("ptrace attach pid 1", "unshare user namespace", "connect abstract",
             "connect tcp")


def test_a_jailed_hypervisor_reaches_nothing_of_the_host(
    standin: Path, image_dir: Path, hostile_registry: Registry, host: HostInfo,
    guest_uids: set[int], bait: Bait, dirs: tuple[Path, Path],
) -> None:
    started = time.monotonic()
    a = _attack(standin, image_dir, hostile_registry, host, guest_uids, bait, "jail-a")
    t, report, info = a.attempts, a.report, a.info
    problems: list[str] = []

    def expect(ok: bool, what: str) -> None:
        if not ok:
            problems.append(what)

    # the guest's own things work: console (this report), its disk
    expect(t["own disk"].startswith("ok: read b'DISK'"), f"own disk: {t['own disk']}")
    with open(a.own_disk, "rb") as f:
        f.seek(512)
        expect(f.read(len(bait.token)).decode() == bait.token, "own disk: the write was lost")
    expect(info["uid"] != 0 and info["euid"] == info["uid"], f"uid {info}")
    # host files, sockets, IPC, processes, devices, privileges: out of reach
    must_fail = [k for k in t if k not in OWN_TESTS and k.startswith((
        "read ", "connect /", "kill ", "open ", "capset", "prctl", "setuid", "mount",
        "mknod", "sysv", "stat /dev/", "write /usr", "write own kernel"))]
    must_fail += [f"list {d}" for d in HOST_ONLY]
    for k in must_fail:
        expect(_failed(t[k]), f"{k}: {t[k]}")
    expect(len(must_fail) >= 50, f"only {len(must_fail)} attempts")
    expect(t["/proc/1/root/.. is the jail root"] == "True", "/proc/1/root/.. leaves the jail")
    expect(t["write /tmp"].startswith("ok") and t["write /dev/shm"].startswith("ok"),
           f"private /tmp, /dev/shm unwritable: {t['write /tmp']}, {t['write /dev/shm']}")
    expect(not a.leaked, f"the guest's private files appear on the host: {a.leaked}")
    # what the listings may show: the jail's own skeleton and the guest's objects
    listings = {k.removeprefix("list "): json_list(v) for k, v in t.items()
                if k.startswith("list ") and v.startswith("ok")}
    run_root, state_dir = dirs
    allowed = {
        "/": {"usr", "dev", "tmp", "proc", "run", "var", *SYSTEM_LINKS},
        "/var": {"tmp"},
        "/var/tmp": {image_dir.name},
        "/run": {run_root.name},
        "/dev": {*DEVICES, "fd", "shm"},
        str(image_dir): {a.own_disk.name, standin.name},
    }
    expect(set(allowed) <= set(listings), f"listings missing: {set(allowed) - set(listings)}")
    for d, names in listings.items():
        if d in allowed:
            extra = set(names) - allowed[d]
            expect(not extra, f"the jail's {d} shows {sorted(extra)}")
    for name in (bait.var_canary.name, bait.var_sock.name, state_dir.name):
        expect(name not in listings.get("/var/tmp", []), f"/var/tmp shows {name}")
    # /proc: its own PID namespace only (tini 1, the stand-in 2)
    expect(report["pid"] == 2 and report["ppid"] == 1, f"pid {report['pid']}/{report['ppid']}")
    expect(set(report["pids"]) <= {1, 2}, f"/proc shows pids {report['pids']}")
    expect(len(a.host_pids) == 1 and a.host_pids[0] != 2, f"host pids {a.host_pids}")
    # no capabilities, and none to be had
    st = report["status"]
    for cap in ("CapEff", "CapPrm", "CapInh", "CapAmb"):
        expect(int(st[cap], 16) == 0, f"{cap} {st[cap]}")
    expect(st["NoNewPrivs"] == "1", f"NoNewPrivs {st['NoNewPrivs']}")
    expect(report["hostname"] == "svirt-guest", f"hostname {report['hostname']}")
    expect(all(int(fd) < 200 for fd in report["fds"]), f"fds {report['fds']}")
    print(f"jail: {len(t)} attempts in {time.monotonic() - started:.1f} s")
    assert not problems, "jail holes:\n  " + "\n  ".join(problems) + "\n" + _table(t)


def json_list(result: str) -> list[str]:
    """The names of an "ok: [...]" listing."""
    names: list[str] = ast.literal_eval(result.removeprefix("ok: "))
    return names


def test_a_jailed_hypervisor_cannot_trace_its_init(
    standin: Path, image_dir: Path, hostile_registry: Registry, host: HostInfo,
    guest_uids: set[int], bait: Bait,
) -> None:
    """tini (PID 1) runs as the guest's uid: a tracer of it could, e.g., clear
    its PDEATHSIG (the namespace's tie to the supervisor) or keep it alive."""
    a = _attack(standin, image_dir, hostile_registry, host, guest_uids, bait, "jail-pt")
    result = a.attempts["ptrace attach pid 1"]
    assert _failed(result), f"ptrace(PTRACE_ATTACH, 1) from the hypervisor: {result}"


def test_a_jailed_hypervisor_cannot_make_a_user_namespace(
    standin: Path, image_dir: Path, hostile_registry: Registry, host: HostInfo,
    guest_uids: set[int], bait: Bait,
) -> None:
    """unshare(CLONE_NEWUSER) gives back a full capability set (in a namespace
    of its own): mounts, new network and mount namespaces, the kernel's
    namespaced attack surface."""
    a = _attack(standin, image_dir, hostile_registry, host, guest_uids, bait, "jail-us")
    result = a.attempts["unshare user namespace"]
    assert _failed(result), f"unshare(CLONE_NEWUSER) from the hypervisor: {result}"


def test_a_jailed_hypervisor_reaches_no_host_network_socket(
    standin: Path, image_dir: Path, hostile_registry: Registry, host: HostInfo,
    guest_uids: set[int], bait: Bait,
) -> None:
    """Sockets of the host's network namespace: an abstract unix socket and a
    TCP listener on 127.0.0.1 (a jail with no network namespace of its own,
    for a guest without NICs, reaches both)."""
    a = _attack(standin, image_dir, hostile_registry, host, guest_uids, bait, "jail-net",
                f" abstract={bait.abstract} tcp={bait.tcp_port}")
    t = a.attempts
    reached = [f"{k}: {t[k]}" for k in ("connect abstract", "connect tcp") if not _failed(t[k])]
    assert not reached, "the host's network namespace:\n  " + "\n  ".join(reached)


def test_a_real_uml_guest_runs_jailed(
    tiny_uml: TinyGuest, hostile_registry: Registry, host: HostInfo, guest_uids: set[int],
) -> None:
    spec = tiny_spec(tiny_uml, "jail-uml", Backend.UML)
    assert spec.jail
    with launch(spec, registry=hostile_registry, host=host) as guest:
        guest.console.expect_line("SVIRT-READY", timeout=60)
        init = guest.pid
        (hypervisor,) = _children(init)
        for pid in (init, hypervisor):
            st = _status(pid)
            guest_uids.add(int(st["Uid"].split()[0]))
            assert st["NoNewPrivs"] == "1", f"pid {pid}: NoNewPrivs {st['NoNewPrivs']}"
            for cap in ("CapEff", "CapPrm", "CapInh", "CapAmb"):
                assert int(st[cap], 16) == 0, f"pid {pid}: {cap} {st[cap]}"
            assert int(st["Uid"].split()[0]) != 0
            assert os.stat(f"/proc/{pid}/root/usr")
            assert not os.path.exists(f"/proc/{pid}/root/etc/passwd")
            assert not os.path.exists(f"/proc/{pid}/root/home")
            assert os.readlink(f"/proc/{pid}/ns/pid") != os.readlink("/proc/self/ns/pid")
            assert os.readlink(f"/proc/{pid}/ns/mnt") != os.readlink("/proc/self/ns/mnt")
            assert os.stat(f"/proc/{pid}/root").st_ino != os.stat("/").st_ino or \
                os.stat(f"/proc/{pid}/root").st_dev != os.stat("/").st_dev
        # every process of the guest (UML forks its own) is in the jail's PID namespace
        ns = os.readlink(f"/proc/{init}/ns/pid")
        for pid in _children(hypervisor):
            with contextlib.suppress(FileNotFoundError):
                assert os.readlink(f"/proc/{pid}/ns/pid") == ns
        guest.stop()


def test_hostfs_from_a_jailed_uml_guest_reaches_only_the_jail(
    tiny_uml: TinyGuest, hostile_registry: Registry, host: HostInfo, guest_uids: set[int],
    bait: Bait,
) -> None:
    """Root inside a UML guest mounts hostfs (Debian's UML kernel has it): the
    "host" it reaches is the jail, not the host's tree."""
    spec = tiny_spec(tiny_uml, "jail-hostfs", Backend.UML, mode="shell")
    with launch(spec, registry=hostile_registry, host=host) as guest:
        guest_uids.add(int(_status(guest.pid)["Uid"].split()[0]))
        status, out = guest.shell("mkdir -p /mnt /mnt2 && mount -t hostfs none /mnt -o / "
                                  "&& echo mounted", timeout=60)
        assert (status, out) == (0, "mounted\n"), f"hostfs mount: {status} {out!r}"
        _, listing = guest.shell("ls -a /mnt")
        names = set(listing.split()) - {".", ".."}
        jail_root = {"usr", "dev", "proc", "tmp", "run", *SYSTEM_LINKS}
        assert names and names <= jail_root | {Path(tiny_uml.kernel).parts[1],
                                                Path(tiny_uml.initrd).parts[1]}, names
        attempts = {
            "read /etc canary": f"cat /mnt{bait.etc_canary}",
            "read /var/tmp canary": f"cat /mnt{bait.var_canary}",
            "read /etc/passwd": "cat /mnt/etc/passwd",
            "write /usr": f"echo x >/mnt/usr/svirt-hostfs-{bait.token}",
            "hostfs of /etc": "mount -t hostfs none /mnt2 -o /etc && ls /mnt2/passwd",
            "hostfs of ..": f"umount /mnt2; mount -t hostfs none /mnt2 -o /../.. && "
                            f"cat /mnt2{bait.etc_canary}",
            "host /proc": "ls /mnt/proc/1/root/etc/passwd",
        }
        results = {what: guest.shell(cmd) for what, cmd in attempts.items()}
        status, out = guest.shell(f"echo jailed >/mnt/tmp/svirt-jail-{bait.token} && "
                                  f"cat /mnt/tmp/svirt-jail-{bait.token}")
        assert (status, out) == (0, "jailed\n"), "the jail's own /tmp works through hostfs"
        guest.stop()
    print("\nhostfs attempts from a jailed UML guest:\n" + _table(
        {k: f"exit {s}: {o.strip()[:60]}" for k, (s, o) in results.items()}))
    # the canaries' contents are "host /etc canary" and "host /var/tmp canary"
    reached = {k: r for k, r in results.items() if r[0] == 0 or "host /" in r[1]}
    assert not reached, f"hostfs reached the host: {reached}"
    assert not Path(f"/tmp/svirt-jail-{bait.token}").exists()
    assert not Path(f"/usr/svirt-hostfs-{bait.token}").exists()
