"""Build, cache and boot the svirt SELinux lab VM.

The host kernel has no SELinux, so enforcement is exercised inside a small
Debian bookworm VM ("the lab") booted with QEMU/TCG:

* a rootfs made with ``mmdebstrap --variant=minbase`` (cached on its own: it is
  the slow part and depends only on the package list);
* the project's policy module (``policy/svirt.te``/``.fc``/``.if``) compiled
  and installed with ``semodule -n`` inside the rootfs chroot;
* the tree labelled with ``setfiles`` (run inside the chroot, with /proc
  mounted in a private mount namespace) and packed with ``mke2fs -d``, which
  keeps ``security.selinux`` xattrs;
* ``/usr/sbin/lab-init`` as PID 1: it loads the policy, re-executes itself
  (``init_exec_t`` makes it leave ``kernel_t``), runs the requested command as
  the launcher domain under enforcing mode and reports the exit status, the
  output and the kernel log over a second serial port.

Everything is cached in ``/var/cache/svirt/lab`` (``SVIRT_LAB_CACHE``) keyed by
a hash of the package list, the policy sources and this file's build recipe.
Builds are atomic (temporary directory + rename) and serialised by a lock.
"""

from __future__ import annotations

import base64
import dataclasses
import fcntl
import hashlib
import inspect
import json
import os
import shlex
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
POLICY_DIR = REPO / "policy"
CACHE_DIR = Path(os.environ.get("SVIRT_LAB_CACHE", "/var/cache/svirt/lab"))

SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
PACKAGES: tuple[str, ...] = (
    "selinux-policy-default",
    "policycoreutils",
    "selinux-utils",
    "checkpolicy",
    "semodule-utils",
    "selinux-policy-dev",
    "python3",
    "python3-selinux",
    "python3-psutil",
    "python3-pyroute2",
    "python3-prctl",
    "python3-pytest",
    "qemu-system-x86",
    "qemu-utils",
    "user-mode-linux",
    "tini",  # PID 1 of every jail
    "linux-image-cloud-amd64",
    "initramfs-tools",
    "busybox-static",
    "iproute2",
    "kmod",
    # the AppArmor pass (test_lab_apparmor.py): apparmor_parser, aa-status
    "apparmor",
    "apparmor-utils",
    # the firmware check (tests/lab/inside/firmware.py): OVMF's code and variables template
    "ovmf",
)
# Only what the lab kernel needs to mount its root: virtio disk + ext4.
INITRAMFS_MODULES: tuple[str, ...] = ("virtio_pci", "virtio_blk", "ext4")
DPKG_EXCLUDES: tuple[str, ...] = ("/usr/share/man/*", "/usr/share/doc/*", "/usr/share/locale/*")

# Booleans set offline (setsebool -N -P) in the image.
BOOLEANS: dict[str, bool] = {
    # svirt_t needs execmem for TCG's JIT and for UML; refpolicy gates it here.
    "virt_use_execmem": True,
}

#: The domain the lab runs commands in: a root service started by init, the
#: way a host daemon launching guests would run.  init_t/initrc_t may
#: transition to unconfined_t; our module lets unconfined_t go to svirt_t.
LAUNCHER_CONTEXT = "system_u:system_r:unconfined_t:s0-s0:c0.c1023"

KERNEL_CMDLINE = (
    "root=/dev/vda rw security=selinux selinux=1 console=ttyS0 log_buf_len=4M "
    "init=/usr/sbin/lab-init panic=-1 quiet mitigations=off"
)

POLICY_FILE = "/etc/selinux/default/policy/policy.33"
FILE_CONTEXTS = "/etc/selinux/default/contexts/files/file_contexts"
INIT_CONTEXT = "system_u:object_r:init_exec_t:s0"
PAYLOAD_CONTEXT = "system_u:object_r:usr_t:s0"
RESULT_BEGIN = "===SVIRT-LAB-BEGIN==="
RESULT_END = "===SVIRT-LAB-END==="
COMMAND_MARKER = "svirt-lab: command start"
#: seconds of *timeout* kept for booting and reporting: the command itself is
#: killed inside the guest this much earlier, so its denials still come back.
GUEST_TIMEOUT_MARGIN = 30

