"""The chaos run's world: a private registry, images, canaries, and a QEMU
stand-in that the real launch path finds as ``qemu-system-x86_64``.

svirt execs QEMU by name from a fixed PATH (``/usr/local/sbin`` first) and
the jail binds ``/usr`` (not recursively) into the guest's root.  So the
stand-in is put in place the only way both see it without touching the
host: the chaos process enters a mount namespace of its own and mounts an
overlay on ``/usr`` whose upper layer holds ``local/sbin/qemu-system-x86_64``.
Every svirt command of the run (and the supervisor they start) is its child
and inherits that namespace; nothing outside it sees the overlay.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from svirt.images.firmware import OVMF_VARS
from svirt.launcher import storage

HERE = Path(__file__).resolve().parent
HYPERVISOR = HERE / "hypervisor.py"
HELPER_C = HERE / "helper.c"
#: chaos runs' uid ranges: UID_BASE + k * UID_SPAN for the first k no other
#: chaos run holds (a flock on /run/svirt-chaos-uids-K.lock), so runs at the
#: same time never take each other's processes for their own.  Far from the
#: other suites' bases (1500000, 1600000, 1700000-1720000): svirt's orphan
#: sweep (gc) takes every uid in [base, base + 65536) that carries no other
#: registry's tag for its own, so overlapping windows kill each other's guests
UID_BASE = 1_850_000
UID_SPAN = 4096  # slots are host-wide and small
UID_RANGES = 12
CLONE_NEWNS = 0x00020000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18


@dataclass
class GuestDef:
    name: str
    shape: str  # uml | qemu
    jail: bool
    disk: Path
    disk_format: str
    ephemeral: bool = False


@dataclass
class World:
    base: Path  # the image root (0755): stand-in, helper, disks, specs, outputs
    run_root: Path
    state: Path
    env: dict[str, str]
    guests: list[GuestDef]
    kernel: Path  # the UML stand-in
    vmlinuz: Path  # a dummy QEMU kernel
    helper: Path
    canary_base: Path
    fifo: Path
    uid_range: range  # a FIFO in the image root (backing_fifo names it)
    targets: list[Path] = field(default_factory=list)

    @property
    def svirt(self) -> str:
        return str(Path(sys.executable).with_name("svirt"))


def enter_private_usr(base: Path) -> None:
    """This process's own mount namespace, /usr overlaid with the QEMU stand-in."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNS) != 0:
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNS)")
    if libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None) != 0:
        errno_value = ctypes.get_errno()
        if errno_value != errno.EINVAL:
            raise OSError(errno_value, "mount --make-rprivate /")
        # "/" is no mount point: a chroot (../shared/tools/fresh-debian runs the
        # suite in one).  Every mount this root can name is made private
        # instead; the one holding "/" cannot be named from here
        for point, _fstype, _source in storage.mounts():
            if libc.mount(b"none", os.fsencode(point), None, MS_REC | MS_PRIVATE, None) != 0:
                raise OSError(ctypes.get_errno(), f"mount --make-rprivate {point!r}")
    upper = base / "usr-layer"
    sbin = upper / "local" / "sbin"
    sbin.mkdir(parents=True, mode=0o755)
    for d in (upper, upper / "local", sbin):
        d.chmod(0o755)
    qemu = sbin / "qemu-system-x86_64"
    shutil.copyfile(HYPERVISOR, qemu)
    qemu.chmod(0o755)
    opts = f"lowerdir={upper}:/usr".encode()
    if libc.mount(b"chaos-usr", b"/usr", b"overlay", 1, opts) != 0:  # MS_RDONLY
        raise OSError(ctypes.get_errno(), "overlay on /usr")


