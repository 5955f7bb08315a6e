"""The jail, attacked from inside: a stand-in hypervisor (``attack=jail``),
running as its guest's uid as PID 2 of its own PID namespace (tini is PID 1),
tries to reach the host and another guest, and reports each attempt on its
console; every attempt must fail, while its own disk and console work.  Then
a real UML guest, booted jailed, is inspected from the host side."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from svirt.host import HostInfo
from svirt.images.build import TinyGuest
from svirt.launcher.launch import launch
from svirt.launcher.registry import Registry
from svirt.spec import Backend
from svirt.testing import tiny_spec

from .jail_attack import (
    Attack,
    Bait,
    children,
    failed,
    hostfs_attack,
    hostfs_problems,
    jail_problems,
    plant_bait,
    run_attack,
    table,
)


@pytest.fixture
def bait() -> Iterator[Bait]:
    with plant_bait() as b:
        yield b


def _status(pid: int) -> dict[str, str]:
    out = {}
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            key, _, value = line.partition(":")
            out[key] = value.strip()
    return out


def _attack(standin: Path, image_dir: Path, registry: Registry, host: HostInfo,
            uids: set[int], bait: Bait, name: str) -> Attack:
    a = run_attack(standin, image_dir, registry, host, uids, bait, name)
    print("\n" + a.describe(name))
    return a


def test_a_jailed_hypervisor_reaches_nothing_of_the_host(
    standin: Path, image_dir: Path, hostile_registry: Registry, host: HostInfo,
    guest_uids: set[int], bait: Bait,
) -> None:
    started = time.monotonic()
    a = _attack(standin, image_dir, hostile_registry, host, guest_uids, bait, "jail-a")
    # ptrace of PID 1, user namespaces, the host's network namespace: tests of their own
    problems = jail_problems(a, bait, standin, own_tests=False)
    print(f"jail: {len(a.attempts)} attempts in {time.monotonic() - started:.1f} s")
    assert not problems, "jail holes:\n  " + "\n  ".join(problems) + "\n" + table(a.attempts)


def test_a_jailed_hypervisor_cannot_trace_its_init(
    standin: Path, image_dir: Path, hostile_registry: Registry, host: HostInfo,
    guest_uids: set[int], bait: Bait,
) -> None:
    """tini (PID 1) runs as the guest's uid: a tracer of it could, e.g., clear
    its PDEATHSIG (the namespace's tie to the supervisor) or keep it alive."""
    a = _attack(standin, image_dir, hostile_registry, host, guest_uids, bait, "jail-pt")
    result = a.attempts["ptrace attach pid 1"]
    assert failed(result), f"ptrace(PTRACE_ATTACH, 1) from the hypervisor: {result}"


def test_a_jailed_hypervisor_cannot_make_a_user_namespace(
    standin: Path, image_dir: Path, hostile_registry: Registry, host: HostInfo,
    guest_uids: set[int], bait: Bait,
) -> None:
    """unshare(CLONE_NEWUSER) gives back a full capability set (in a namespace
    of its own): mounts, new network and mount namespaces, the kernel's
    namespaced attack surface."""
    a = _attack(standin, image_dir, hostile_registry, host, guest_uids, bait, "jail-us")
    result = a.attempts["unshare user namespace"]
    assert failed(result), f"unshare(CLONE_NEWUSER) from the hypervisor: {result}"


def test_a_jailed_hypervisor_reaches_no_host_network_socket(
    standin: Path, image_dir: Path, hostile_registry: Registry, host: HostInfo,
    guest_uids: set[int], bait: Bait,
) -> None:
    """Sockets of the host's network namespace: an abstract unix socket and a
    TCP listener on 127.0.0.1 (a jail with no network namespace of its own,
    for a guest without NICs, reaches both)."""
    a = _attack(standin, image_dir, hostile_registry, host, guest_uids, bait, "jail-net")
    t = a.attempts
    reached = [f"{k}: {t[k]}" for k in ("connect abstract", "connect tcp") if not failed(t[k])]
    assert not reached, "the host's network namespace:\n  " + "\n  ".join(reached)


def test_a_real_uml_guest_runs_jailed(
    tiny_uml: TinyGuest, hostile_registry: Registry, host: HostInfo, guest_uids: set[int],
) -> None:
    spec = tiny_spec(tiny_uml, "jail-uml", Backend.UML)
    assert spec.jail
    with launch(spec, registry=hostile_registry, host=host) as guest:
        guest.console.expect_line("SVIRT-READY", timeout=60)
        init = guest.pid
        (hypervisor,) = children(init)
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
        for pid in children(hypervisor):
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
        h = hostfs_attack(guest, bait)
        home = guest.run_dir
        guest.stop()
    print("\nhostfs attempts from a jailed UML guest:\n" + h.table())
    problems = hostfs_problems(h, bait, [Path(tiny_uml.kernel), Path(tiny_uml.initrd), home])
    assert not problems, "\n".join(problems)
