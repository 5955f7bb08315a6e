"""The ``firmware`` check of the SELinux and AppArmor passes: a guest booted
through UEFI with a cloud-init seed and an agent port, its three new objects
labelled for it alone, under the enforcing LSM.

The guest (``fw``): OVMF (Debian's ``ovmf``, in the lab image) with a
transient variables store, a blank disk, ``[cloud_init]`` and ``agent =
true``.  OVMF never gets past its own start in the lab (QEMU-TCG inside
QEMU-TCG) and need not: QEMU opens the store and the seed, and holds the
agent's listening socket, before the first guest instruction runs, which is
when the labels and the walls matter.  What is checked, with the running
matrix guest ``g1`` (QEMU) as the other guest:

* the objects' labels: the store (read-write) and the seed (private
  read-only) carry the guest's image context with its category pair
  (SELinux), or a rule of its profile (AppArmor: ``rwk`` and ``rk``); the
  agent socket's file carries the image context, the listening socket
  itself (QEMU's fd) the guest's process context;
* the normal path: QEMU holds the store and the seed open, accepts the
  launcher's connection to the agent socket (as ``svirt exec`` makes it),
  and nothing is denied while it starts, serves and stops (phases
  ``firmware:launch``, ``firmware:agent``, ``firmware:stop``);
* the attacks (phases ``firmware:attack:*``): the isolation probe in g1's
  label reads fw's store and seed, opens the store read-write and connects
  to fw's agent socket, first as g1 (its uid: DAC refuses, unlogged), then
  with fw's own uid (``mac-only``: only the MAC stands in the way; the agent
  socket, root's 0600, is opened to every uid for that probe alone,
  TEST-ONLY, and put back): each refused, each with a denial naming it;
* after the stop: the store, the seed and the socket are gone, the disk and
  log as they were.
"""

from __future__ import annotations

import os
import socket
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from svirt.backends.base import AGENT_FD
from svirt.images.firmware import OVMF_VARS, TRANSIENT_NVRAM
from svirt.images.seed import SEED_NAME
from svirt.launcher.channels import AGENT_SOCKET, connect_control
from svirt.launcher.launch import Guest, launch
from svirt.launcher.registry import Registry
from svirt.security.base import Driver
from svirt.spec import CloudInit, Firmware, GuestSpec
from tests.lab.inside import common
from tests.lab.inside.common import phase
from tests.lab.inside.main import (
    dac_ids,
    fd_targets,
    guest_files,
    prepare_guest_files,
    qemu_spec,
    stop_guest,
)

NAME = "fw"
#: the objects the check looks at, by what they are, in the guest's run directory
OBJECTS = {"nvram": TRANSIENT_NVRAM, "seed": SEED_NAME, "agent": AGENT_SOCKET}
#: what the probe does to each object, by the probe's argument
PROBE_ARGS = {"reads": ("nvram", "seed"), "opens_rw": ("nvram",), "connects": ("agent",)}
ATTACK_MODES = ("guest", "mac-only")
SO_PEERSEC = 31
ACCEPT_SECONDS = 10.0
#: QEMU's start inside the lab (TCG in TCG) to its block devices open
OPEN_SECONDS = 60.0


@dataclass(frozen=True)
class Mac:
    """What differs between the passes."""

    label_of: Callable[[Guest], str]  # a guest's MAC label (context / profile)
    probe: Callable[[str, int, int, dict[str, Any]], dict[str, Any]]
    denials: Callable[[str], list[str]]
    states: Callable[[list[Path]], dict[str, dict[str, Any]]]
    drivers: Callable[[GuestSpec], list[Driver] | None] = lambda spec: None


def fw_spec() -> GuestSpec:
    return qemu_spec(NAME, kernel=None, firmware=Firmware.UEFI, memory=128, agent=True,
                     cloud_init=CloudInit(user_data="#cloud-config\nhostname: fw-lab\n"))


def hypervisor(pid: int) -> int:
    """The jail's init's one child (the hypervisor), else ``pid``."""
    kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return int(kids[0]) if kids else pid