def claim_uid_range() -> range:
    """A uid range of this run's alone (its lock is held until the process ends)."""
    for k in range(UID_RANGES):
        fd = os.open(f"/run/svirt-chaos-uids-{k}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                     0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        return range(UID_BASE + k * UID_SPAN, UID_BASE + (k + 1) * UID_SPAN)  # fd kept
    raise RuntimeError(f"{UID_RANGES} chaos runs at once already")


def build(include_jail_off: bool = True) -> World:
    uids = claim_uid_range()
    base = Path(tempfile.mkdtemp(prefix="svirt-chaos-", dir="/var/tmp"))  # noqa: S108
    base.chmod(0o755)
    enter_private_usr(base)
    run_root = Path(tempfile.mkdtemp(prefix="svirt-chaos-run-", dir="/run"))
    run_root.chmod(0o755)
    state = Path(tempfile.mkdtemp(prefix="svirt-chaos-state-", dir="/var/tmp"))  # noqa: S108
    kernel = base / "linux-chaos"
    shutil.copyfile(HYPERVISOR, kernel)
    kernel.chmod(0o755)
    vmlinuz = base / "vmlinuz"
    vmlinuz.write_bytes(b"\0" * 4096)
    vmlinuz.chmod(0o644)
    helper = base / "helper"
    subprocess.run(["gcc", "-O1", "-static", "-o", str(helper), str(HELPER_C)],  # noqa: S607
                   check=True, capture_output=True)
    helper.chmod(0o755)
    (base / "out").mkdir(mode=0o700)
    fifo = base / "trap.fifo"
    os.mkfifo(fifo, 0o644)
    config = base / "svirt.toml"
    config.write_text(f"image_roots = [{json.dumps(str(base))}]\n"
                      f"log_roots = [{json.dumps(str(base))}]\n"
                      f"state_dir = {json.dumps(str(state))}\n")
    guests = [
        GuestDef("chaos-u0", "uml", True, _raw(base / "u0.img"), "raw"),
        GuestDef("chaos-q0", "qemu", True, _qcow2(base / "q0.qcow2"), "qcow2"),
        GuestDef("chaos-q1", "qemu", True, _raw(base / "q1-base.img"), "raw", ephemeral=True),
    ]
    if include_jail_off:
        guests.insert(1, GuestDef("chaos-u1", "uml", False, _raw(base / "u1.img"), "raw"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("SVIRT_")}
    env.update({"SVIRT_RUN_DIR": str(run_root), "SVIRT_STATE_DIR": str(state),
                "SVIRT_UID_BASE": str(uids.start), "SVIRT_CONFIG": str(config),
                "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "PYTHONDONTWRITEBYTECODE": "1"})
    env.pop("SVIRT_DEBUG", None)
    canary_base = Path(tempfile.mkdtemp(prefix="svirt-chaos-canary-", dir="/var/tmp"))  # noqa: S108
    return World(base, run_root, state, env, guests, kernel, vmlinuz, helper, canary_base,
                 fifo, uids)


def _raw(path: Path) -> Path:
    path.write_bytes(b"\0" * (1 << 20))
    path.chmod(0o644)
    return path


def _qcow2(path: Path) -> Path:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "4M"],  # noqa: S607
                   check=True, capture_output=True)
    path.chmod(0o644)
    return path


def spec_text(world: World, g: GuestDef, words: str, *, restart: str = "no") -> str:
    """The guest's TOML spec with these command-line words."""
    kernel = world.kernel if g.shape == "uml" else world.vmlinuz
    lines = [f"name = {json.dumps(g.name)}", f"backend = {json.dumps(g.shape)}",
             f"kernel = {json.dumps(str(kernel))}", f"initrd = {json.dumps(str(world.helper))}",
             f"memory = {48 if g.shape == 'uml' else 64}", f"cmdline = {json.dumps(words)}",
             "shutdown_timeout = 1", f"jail = {'true' if g.jail else 'false'}",
             f"restart = {json.dumps(restart)}", "max_restarts = 2", "restart_window = 60"]
    if g.shape == "qemu":  # UEFI (a kernel too: OVMF boots it) with a persistent store
        lines += ['accel = "tcg"', 'firmware = "uefi"', f"nvram = {json.dumps(str(nvram(g)))}",
                  "agent = true"]  # the agent port: svirt exec and cp
    lines += ["[[disk]]", f"path = {json.dumps(str(g.disk))}",
              f"format = {json.dumps(g.disk_format)}"]
    if g.ephemeral:
        lines.append("ephemeral = true")
    return "\n".join(lines) + "\n"


def nvram(g: GuestDef) -> Path:
    """A QEMU guest's persistent NVRAM store, beside its disk (svirt makes it)."""
    return g.disk.with_name(f"{g.name}-vars.fd")


def fix_nvram(g: GuestDef) -> None:
    """Remove a store an nvram primitive left unusable (resized, a second
    link): the next start would refuse it, rightly, every time."""
    store = nvram(g)
    with contextlib.suppress(FileNotFoundError):
        st = store.lstat()
        if (st.st_nlink > 1 or st.st_size != OVMF_VARS.stat().st_size
                or not stat.S_ISREG(st.st_mode)):
            store.unlink()


def fix_disk(g: GuestDef) -> None:
    """Give a guest its disk back as it was (a primitive may have filled or
    rewritten it): the next start must not fail for what the last run did."""
    if g.disk_format == "qcow2":
        g.disk.unlink(missing_ok=True)
        _qcow2(g.disk)
    else:
        st = os.stat(g.disk)
        if st.st_size != 1 << 20 or not stat.S_ISREG(st.st_mode):
            g.disk.unlink(missing_ok=True)
            _raw(g.disk)


def cleanup(world: World) -> None:
    """Remove the run's directories (rm: iterative, so a guest's deep tree
    in a home that svirt failed to remove cannot make this recurse)."""
    for stolen in Path("/var/tmp").glob("stolen-nvram-*"):  # noqa: S108 - nvram_link's
        stolen.unlink(missing_ok=True)
    for path in (world.run_root, world.state, world.base, world.canary_base):
        subprocess.run(["rm", "-rf", "--one-file-system", str(path)],  # noqa: S607
                       check=False, capture_output=True)