LAB_INIT = r"""#!/bin/sh
# svirt lab init (PID 1).  Stage 1 runs as kernel_t before any policy exists.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
if [ "$1" != stage2 ]; then
    mountpoint -q /proc || mount -t proc proc /proc
    mountpoint -q /sys || mount -t sysfs sysfs /sys
    mountpoint -q /dev || mount -t devtmpfs devtmpfs /dev
    # the AppArmor and SMACK passes load no SELinux policy
    grep -qwE 'security=(apparmor|smack)' /proc/cmdline ||
        load_policy -i || echo "lab-init: load_policy failed" > /dev/console
    # /usr/sbin/lab-init is init_exec_t: kernel_t -> init_t on exec.
    exec /usr/sbin/lab-init stage2
fi
# The AppArmor and SMACK passes: no labels, no runcon (the command runs as
# root, unconfined or with the floor label, like a host daemon); their result
# reports the LSMs.  The SMACK pass is this image booted under User-Mode-Linux
# (ubd disks; its modules in /usr/lib/uml/modules).
LSM=selinux
grep -qw security=apparmor /proc/cmdline && LSM=apparmor
grep -qw security=smack /proc/cmdline && LSM=smack
PAYLOAD=/dev/vdb
[ -b /dev/ubdb ] && PAYLOAD=/dev/ubdb
UML_MODULES=/usr/lib/uml/modules/$(uname -r)
[ -d "$UML_MODULES" ] && ln -sfn "$UML_MODULES" "/lib/modules/$(uname -r)"
mountpoint -q /run || mount -t tmpfs -o mode=0755 tmpfs /run
mount -t tmpfs -o mode=1777 tmpfs /tmp
mkdir -p /dev/pts /dev/shm /lab
mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts /dev/pts
# cgroup v2 with its controllers: svirt puts each guest in a cgroup of its own
mountpoint -q /sys/fs/cgroup || mount -t cgroup2 cgroup2 /sys/fs/cgroup
mount -t tmpfs -o mode=1777 tmpfs /dev/shm
# No udev here: load tun now so that /dev/net/tun exists before the relabel.
modprobe tun
if [ "$LSM" != selinux ]; then
    mount -t securityfs securityfs /sys/kernel/security
    [ "$LSM" = smack ] && mount -t smackfs smackfs /sys/fs/smackfs
    exec < /dev/null > /dev/console 2>&1
    echo 0 > /proc/sys/kernel/printk_ratelimit
    mount "$PAYLOAD" /lab
    echo "@COMMAND_MARKER@" > /dev/kmsg
    cd /lab
    { timeout -k 5 "$(cat /lab/.lab/timeout)" /bin/sh /lab/.lab/cmd.sh < /dev/null
      echo $? > /run/lab-rc; } 2>&1 | tee /dev/ttyS0 > /run/lab-out
    cd /
    RC=$(cat /run/lab-rc 2>/dev/null || echo 255)
    {
        echo "@RESULT_BEGIN@"
        echo "exit=$RC"
        echo "lsm=$(cat /sys/kernel/security/lsm)"
        echo "uptime=$(cut -d' ' -f1 /proc/uptime)"
        echo "output=$(base64 -w0 /run/lab-out)"
        echo "dmesg=$(busybox dmesg | base64 -w0)"
        echo "@RESULT_END@"
    } > /dev/ttyS1
    sync
    echo o > /proc/sysrq-trigger
    sleep 30
fi
# Everything in /dev and /run was created before the policy was loaded.
restorecon -R /dev /run /tmp
exec < /dev/null > /dev/console 2>&1
echo 0 > /proc/sys/kernel/printk_ratelimit
mount -o defcontext=@PAYLOAD_CONTEXT@ /dev/vdb /lab
[ -f /lab/.lab/enforce ] && setenforce "$(cat /lab/.lab/enforce)"
echo "@COMMAND_MARKER@" > /dev/kmsg
# The command's output goes through a pipe created in the launcher domain,
# as if an administrator had run it; the lab's own files stay out of reach.
# It is also copied live to the console, for diagnosing hangs; the guest-side
# timeout leaves time to report the denials of a command that hangs.
runcon "$(cat /lab/.lab/context)" /bin/sh -c \
    'cd /lab && { timeout -k 5 "$(cat /lab/.lab/timeout)" /bin/sh /lab/.lab/cmd.sh < /dev/null;
                  echo $? > /run/lab-rc; } 2>&1 | tee /dev/ttyS0' > /run/lab-out
RC=$(cat /run/lab-rc 2>/dev/null || echo 255)
{
    echo "@RESULT_BEGIN@"
    echo "exit=$RC"
    echo "enforce=$(cat /sys/fs/selinux/enforce)"
    echo "uptime=$(cut -d' ' -f1 /proc/uptime)"
    echo "output=$(base64 -w0 /run/lab-out)"
    echo "dmesg=$(busybox dmesg | base64 -w0)"
    echo "@RESULT_END@"
} > /dev/ttyS1
sync
echo o > /proc/sysrq-trigger
sleep 30
"""