def wait_opened(pid: int, names: tuple[str, ...], timeout: float = OPEN_SECONDS
                ) -> tuple[int, dict[str, str]]:
    """The hypervisor of the guest ``pid`` once it holds a file of each of
    ``names`` open (QEMU opens its block devices before the first guest
    instruction), or when ``timeout`` ran out: its pid and its fds."""
    deadline = time.monotonic() + timeout
    while True:
        hv = hypervisor(pid)
        try:
            fds = fd_targets(hv)
        except OSError:
            fds = {}
        held = " ".join(fds.values())
        if all(f"/{n}" in held for n in names) or time.monotonic() > deadline:
            return hv, fds
        time.sleep(0.05)


def sockets(pid: int) -> int:
    """How many sockets ``pid`` holds (-1: it is gone)."""
    try:
        return sum(1 for t in fd_targets(pid).values() if t.startswith("socket:"))
    except OSError:
        return -1


def fd_label(pid: int, fd: int) -> str:
    """The SELinux label of ``pid``'s fd (a socket's: its own, not a file's)."""
    try:
        value = os.getxattr(f"/proc/{pid}/fd/{fd}", common.SELINUX_XATTR)
    except OSError as err:
        return f"? {err.strerror}"
    return value.rstrip(b"\0").decode()


def object_state(path: Path) -> dict[str, Any]:
    st = os.lstat(path)
    out: dict[str, Any] = {"uid": st.st_uid, "mode": oct(stat.S_IMODE(st.st_mode)),
                           "type": "socket" if stat.S_ISSOCK(st.st_mode) else "file"}
    for name, key in ((common.SELINUX_XATTR, "selinux"), (common.ACL_XATTR, "acl")):
        try:
            value = os.getxattr(path, name, follow_symlinks=False)
        except OSError:
            continue
        out[key] = value.rstrip(b"\0").decode() if key == "selinux" else value.hex()
    return out


def agent_normal_path(path: Path, hv: int, r: dict[str, Any]) -> None:
    """The launcher connects to the agent socket as ``svirt exec`` does; QEMU
    accepts (one more socket among its fds); the peer's label is the
    listening socket's."""
    before = sockets(hv)
    if before < 0:
        r["agent_accepted"] = None  # the hypervisor is gone
        return
    with connect_control(path) as sock:
        try:
            peer = sock.getsockopt(socket.SOL_SOCKET, SO_PEERSEC, 256)
            r["agent_peer_label"] = peer.rstrip(b"\0").decode(errors="replace")
        except OSError as err:
            r["agent_peer_label"] = f"? {err.strerror}"
        deadline = time.monotonic() + ACCEPT_SECONDS
        while sockets(hv) <= before and time.monotonic() < deadline:
            time.sleep(0.05)
        r["agent_accepted"] = sockets(hv) > before


def attack(mac: Mac, attacker: Guest, victim: Guest, objects: dict[str, Path],
           r: dict[str, Any]) -> None:
    """The probe in the attacker's label against the victim's objects: with
    the attacker's uid, then with the victim's (only the MAC in the way)."""
    args = {arg: [str(objects[k]) for k in keys] for arg, keys in PROBE_ARGS.items()}
    agent = objects["agent"]
    probes: dict[str, Any] = {}
    for mode in ATTACK_MODES:
        uid, gid = dac_ids(attacker if mode == "guest" else victim)
        name = f"firmware:attack:{mode}"
        phase(name)
        t0 = time.monotonic()
        if mode == "mac-only":
            agent.chmod(0o666)  # TEST-ONLY: DAC out of the way (root's 0600 socket)
        try:
            answer = mac.probe(mac.label_of(attacker), uid, gid, args)
        finally:
            agent.chmod(0o600)
        results = {f"{k}.{arg}": answer.get(arg, {}).get(str(objects[k]))
                   for arg, keys in PROBE_ARGS.items() for k in keys}
        probes[mode] = {"label": mac.label_of(attacker), "uid": uid, "results": results,
                        "error": answer.get("error"), "seconds": round(time.monotonic() - t0, 2),
                        "denials": mac.denials(name)}
    phase("firmware")
    r["probes"] = probes


