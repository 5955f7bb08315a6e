"""The in-jail attack, shared by the host's hostile tests (DAC,
``tests/hostile/test_jail.py``) and the SELinux lab (its ``jail_attack``
check, ``tests/lab/inside/main.py``).

The host plants bait (:func:`plant_bait`: canaries in /etc and /var/tmp,
sockets, a SysV segment, a TCP listener), a victim guest runs, and the
stand-in (``standin.py``, ``attack=jail``) tries from inside its jail to
reach all of it; :func:`jail_problems` is the verdict: every attempt on the
host or the victim fails, its own disk, /tmp and /dev/shm work.

Stdlib and svirt only: the lab's payload copies this file, standin.py and
standin_spec.py.
"""

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
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from svirt.host import HostInfo
from svirt.launcher.jail import DEVICES, JAIL_INIT, SYSTEM_LINKS
from svirt.launcher.launch import Guest, launch
from svirt.launcher.registry import Registry
from tests.hostile.standin_spec import build_spec, read_info, spec_dict

JAIL_LINE = re.compile(rb"JAIL (\{[^\n]*\})\r?\n")
IPC_CREAT = 0o1000
IPC_RMID = 0
#: host paths no jail may show: the hypervisor's own objects are all it gets
HOST_ONLY = ("/etc", "/home", "/root", "/sys")
#: attempts the host's suite asserts in tests of their own (each a hole found
#: when it was written); the lab requires them with the rest
OWN_TESTS = ("ptrace attach pid 1", "unshare user namespace", "connect abstract",
             "connect tcp")
#: what the jail's root holds besides the first components of its objects' paths
JAIL_ROOT = ("usr", "dev", "tmp", "proc", JAIL_INIT.lstrip("/"), *SYSTEM_LINKS)


@dataclass
class Bait:
    """What the host puts out for the jailed guest to find."""

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
        """The stand-in's command-line words that point it at the bait."""
        return (f" token={self.token} canary={self.etc_canary} canary2={self.var_canary}"
                f" sock={self.var_sock} sock2={self.run_sock} shmkey={self.shm_key}"
                f" hostpid={os.getpid()} abstract={self.abstract} tcp={self.tcp_port}")

    @property
    def leak_paths(self) -> tuple[Path, Path]:
        """Where the guest's private /tmp and /dev/shm files would show on the host."""
        return (Path(f"/tmp/svirt-jail-{self.token}"),  # noqa: S108 - a name to look for
                Path(f"/dev/shm/svirt-jail-{self.token}"))


def _listen_unix(path: Path | str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.listen(4)
    if isinstance(path, Path):
        path.chmod(0o666)
    return s


@contextlib.contextmanager
def plant_bait() -> Iterator[Bait]:
    """Canaries, listening sockets (path, abstract, TCP) and a SysV segment,
    all removed afterwards."""
    token = secrets.token_hex(6)
    etc_canary = Path(f"/etc/svirt-jail-canary-{token}")
    etc_canary.write_text("host /etc canary\n")
    etc_canary.chmod(0o644)
    fd, name = tempfile.mkstemp(prefix="svirt-jail-canary-", dir="/var/tmp")  # noqa: S108
    os.write(fd, b"host /var/tmp canary\n")
    os.close(fd)
    var_canary = Path(name)
    var_canary.chmod(0o644)
    var_sock = Path(f"/var/tmp/svirt-jail-sock-{token}")  # noqa: S108
    run_sock = Path(f"/run/svirt-jail-sock-{token}")
    abstract = f"svirt-jail-abstract-{token}"
    libc = ctypes.CDLL(None, use_errno=True)
    shm_key = 0x5A000000 | (int(token[:6], 16) & 0xFFFFFF)
    shm_id = libc.shmget(shm_key, 4096, IPC_CREAT | 0o666)
    if shm_id < 0:
        raise OSError(ctypes.get_errno(), "shmget")
    bait = Bait(token, etc_canary, var_canary, var_sock, run_sock, shm_key, shm_id, abstract, 0)
    with contextlib.ExitStack() as stack:
        for s in (_listen_unix(var_sock), _listen_unix(run_sock),
                  _listen_unix("\0" + abstract)):
            stack.callback(s.close)
        tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        stack.callback(tcp.close)
        tcp.bind(("127.0.0.1", 0))
        tcp.listen(4)
        bait.tcp_port = tcp.getsockname()[1]
        try:
            yield bait
        finally:
            libc.shmctl(shm_id, IPC_RMID, None)
            for p in (etc_canary, var_canary, var_sock, run_sock, *bait.leak_paths):
                p.unlink(missing_ok=True)


def make_disk(path: Path) -> Path:
    path.write_bytes(b"DISK" + b"\0" * 65532)
    path.chmod(0o644)
    return path


def children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children", encoding="ascii") as f:
        return [int(p) for p in f.read().split()]


def proc_context(pid: int) -> str:
    """The SELinux context of a process ("" without SELinux)."""
    try:
        with open(f"/proc/{pid}/attr/current", "rb") as f:
            return f.read().rstrip(b"\0\n").decode()
    except OSError:
        return ""


def read_jail(guest: Guest, timeout: float = 20.0) -> dict[str, Any]:
    line = guest.console.expect(JAIL_LINE, timeout)
    m = JAIL_LINE.search(line)
    if m is None:
        raise AssertionError(f"no JAIL report in {line[-200:]!r}")
    report: dict[str, Any] = json.loads(m.group(1))
    return report


def failed(result: str) -> bool:
    """Did an attempt fail ("absent": ENOENT; "denied: EPERM", ...)?"""
    return result == "absent" or result.startswith("denied: ")


def table(attempts: dict[str, str]) -> str:
    width = max(len(k) for k in attempts)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in attempts.items())