class LabError(RuntimeError):
    """The lab could not be built or did not report a result."""


class LabTimeout(LabError):
    """The lab VM did not power off in time."""


@dataclasses.dataclass(frozen=True)
class LabResult:
    exit_code: int
    output: str
    #: AVC denials logged while the command ran (``avc:  denied`` lines).
    denials: list[str]
    #: wall-clock seconds of the whole pass: qemu start to power-off.
    seconds: float
    enforcing: bool = True
    #: guest uptime when the result was written (boot + command)
    guest_uptime: float = 0.0
    #: guest uptime when the command started (boot to ready)
    boot_seconds: float = 0.0
    dmesg: str = ""
    console: str = ""
    #: /sys/kernel/security/lsm of the AppArmor pass ("" in the SELinux pass)
    lsms: str = ""


@dataclasses.dataclass(frozen=True)
class LabImage:
    directory: Path
    root: Path
    kernel: Path
    initrd: Path
    manifest: dict[str, object]


#: host tools the lab needs (mmdebstrap only for a cold build, but always asked)
HOST_TOOLS: tuple[str, ...] = ("mmdebstrap", "qemu-system-x86_64", "mke2fs", "unshare")


def skip_reason(lsm: str = "selinux") -> str | None:
    """Why the lab cannot run on this host, for ``pytest.skip`` (None: it can)."""
    if os.geteuid() != 0:
        return "the lab image is built with mmdebstrap/chroot as root"
    missing = [t for t in HOST_TOOLS if not shutil.which(t)]
    if lsm == "smack" and not os.access(UML_KERNEL, os.X_OK):
        missing.append(UML_KERNEL)
    if missing:
        return f"lab tools missing on the host: {', '.join(missing)}"
    return None


# --------------------------------------------------------------------------
# cache keys