def firmware_check(registry: Registry, attacker: Guest, mac: Mac, r: dict[str, Any]
                   ) -> list[str]:
    """Launch ``fw``, look at its objects, the normal path and ``attacker``'s
    probes (filling ``r``); the problems that do not depend on the LSM."""
    prepare_guest_files(NAME)
    files = guest_files(NAME)
    before = mac.states(files)
    run_dir = registry.run_dir(NAME)
    objects = {k: run_dir / n for k, n in OBJECTS.items()}
    spec = fw_spec()
    phase("firmware:launch")
    t0 = time.monotonic()
    with launch(spec, registry=registry, drivers=mac.drivers(spec)) as guest:
        r["launch_seconds"] = round(time.monotonic() - t0, 2)
        hv, r["fds"] = wait_opened(guest.pid, (OBJECTS["nvram"], OBJECTS["seed"]))
        r["opened_seconds"] = round(time.monotonic() - t0, 2)
        r["label"] = mac.label_of(guest)
        r["labels"] = {n: lab.to_dict() for n, lab in guest.record.labels.items()}
        r["context"] = common.proc_context(hv)
        r["uid"] = os.stat(f"/proc/{hv}").st_uid
        r["objects"] = {k: object_state(p) for k, p in objects.items()}
        r["agent_socket_label"] = fd_label(hv, AGENT_FD)  # QEMU's listening socket
        phase("firmware:agent")
        agent_normal_path(objects["agent"], hv, r)
        r["normal_denials"] = {p: mac.denials(p) for p in ("firmware:launch", "firmware:agent")}
        attack(mac, attacker, guest, objects, r)
        phase("firmware:stop")
        r["nvram_written"] = objects["nvram"].read_bytes() != OVMF_VARS.read_bytes()
        r["console_tail"] = guest.console.tail(400)
        r["running_seconds"] = round(time.monotonic() - t0, 2)
        r["outcome"] = stop_guest(guest)
    r["normal_denials"]["firmware:stop"] = mac.denials("firmware:stop")
    phase("firmware")
    r["left"] = [k for k, p in objects.items() if os.path.lexists(p)]
    r["diff"] = common.state_diff(before, mac.states(files))
    return firmware_problems(r)


def firmware_problems(r: dict[str, Any]) -> list[str]:
    problems = []
    held = " ".join(r["fds"].values())
    for k in ("nvram", "seed"):
        if f"/{OBJECTS[k]}" not in held:
            problems.append(f"QEMU does not hold its {k} open: {r['fds']}")
    if not r.get("agent_accepted"):
        problems.append("QEMU did not accept the launcher's connection to its agent socket")
    normal = {p: d for p, d in r["normal_denials"].items() if d}
    if normal:
        problems.append(f"denials on the normal path: {normal}")
    for mode, p in r["probes"].items():
        if p["error"] or None in p["results"].values():
            problems.append(f"the {mode} probe gave no answer: {p}")
            continue
        reached = {a: v for a, v in p["results"].items() if v == "ok"}
        if mode == "guest" and reached:
            problems.append(f"the other guest (its own uid) reached {reached}")
    if r["left"]:
        problems.append(f"left after the stop: {r['left']}")
    if r["diff"]:
        problems.append(f"not restored: {r['diff']}")
    return problems


def denied_objects(denials: list[str], objects: dict[str, str]) -> dict[str, list[str]]:
    """The denials naming each object (``name="..."`` of the audit record)."""
    return {k: [d for d in denials if f'name="{n}"' in d or f"/{n}\"" in d]
            for k, n in objects.items()}


def mac_only_problems(r: dict[str, Any], mediated: tuple[str, ...]) -> list[str]:
    """With the victim's uid, each of ``mediated`` (probe results, such as
    ``nvram.reads``) refused, with a denial naming its object."""
    p = r["probes"]["mac-only"]
    named = denied_objects(p["denials"], OBJECTS)
    r["mac_only_denied"] = named
    problems = []
    for result in mediated:
        k = result.split(".", 1)[0]
        if p["results"].get(result) == "ok":
            problems.append(f"mac-only: the other guest's label reached {result}")
        elif not named[k]:
            problems.append(f"mac-only: {result} refused ({p['results'].get(result)}) "
                            f"without a denial naming {OBJECTS[k]}")
    return problems