def json_list(result: str) -> list[str]:
    """The names of an "ok: [...]" listing."""
    names: list[str] = ast.literal_eval(result.removeprefix("ok: "))
    return names


@dataclass
class Attack:
    report: dict[str, Any]
    info: dict[str, Any]
    leaked: list[str]  # the guest's private /tmp, /dev/shm files seen on the host
    host_pids: list[int]  # the stand-in's host pid (tini's child)
    own_disk: Path
    other_disk: Path
    home: Path  # the guest's home (uml_dir), bound into its jail
    contexts: dict[str, str]  # SELinux contexts while both ran: "attacker", "victim"

    @property
    def attempts(self) -> dict[str, str]:
        t: dict[str, str] = self.report["attempts"]
        return t

    def describe(self, name: str) -> str:
        return (f"jail attempts of {name} (pid {self.report['pid']}, uid {self.info['uid']}):\n"
                f"{table(self.attempts)}\nstatus {self.report['status']}\n"
                f"mounts {self.report['mounts']}\nfds {self.report['fds']}")


def run_attack(standin: Path, image_dir: Path, registry: Registry, host: HostInfo | None,
               uids: set[int], bait: Bait, name: str, *, timeout: float = 20.0,
               stage: Callable[[str], None] | None = None) -> Attack:
    """Run the jail probe next to a real second guest (the victim) and return
    what it reported; both are stopped before this returns.  ``stage(what)``
    is called as "victim" starts, "attack" starts and "stop" starts (the lab
    attributes each stage's AVC denials to it)."""
    def enter(what: str) -> None:
        if stage is not None:
            stage(what)

    own_disk = make_disk(image_dir / f"{name}-own.img")
    other_disk = make_disk(image_dir / f"{name}-other.img")
    victim_spec = spec_dict(standin, f"{name}-victim", disks=[other_disk])
    enter("victim")
    with launch(build_spec(victim_spec), registry=registry, host=host) as victim:
        uids.add(read_info(victim, timeout)["uid"])
        (victim_pid,) = children(victim.pid)
        contexts = {"victim": proc_context(victim_pid)}
        spec = spec_dict(standin, name, "jail", disks=[own_disk])
        spec["cmdline"] += bait.words() + f" other={other_disk} victim={victim_pid}"
        enter("attack")
        with launch(build_spec(spec), registry=registry, host=host) as guest:
            report = read_jail(guest, timeout)
            info = read_info(guest, timeout)
            uids.add(info["uid"])
            leaked = [str(p) for p in bait.leak_paths if p.exists()]
            host_pids = children(guest.pid)
            contexts["attacker"] = proc_context(host_pids[0]) if host_pids else ""
            home = guest.run_dir
            enter("stop")
            guest.stop()
        victim.stop()
    return Attack(report, info, leaked, host_pids, own_disk, other_disk, Path(home), contexts)


def expected_listings(objects: list[Path]) -> dict[str, set[str]]:
    """What the jail may show when listed: its skeleton, and the path of each
    object bound into it (its own disk, its kernel, its home)."""
    allowed: dict[str, set[str]] = {"/": set(JAIL_ROOT), "/dev": {*DEVICES, "fd", "shm"}}
    for obj in objects:
        parts = obj.parts
        for i in range(1, len(parts)):
            allowed.setdefault(str(Path(*parts[:i])), set()).add(parts[i])
    return allowed