def _digest(*parts: str | bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()[:16]


def _policy_sources() -> list[Path]:
    return sorted(p for p in POLICY_DIR.glob("svirt.*") if p.suffix in (".te", ".fc", ".if"))


def base_key() -> str:
    """Key of the unlabelled rootfs: packages + the rootfs recipe."""
    return _digest(
        SUITE,
        MIRROR,
        "\n".join(PACKAGES),
        "\n".join(INITRAMFS_MODULES),
        "\n".join(DPKG_EXCLUDES),
        inspect.getsource(_build_rootfs),
    )


def image_key() -> str:
    """Key of the bootable image: base + policy sources + the image recipe."""
    parts: list[str | bytes] = [base_key(), LAB_INIT, json.dumps(BOOLEANS, sort_keys=True)]
    parts += [PAYLOAD_CONTEXT, INIT_CONTEXT, COMMAND_MARKER, RESULT_BEGIN, RESULT_END]
    parts.append(inspect.getsource(_build_image))
    for src in _policy_sources():
        parts += [src.name, src.read_bytes()]
    return _digest(*parts)


# --------------------------------------------------------------------------
# building


def _run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        raise LabError(f"{shlex.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}")
    return proc


@contextmanager
def _locked(path: Path, mode: int) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        fcntl.flock(f, mode)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _build_rootfs(dest: Path) -> None:
    """mmdebstrap the unlabelled lab rootfs into *dest* (must not exist)."""
    modules = "\\n".join(INITRAMFS_MODULES)
    # Before the kernel's postinst runs update-initramfs: only our modules.
    hook = (
        'mkdir -p "$1/etc/initramfs-tools/conf.d" "$1/usr/share/initramfs-tools/modules.d" && '
        "printf 'MODULES=list\\n' > \"$1/etc/initramfs-tools/conf.d/svirt-lab.conf\" && "
        f"printf '{modules}\\n' > \"$1/usr/share/initramfs-tools/modules.d/svirt-lab\""
    )
    cmd = [
        "mmdebstrap",
        "--variant=minbase",
        "--mode=root",
        "--include=" + ",".join(PACKAGES),
        "--essential-hook=" + hook,
    ]
    cmd += [f"--dpkgopt=path-exclude={p}" for p in DPKG_EXCLUDES]
    cmd += [SUITE, str(dest), MIRROR]
    _run(cmd)


def _chroot(root: Path, *args: str) -> str:
    return _run(["chroot", str(root), *args]).stdout


def _build_image(base: Path, out: Path) -> dict[str, float]:
    """Labelled ext4 image + kernel/initrd from the *base* rootfs into *out*."""
    timings: dict[str, float] = {}
    root = out / "root"
    t0 = time.monotonic()
    _run(["cp", "-a", "--reflink=auto", str(base), str(root)])
    timings["copy"] = time.monotonic() - t0

    # The policy module, built and installed offline inside the chroot.
    t0 = time.monotonic()
    build = root / "tmp/svirt-policy"
    build.mkdir()
    for src in _policy_sources():
        shutil.copy2(src, build / src.name)
    _chroot(
        root,
        "make",
        "-C",
        "/tmp/svirt-policy",
        "-f",
        "/usr/share/selinux/devel/Makefile",
        "svirt.pp",
    )
    _chroot(root, "semodule", "-n", "-i", "/tmp/svirt-policy/svirt.pp")
    if BOOLEANS:
        _chroot(
            root,
            "setsebool",
            "-N",
            "-P",
            *(f"{k}={'on' if v else 'off'}" for k, v in BOOLEANS.items()),
        )
    shutil.rmtree(build)
    timings["policy"] = time.monotonic() - t0

    init = root / "usr/sbin/lab-init"
    text = (
        LAB_INIT.replace("@PAYLOAD_CONTEXT@", PAYLOAD_CONTEXT)
        .replace("@COMMAND_MARKER@", COMMAND_MARKER)
        .replace("@RESULT_BEGIN@", RESULT_BEGIN)
        .replace("@RESULT_END@", RESULT_END)
    )
    init.write_text(text)
    init.chmod(0o755)

    # setfiles needs /proc in the chroot (libselinux goes through
    # /proc/self/fd); a private mount namespace cleans it up on any exit.
    t0 = time.monotonic()
    script = (
        'mount -t proc proc "$1/proc" && exec chroot "$1" setfiles -m -F -T0 '
        f"-c {POLICY_FILE} {FILE_CONTEXTS} /"
    )
    try:
        _run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh",
              str(root)])
    except LabError:
        if not shutil.which("setfiles"):
            raise
        # inside a chroot "/" is no mount point and unshare cannot make it
        # private: label from outside with the host's setfiles instead
        _run(["setfiles", "-m", "-F", "-T0", "-r", str(root), "-c",
              f"{root}{POLICY_FILE}", f"{root}{FILE_CONTEXTS}", str(root)])
    os.setxattr(init, "security.selinux", INIT_CONTEXT.encode() + b"\0")
    timings["label"] = time.monotonic() - t0

    kernels = sorted((root / "boot").glob("vmlinuz-*"))
    initrds = sorted((root / "boot").glob("initrd.img-*"))
    if not kernels or not initrds:
        raise LabError("no kernel/initrd in the lab rootfs")
    shutil.copy2(kernels[-1], out / "vmlinuz")
    shutil.copy2(initrds[-1], out / "initrd.img")

    t0 = time.monotonic()
    used = sum(p.lstat().st_size for p in root.rglob("*"))
    size_mib = used * 3 // 2 // 2**20 + 1024
    _run(
        [
            "mke2fs",
            "-q",
            "-t",
            "ext4",
            "-L",
            "svirt-lab",
            "-d",
            str(root),
            str(out / "root.ext4"),
            f"{size_mib}M",
        ]
    )
    timings["mke2fs"] = time.monotonic() - t0
    shutil.rmtree(root)
    return timings