def selinux_firmware(registry: Registry, attacker: Guest, r: dict[str, Any]) -> None:
    """The SELinux pass's check: the objects carry the guest's image context
    (svirt_image_t with its pair), the agent's listening socket its process
    context; g1's context is refused each of them, with an AVC."""
    from tests.lab.inside.main import require, selinux_context

    mac = Mac(selinux_context, common.run_probe, common.denials_in_phase, common.states)
    problems = firmware_check(registry, attacker, mac, r)
    se = r["labels"]["selinux"]
    for k, state in r["objects"].items():
        if state.get("selinux") != se["image"]:
            problems.append(f"{k} labelled {state.get('selinux')}, not {se['image']}")
    if r.get("agent_socket_label") != se["process"]:
        problems.append(f"the agent's socket is {r.get('agent_socket_label')}, "
                        f"not {se['process']}")
    # a client's peer: the server's type with the client's own level (the
    # kernel copies the connecting socket's MLS range onto the new one)
    if not r.get("agent_peer_label", "").startswith("system_u:system_r:svirt_t:"):
        problems.append(f"the agent's peer is {r.get('agent_peer_label')}")
    if r["context"] != se["process"]:
        problems.append(f"fw runs as {r['context']}, not {se['process']}")
    problems += mac_only_problems(r, ("nvram.reads", "seed.reads", "nvram.opens_rw",
                                      "agent.connects"))
    r["problems"] = problems
    require(not problems, "; ".join(problems))


def apparmor_firmware(registry: Registry, attacker: Guest, r: dict[str, Any],
                      run_probe: Callable[[str, int, int, dict[str, Any]], dict[str, Any]],
                      denials: Callable[[str], list[str]],
                      states: Callable[[list[Path]], dict[str, dict[str, Any]]],
                      drivers: Callable[[GuestSpec], list[Driver] | None]) -> None:
    """The AppArmor pass's check: the guest's profile holds the store
    (``rwk``) and the seed (``rk``), g1's profile neither; g1's profile is
    refused both, with a denial.  The agent socket is not in any profile:
    upstream AppArmor (Debian 12's 6.1) does not mediate a connect to a
    socket by path, DAC (root's 0600) and the jail are its walls (reported,
    asserted by the host side as a known gap)."""
    from svirt.security.apparmor import PROFILE_FILE
    from tests.lab.inside.main import require

    def label_of(g: Guest) -> str:
        return g.record.labels["apparmor"].process

    run_dir = registry.run_dir(NAME)
    profiles: dict[str, str] = {}

    def probe(label: str, uid: int, gid: int, args: dict[str, Any]) -> dict[str, Any]:
        if not profiles:  # the victim's profile, while it is loaded
            profiles["fw"] = (run_dir / PROFILE_FILE).read_text()
        return run_probe(label, uid, gid, args)

    mac = Mac(label_of, probe, denials, states, drivers)
    problems = firmware_check(registry, attacker, mac, r)
    text = profiles.get("fw", "")
    # by name: a jailed hypervisor's rules name the paths it opens in its jail
    rules = {k: [line.strip() for line in text.splitlines() if f'/{n}" ' in line]
             for k, n in OBJECTS.items()}
    r["rules"] = rules
    want = {"nvram": " rwk,", "seed": " rk,"}
    for k, perms in want.items():
        if len(rules[k]) != 1 or perms not in rules[k][0]:
            problems.append(f"fw's profile has {rules[k]} for its {k}, not one{perms} rule")
    if r["context"] != f"{r['label']} (enforce)":
        problems.append(f"fw runs as {r['context']}, not {r['label']} (enforce)")
    problems += mac_only_problems(r, ("nvram.reads", "seed.reads", "nvram.opens_rw"))
    r["problems"] = problems
    require(not problems, "; ".join(problems))