def jail_problems(a: Attack, bait: Bait, standin: Path, *, own_tests: bool = True,
                  mac_refuses_listings: bool = False) -> list[str]:
    """Everything the attack reached that it must not have (empty: the jail
    held).  ``own_tests=False`` leaves out :data:`OWN_TESTS`.
    ``mac_refuses_listings``: the guest's MAC policy may refuse to list the
    jail's directories (AppArmor: no read rule for them), which then show
    nothing; by default each must be listed, so that what it shows is checked."""
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
    must_fail = [k for k in t if (own_tests or k not in OWN_TESTS) and k.startswith((
        "read ", "connect ", "kill ", "open ", "capset", "prctl", "setuid", "mount",
        "mknod", "sysv", "stat /dev/", "write /usr", "write own kernel"))]
    if own_tests:
        must_fail += [k for k in OWN_TESTS if k not in must_fail]
    must_fail += [f"list {d}" for d in HOST_ONLY]
    for k in must_fail:
        expect(k in t and failed(t[k]), f"{k}: {t.get(k, 'not tried')}")
    expect(len(must_fail) >= 50, f"only {len(must_fail)} attempts")
    # PID 1 (tini) is not dumpable: its root link is refused (test_pid1.py)
    up = t["/proc/1/root/.. is the jail root"]
    expect(failed(up), f"/proc/1/root/..: {up} (PID 1 is dumpable)")
    expect(t["write /tmp"].startswith("ok") and t["write /dev/shm"].startswith("ok"),
           f"private /tmp, /dev/shm unwritable: {t['write /tmp']}, {t['write /dev/shm']}")
    expect(not a.leaked, f"the guest's private files appear on the host: {a.leaked}")
    # what the listings may show: the jail's own skeleton and the guest's objects
    # (/proc: the pids, below)
    listings = {k.removeprefix("list "): json_list(v) for k, v in t.items()
                if k.startswith("list ") and k != "list /proc" and v.startswith("ok")}
    allowed = expected_listings([a.own_disk, standin, a.home])
    needed = {"/", "/dev", str(a.own_disk.parent)} | ({"/var", "/var/tmp", "/run"} & set(allowed))
    refused = {k.removeprefix("list ") for k, v in t.items()
               if mac_refuses_listings and k.startswith("list ") and v == "denied: EACCES"}
    expect(needed <= set(listings) | refused, f"listings missing: {needed - set(listings)}")
    for d, names in listings.items():
        extra = set(names) - allowed.get(d, set())
        expect(not extra, f"the jail's {d} shows {sorted(extra)}")
    for name in (bait.var_canary.name, bait.var_sock.name):
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
    return problems


# ------------------------------------------------------------------ hostfs
#: how every secret of these attacks begins (canaries, a victim's disk): an
#: attempt whose output holds it reached the secret
CANARY_PREFIX = "host /"


@dataclass
class HostfsAttack:
    mounted: tuple[int, str]  # mount -t hostfs of the guest's "/" (its jail)
    names: set[str]  # what that mount shows
    results: dict[str, tuple[int, str]]  # attempt: (exit status, output)
    own_tmp: tuple[int, str]  # the jail's /tmp through hostfs, written and read back

    def table(self) -> str:
        return table({k: f"exit {s}: {o.strip()[:60]}" for k, (s, o) in self.results.items()})


def hostfs_attack(guest: Guest, bait: Bait, other_disk: Path | None = None,
                  timeout: float = 60.0) -> HostfsAttack:
    """Root in a jailed UML guest (the tiny guest's ``svirt.mode=shell``)
    mounts hostfs (Debian's UML kernel has it) and goes for the host's files
    and, by its path, another running guest's disk."""
    mounted = guest.shell("mkdir -p /mnt /mnt2 && mount -t hostfs none /mnt -o / "
                          "&& echo mounted", timeout=timeout)
    _, listing = guest.shell("ls -a /mnt", timeout=timeout)
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
    if other_disk is not None:
        attempts["read another guest's disk"] = f"head -c 64 /mnt{other_disk}"
        attempts["... through hostfs of its directory"] = (
            f"umount /mnt2; mount -t hostfs none /mnt2 -o {other_disk.parent} && "
            f"head -c 64 /mnt2/{other_disk.name}")
    results = {what: guest.shell(cmd, timeout=timeout) for what, cmd in attempts.items()}
    own_tmp = guest.shell(f"echo jailed >/mnt/tmp/svirt-jail-{bait.token} && "
                          f"cat /mnt/tmp/svirt-jail-{bait.token}", timeout=timeout)
    return HostfsAttack(mounted, set(listing.split()) - {".", ".."}, results, own_tmp)


def hostfs_problems(h: HostfsAttack, bait: Bait, objects: list[Path]) -> list[str]:
    """What hostfs reached beyond the jail (``objects``: the guest's own,
    bound into its jail: kernel, initrd, disks, home)."""
    problems = []
    if h.mounted != (0, "mounted\n"):
        problems.append(f"hostfs mount of the jail failed: {h.mounted}")
    jail_root = expected_listings(objects)["/"]
    if not h.names or not h.names <= jail_root:
        problems.append(f"hostfs of / shows {sorted(h.names)}, not the jail ({sorted(jail_root)})")
    reached = {k: r for k, r in h.results.items() if r[0] == 0 or CANARY_PREFIX in r[1]}
    if reached:
        problems.append(f"hostfs reached the host: {reached}")
    if h.own_tmp != (0, "jailed\n"):
        problems.append(f"the jail's own /tmp does not work through hostfs: {h.own_tmp}")
    for leak in (bait.leak_paths[0], Path(f"/usr/svirt-hostfs-{bait.token}")):
        if leak.exists():
            problems.append(f"{leak} appeared on the host")
    return problems