def ensure_image(*, rebuild: bool = False) -> LabImage:
    """Return the cached lab image, building whatever is missing."""
    bkey, ikey = base_key(), image_key()
    base_dir = CACHE_DIR / f"base-{bkey}"
    image_dir = CACHE_DIR / f"image-{ikey}"
    if rebuild or not (image_dir / "manifest.json").exists():
        with _locked(CACHE_DIR / ".lock", fcntl.LOCK_EX):
            if rebuild or not (image_dir / "manifest.json").exists():
                _build_locked(base_dir, image_dir, bkey, ikey, rebuild)
    manifest = json.loads((image_dir / "manifest.json").read_text())
    return LabImage(
        directory=image_dir,
        root=image_dir / "root.ext4",
        kernel=image_dir / "vmlinuz",
        initrd=image_dir / "initrd.img",
        manifest=manifest,
    )


def _build_locked(base_dir: Path, image_dir: Path, bkey: str, ikey: str, rebuild: bool) -> None:
    for stale in CACHE_DIR.glob("tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    timings: dict[str, float] = {}
    if rebuild or not (base_dir / "rootfs").is_dir():
        tmp = Path(tempfile.mkdtemp(prefix="tmp-base-", dir=CACHE_DIR))
        t0 = time.monotonic()
        _build_rootfs(tmp / "rootfs")
        timings["rootfs"] = time.monotonic() - t0
        shutil.rmtree(base_dir, ignore_errors=True)
        os.rename(tmp, base_dir)
    tmp = Path(tempfile.mkdtemp(prefix="tmp-image-", dir=CACHE_DIR))
    timings |= _build_image(base_dir / "rootfs", tmp)
    manifest = {"base": bkey, "image": ikey, "packages": list(PACKAGES), "timings": timings}
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    shutil.rmtree(image_dir, ignore_errors=True)
    os.rename(tmp, image_dir)
    # Keep only the current base and image.
    for old in CACHE_DIR.iterdir():
        if old.name.startswith(("base-", "image-")) and old not in (base_dir, image_dir):
            shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------
# running


def _payload_disk(stage: Path, out: Path) -> None:
    used = sum(p.lstat().st_size for p in stage.rglob("*"))
    size_mib = max(64, used * 2 // 2**20 + 32)
    _run(
        [
            "mke2fs",
            "-q",
            "-t",
            "ext4",
            "-L",
            "lab-payload",
            "-d",
            str(stage),
            str(out),
            f"{size_mib}M",
        ]
    )


def _parse_result(text: str) -> dict[str, str]:
    begin, end = text.find(RESULT_BEGIN), text.find(RESULT_END)
    if begin < 0 or end < begin:
        return {}
    fields: dict[str, str] = {}
    for line in text[begin + len(RESULT_BEGIN) : end].splitlines():
        key, sep, value = line.strip().partition("=")
        if sep:
            fields[key] = value
    return fields


def _command_start(dmesg: str) -> float:
    for line in dmesg.splitlines():
        if COMMAND_MARKER in line and line.startswith("["):
            return float(line[1 : line.index("]")])
    return 0.0


def extract_denials(dmesg: str) -> list[str]:
    """The ``avc:  denied`` records logged after the command started."""
    start = dmesg.find(COMMAND_MARKER)
    tail = dmesg[start:] if start >= 0 else dmesg
    return [line for line in tail.splitlines() if "avc:  denied" in line]


#: the SMACK pass's kernel: Debian's User-Mode-Linux (built with SMACK, unlike
#: its x86 kernels), from the host's user-mode-linux package
UML_KERNEL = "/usr/bin/linux.uml"


def _uml_command(image: LabImage, tmp: Path, memory_mib: int, console: Path,
                 result: Path) -> tuple[list[str], list[int]]:
    """The lab image under UML with ``security=smack``: the root through a
    copy-on-write file (the image stays untouched, like ``snapshot=on``), the
    payload as the second ubd disk, the console and the result port on fds."""
    con = os.open(console, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    res = os.open(result, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    cmdline = KERNEL_CMDLINE.replace("root=/dev/vda", "root=/dev/ubda").replace(
        "security=selinux selinux=1", "security=smack").replace("console=ttyS0", "")
    argv = [UML_KERNEL, f"mem={memory_mib}M", f"ubd0={tmp / 'root.cow'},{image.root}",
            f"ubd1={tmp / 'payload.ext4'}", "con=null", f"con0=null,fd:{con}",
            "ssl=null", f"ssl0=null,fd:{con}", f"ssl1=null,fd:{res}", *cmdline.split()]
    return argv, [con, res]


def run_lab(
    command: list[str],
    payload: Path | None,
    timeout: float,
    *,
    context: str = LAUNCHER_CONTEXT,
    enforcing: bool = True,
    memory_mib: int = 1024,
    smp: int = 2,
    lsm: str = "selinux",
) -> LabResult:
    """Boot the lab, run *command* in *context* with /lab = *payload*, return the result.

    The command runs from /lab, as ``context`` (the launcher domain), with
    stdin from /dev/null and stdout+stderr into one pipe.  *payload* (a
    directory, copied) appears at /lab, labelled usr_t by default
    (``defcontext=``, so files can still be relabelled in the guest).
    ``enforcing=False`` runs in permissive mode to collect every denial in
    one pass.  The root image is attached with ``snapshot=on``.
    ``lsm="apparmor"`` boots the same image with AppArmor as the major LSM
    instead (``security=apparmor``): the command runs as root, unconfined,
    and ``context``/``enforcing`` do not apply.  ``lsm="smack"`` boots it
    under User-Mode-Linux with ``security=smack`` (root, floor label ``_``).
    """
    image = ensure_image()
    with tempfile.TemporaryDirectory(prefix="svirt-lab-") as tmpdir:
        tmp = Path(tmpdir)
        stage = tmp / "stage"
        if payload is not None:
            shutil.copytree(payload, stage, symlinks=True)
        else:
            stage.mkdir()
        control = stage / ".lab"
        control.mkdir(exist_ok=True)
        (control / "cmd.sh").write_text(shlex.join(command) + "\n")
        (control / "context").write_text(context + "\n")
        (control / "enforce").write_text("1\n" if enforcing else "0\n")
        (control / "timeout").write_text(f"{max(5, int(timeout - GUEST_TIMEOUT_MARGIN))}\n")
        _payload_disk(stage, tmp / "payload.ext4")
        console, result = tmp / "console.log", tmp / "result.log"
        if lsm == "apparmor":
            cmdline = KERNEL_CMDLINE.replace("security=selinux selinux=1",
                                             "security=apparmor apparmor=1")
        else:
            cmdline = KERNEL_CMDLINE + f" enforcing={1 if enforcing else 0}"
        vm = [
            "qemu-system-x86_64", "-accel", "tcg", "-m", str(memory_mib), "-smp", str(smp),
            "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
            "-kernel", str(image.kernel), "-initrd", str(image.initrd), "-append", cmdline,
            "-drive", f"file={image.root},format=raw,if=virtio,snapshot=on",
            "-drive", f"file={tmp / 'payload.ext4'},format=raw,if=virtio",
            "-chardev", f"file,id=con,path={console}", "-serial", "chardev:con",
            "-chardev", f"file,id=res,path={result}", "-serial", "chardev:res",
            "-monitor", "none", "-nic", "none",
        ]  # fmt: skip
        fds: list[int] = []
        if lsm == "smack":
            vm, fds = _uml_command(image, tmp, memory_mib, console, result)
        t0 = time.monotonic()
        # Builds take the lock exclusively and prune other images: hold it
        # shared while qemu has the image open.
        with _locked(CACHE_DIR / ".lock", fcntl.LOCK_SH):
            if not image.root.exists():
                raise LabError(f"{image.root} was pruned by a concurrent build of another key")
            try:
                proc = subprocess.run(
                    vm, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                    timeout=timeout, check=False, pass_fds=fds, start_new_session=True,
                )  # fmt: skip
            except subprocess.TimeoutExpired as exc:
                tail = console.read_text(errors="replace")[-3000:] if console.exists() else ""
                raise LabTimeout(f"lab timed out after {timeout}s; console:\n{tail}") from exc
            finally:
                for fd in fds:
                    os.close(fd)
        seconds = time.monotonic() - t0
        console_text = console.read_text(errors="replace") if console.exists() else ""
        fields = _parse_result(result.read_text(errors="replace") if result.exists() else "")
        if not fields:
            raise LabError(
                f"no lab result (qemu rc={proc.returncode}): {proc.stdout[-2000:]}\n"
                f"console:\n{console_text[-3000:]}"
            )
    dmesg = base64.b64decode(fields.get("dmesg", "")).decode(errors="replace")
    return LabResult(
        exit_code=int(fields.get("exit", "255")),
        output=base64.b64decode(fields.get("output", "")).decode(errors="replace"),
        denials=extract_denials(dmesg),
        seconds=seconds,
        enforcing=fields.get("enforce") == "1",
        guest_uptime=float(fields.get("uptime", "0") or 0),
        boot_seconds=_command_start(dmesg),
        dmesg=dmesg,
        console=console_text,
        lsms=fields.get("lsm", ""),
    )


def main() -> None:
    """``python3 tests/lab/image.py [--rebuild] [--permissive] [CMD...]``."""
    import sys

    args = sys.argv[1:]
    rebuild = "--rebuild" in args
    enforcing = "--permissive" not in args
    args = [a for a in args if a not in ("--rebuild", "--permissive")]
    t0 = time.monotonic()
    image = ensure_image(rebuild=rebuild)
    print(f"image {image.directory} ready in {time.monotonic() - t0:.1f}s: {image.manifest}")
    if args:
        payload = Path(os.environ["LAB_PAYLOAD"]) if "LAB_PAYLOAD" in os.environ else None
        res = run_lab(
            args, payload, float(os.environ.get("LAB_TIMEOUT", "600")), enforcing=enforcing
        )
        print(res.output, end="")
        print(
            f"--- exit={res.exit_code} enforcing={res.enforcing} seconds={res.seconds:.1f} "
            f"boot={res.boot_seconds:.1f} guest_uptime={res.guest_uptime:.1f}"
        )
        for d in res.denials:
            print(d)
        sys.exit(res.exit_code)


if __name__ == "__main__":
    main()
