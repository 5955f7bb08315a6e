"""`svirt demo`: build two tiny guests and boot them side by side, confined.

Called by cli.py only; it prints for humans.
"""

from __future__ import annotations

import time
from contextlib import ExitStack

from svirt.host import probe_host
from svirt.images import build
from svirt.launcher.launch import Guest, launch
from svirt.security.selinux import process_label
from svirt.security.stack import choose_models
from svirt.spec import Backend, GuestSpec


def _status_line(pid: int, key: str) -> str:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return " ".join(line.split()[1:])
    except OSError:
        pass
    return "?"


def describe_process(guest: Guest) -> str:
    uid = _status_line(guest.pid, "Uid").split()[0]
    gid = _status_line(guest.pid, "Gid").split()[0]
    groups = _status_line(guest.pid, "Groups") or "none"
    capeff = _status_line(guest.pid, "CapEff")
    capbnd = _status_line(guest.pid, "CapBnd")
    se = process_label(guest.pid) or "(no LSM label)"
    return (f"pid {guest.pid}  uid {uid} gid {gid}  groups {groups}  "
            f"CapEff {capeff} CapBnd {capbnd}  label {se}")


def run_demo() -> int:
    host = probe_host()
    print(f"host: KVM {'usable' if host.kvm.usable else 'unusable: ' + host.kvm.reason}")
    t0 = time.monotonic()
    uml = build.tiny_uml_guest()
    qemu = build.tiny_qemu_guest()
    print(f"tiny guests ready in {time.monotonic() - t0:.1f} s (cached after the first run)")
    specs = [
        GuestSpec(name="demo-uml", backend=Backend.UML, kernel=uml.kernel, initrd=uml.initrd,
                  memory=128, cmdline=build.guest_cmdline("stay", marker="DEMO-UML-UP"),
                  shutdown_timeout=20),
        GuestSpec(name="demo-qemu", backend=Backend.QEMU, kernel=qemu.kernel,
                  initrd=qemu.initrd, memory=256,
                  cmdline=build.guest_cmdline("stay", marker="DEMO-QEMU-UP"),
                  shutdown_timeout=20),
    ]
    models = " + ".join(str(m) for m in choose_models(specs[0], host))
    print(f"host: SELinux {host.selinux}, AppArmor {'on' if host.apparmor else 'off'}, "
          f"SMACK {'on' if host.smack else 'off'}; drivers stacked: {models}")
    markers = {"demo-uml": "DEMO-UML-UP", "demo-qemu": "DEMO-QEMU-UP"}
    with ExitStack() as stack:
        guests = []
        for spec in specs:
            start = time.monotonic()
            guest = stack.enter_context(launch(spec))
            guests.append((guest, start))
            print(f"{spec.name}: started ({spec.backend}), "
                  f"labels {', '.join(f'{k}={v}' for k, v in guest.labels.items())}")
        for guest, start in guests:
            guest.console.expect_line(markers[guest.name], timeout=120)
            print(f"{guest.name}: booted to its marker in {time.monotonic() - start:.2f} s")
            print(f"  {describe_process(guest)}")
        for guest, _ in guests:
            outcome = guest.stop()
            print(f"{guest.name}: {outcome}")
    print("both guests stopped; labels, owners and run directories restored")
    return 0
