"""`svirt demo`: build two tiny guests and boot them side by side, confined;
`svirt demo --real`: the Debian image (built, or reused from the cache)
booted through UEFI with a cloud-init seed and reached through its agent.

Called by the cli only; it prints for humans.  What the guest wrote (its
hostname, its ``/etc/os-release``) is the guest's: printed through
:func:`svirt.termsafe.escape_bytes`, never raw.
"""

from __future__ import annotations

import os
import time
from contextlib import ExitStack
from pathlib import Path

from svirt.errors import AgentError, SvirtError
from svirt.host import probe_host
from svirt.images import build
from svirt.images.debian import DebianRecipe, Progress, ensure_debian
from svirt.launcher.launch import Guest, launch
from svirt.launcher.registry import Registry
from svirt.security.selinux import process_label
from svirt.security.stack import choose_models
from svirt.spec import Backend, CloudInit, Disk, DiskFormat, Firmware, GuestSpec
from svirt.termsafe import escape_bytes

REAL_NAME = "demo-debian"
REAL_HOSTNAME = "svirt-demo"
#: to qemu-ga under TCG on 2 busy cores: about 35-50 s
REAL_BOOT_SECONDS = 300
REAL_USER_DATA = """#cloud-config
write_files:
- path: /run/svirt-demo
  content: "written by cloud-init from svirt's seed\\n"
"""


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


def guest_text(data: bytes, indent: str = "  ") -> str:
    """Bytes the guest wrote, safe on a terminal: every control escaped."""
    text = escape_bytes(data).decode("utf-8", "replace").rstrip("\n")
    return "\n".join(indent + line for line in text.split("\n"))


def real_image(progress: Progress | None = None) -> tuple[Path, float]:
    """The default Debian image (BIOS and UEFI), built into the image cache
    unless it is there; how long that took."""
    start = time.monotonic()
    path = ensure_debian(DebianRecipe(), progress=progress)
    return path, time.monotonic() - start


def real_spec(image: Path) -> GuestSpec:
    return GuestSpec(name=REAL_NAME, memory=1024, firmware=Firmware.UEFI, agent=True,
                     disks=(Disk(image, format=DiskFormat.QCOW2, ephemeral=True),),
                     cloud_init=CloudInit(user_data=REAL_USER_DATA,
                                          meta_data={"local-hostname": REAL_HOSTNAME}),
                     shutdown_timeout=30)


def _image_facts(path: Path) -> tuple[object, ...]:
    st = path.stat()
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_uid, st.st_mode,
            sorted(os.listxattr(path)))


def _wait_for_agent(guest: Guest, start: float) -> float:
    while True:
        try:
            guest.exec(["true"], timeout=5)
            return time.monotonic() - start
        except AgentError:
            if not guest.running or time.monotonic() - start > REAL_BOOT_SECONDS:
                raise


def _show_guest(guest: Guest, run_dir: Path) -> None:
    print(f"  {describe_process(guest)}")
    for key, value in guest.labels.items():
        print(f"  label {key}: {value}")
    for path in sorted(run_dir.iterdir()):
        st = path.lstat()
        print(f"  {run_dir.name}/{path.name:<11} owner {st.st_uid}:{st.st_gid} "
              f"mode {st.st_mode & 0o7777:04o}")


def show_in_guest(guest: Guest, start: float) -> None:
    hostname = guest.exec(["hostname"]).stdout
    print(f"cloud-init set the hostname: {guest_text(hostname, '').strip()}")
    print(guest_text(guest.exec(["cat", "/run/svirt-demo"]).stdout))
    print(f"$ svirt exec {REAL_NAME} -- cat /etc/os-release")
    done = guest.exec(["cat", "/etc/os-release"])
    print(guest_text(done.stdout))
    print(f"  (exit status {done.returncode})")
    # systemd acts on the power button once the boot is done: wait for it
    # (bounded) so that the stop below is the graceful one
    waited = guest.exec(["cloud-init", "status", "--wait"], timeout=REAL_BOOT_SECONDS)
    status = guest_text(waited.stdout, "").strip().split("\n")[-1]  # after its dots
    print(f"{REAL_NAME}: cloud-init {status} {time.monotonic() - start:.1f} s after the start")


def run_real_demo(image: Path, seconds: float) -> int:
    """Boot ``image`` through UEFI, confined, with a seed and the agent; show
    what it runs as, run commands in it, stop it, show everything restored."""
    print(f"Debian image ready in {seconds:.1f} s: {image}")
    registry = Registry()
    before = _image_facts(image)
    spec = real_spec(image)
    start = time.monotonic()
    with launch(spec, registry=registry) as guest:
        uid, run_dir = guest.guest_uid, registry.run_dir(REAL_NAME)
        print(f"{REAL_NAME}: started through UEFI (OVMF, a transient NVRAM store), "
              f"{spec.memory} MiB, its disk an ephemeral layer over the image")
        _show_guest(guest, run_dir)
        agent = _wait_for_agent(guest, start)
        print(f"{REAL_NAME}: qemu-ga answered {agent:.1f} s after the start")
        show_in_guest(guest, start)
        stopping = time.monotonic()
        print(f"{REAL_NAME}: {guest.stop()} in {time.monotonic() - stopping:.1f} s")
    restored = [("run directory (NVRAM, seed, layer, agent socket) gone", not run_dir.exists()),
                ("no record left", registry.record_path(REAL_NAME).exists() is False),
                ("the image unchanged (owner, mode, xattrs, size, mtime)",
                 _image_facts(image) == before),
                (f"no process of uid {uid} left", uid is None or not _uid_has_processes(uid))]
    for what, ok in restored:
        print(f"  {'ok' if ok else 'NOT RESTORED'}: {what}")
    print(f"real guest demo: {time.monotonic() - start:.1f} s from launch to restored")
    if not all(ok for _, ok in restored):
        raise SvirtError("the real guest demo found something not restored")
    return 0


def _uid_has_processes(uid: int) -> bool:
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                if entry.stat().st_uid == uid:
                    return True
            except OSError:
                continue
    return False
