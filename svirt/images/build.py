"""Build tiny guests from Debian packages: a kernel plus a busybox initramfs.

The same ``/init`` serves every behaviour the tests and the demo need; it
reads its orders from the kernel command line (see :func:`guest_cmdline`):

``svirt.mode=poweroff``
    print the marker, power off at once.
``svirt.mode=stay``
    print the marker, stay up until asked to shut down (UML: mconsole
    ``cad``; QEMU: QMP ``system_powerdown``), then print ``SVIRT-POWEROFF``
    and power off.
``svirt.mode=panic``
    print the marker, then let ``/init`` exit so the kernel panics
    ("Attempted to kill init!").
``svirt.mode=chatty``
    print 1 MiB of text, then the marker, then power off.
``svirt.mode=shell``
    as ``stay``, with a shell reading commands from the console (no echo, no
    prompt, kernel messages off the console): what :meth:`Guest.shell` and
    ``svirt run SPEC -- COMMAND`` talk to.
``svirt.mode=diskwrite`` (``svirt.pattern=TEXT``)
    on the first disk (``/dev/ubda`` or ``/dev/vda``): print
    ``SVIRT-DISK before <its first line>``, write ``TEXT`` and a newline at
    its start, sync, drop the page cache, print ``SVIRT-DISK after <its
    first line>`` (read back from the device), then the marker; power off.
``svirt.marker=TEXT``
    the marker line (default ``SVIRT-READY``).
``svirt.net=IP/PREFIX``
    configure ``eth0`` (else the first non-loopback interface) with that
    address before the marker.
``svirt.ping=IP[,IP...]`` (``svirt.pingtries=N``: up to N one-second tries each)
    after the marker, ping each once and print ``SVIRT-PING <ip> ok|fail``.

QEMU guests use Debian's ``linux-image-cloud-amd64`` kernel, fetched with
``apt-get download`` and unpacked (never installed) into the cache.  Its ACPI
power button, evdev, virtio-net and pvpanic drivers are modules: they are
shipped in the QEMU initramfs and loaded in dependency order by ``/init``,
and busybox ``acpid`` turns the power button press into a clean shutdown.
UML guests use the host's ``/usr/bin/linux`` and an initramfs without
modules; UML's ``eth0=``/``vec0:`` network drivers are built in (``/init``
configures ``eth0``, else the first other interface, e.g. ``vec0``).

Everything lands in the cache (``$SVIRT_CACHE`` or ``/var/cache/svirt``):
world-readable files, directories 0755, built atomically and under an
``fcntl`` lock so that concurrent processes neither download twice nor ever
see half a file.
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import hashlib
import lzma
import os
import re
import shutil
import stat
import struct
import subprocess
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, cast

from svirt.errors import ImageBuildError

__all__ = [
    "DEFAULT_CACHE",
    "DEFAULT_MARKER",
    "DISK_PREFIX",
    "GUEST_MODES",
    "POWEROFF_MARKER",
    "QEMU_KERNEL_PACKAGE",
    "CpioEntry",
    "TinyGuest",
    "build_initramfs",
    "cache_dir",
    "guest_cmdline",
    "qemu_kernel",
    "tiny_qemu_guest",
    "tiny_uml_guest",
    "uml_kernel",
    "write_cpio",
]

DEFAULT_CACHE = Path("/var/cache/svirt")
"""Where kernels and initramfs images are kept unless ``$SVIRT_CACHE`` says otherwise."""

QEMU_KERNEL_PACKAGE = "linux-image-cloud-amd64"
"""Debian metapackage naming the kernel QEMU guests boot."""

GUEST_MODES = ("poweroff", "stay", "panic", "chatty", "shell", "diskwrite")
DEFAULT_MARKER = "SVIRT-READY"
POWEROFF_MARKER = "SVIRT-POWEROFF"
PING_PREFIX = "SVIRT-PING"
DISK_PREFIX = "SVIRT-DISK"

# Bump when the layout of the initramfs changes in a way the hash of its
# entries would not notice.
_FORMAT_VERSION = b"svirt-initramfs-1"

_BUSYBOX_CANDIDATES = (Path("/bin/busybox"), Path("/usr/bin/busybox"))

# Every applet /init (and the acpid handler) uses; each becomes /bin/<name>.
_APPLETS = (
    "acpid",
    "cat",
    "dd",
    "echo",
    "head",
    "insmod",
    "ip",
    "kill",
    "ls",
    "mkdir",
    "mount",
    "ping",
    "poweroff",
    "printf",
    "sh",
    "sleep",
    "stty",
    "sync",
    "uname",
)

# Modules the QEMU guest needs from the cloud kernel (their dependencies are
# added automatically): the ACPI power button and evdev for
# system_powerdown, virtio-pci and virtio-net for networking, pvpanic (ISA
# "-device pvpanic" and "-device pvpanic-pci") so that QEMU can report a
# guest panic ("-action panic=exit-failure", QMP GUEST_PANICKED).
_QEMU_MODULES = ("button", "evdev", "virtio_pci", "virtio_net", "virtio_blk", "pvpanic_mmio",
                 "pvpanic_pci")

_MODULE_ORDER_FILE = "svirt.order"

_CHATTY_LINES = 8192  # x 128 bytes = 1 MiB

_INIT_SCRIPT = r"""#!/bin/sh
# svirt tiny guest /init, PID 1.  Behaviour from /proc/cmdline:
#   svirt.mode=poweroff|stay|panic|chatty|shell|diskwrite  svirt.marker=TEXT
#   svirt.net=IP/PREFIX  svirt.ping=IP[,IP...]  svirt.pattern=TEXT (diskwrite)
export PATH=/bin
mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
mount -t proc proc /proc
mount -t sysfs sysfs /sys

mode=poweroff
marker=@DEFAULT_MARKER@
net=
ping=
pingtries=1
pattern=svirt-diskwrite
set -f
for arg in $(cat /proc/cmdline); do
    case "$arg" in
    svirt.mode=*) mode="${arg#svirt.mode=}" ;;
    svirt.marker=*) marker="${arg#svirt.marker=}" ;;
    svirt.net=*) net="${arg#svirt.net=}" ;;
    svirt.ping=*) ping="${arg#svirt.ping=}" ;;
    svirt.pingtries=*) pingtries="${arg#svirt.pingtries=}" ;;
    svirt.pattern=*) pattern="${arg#svirt.pattern=}" ;;
    esac
done
set +f

# Modules shipped for this very kernel (QEMU: button, evdev, virtio-net),
# listed dependencies first.
kver=$(uname -r)
if [ -f "/lib/modules/$kver/@ORDER_FILE@" ]; then
    while read -r mod; do
        insmod "/lib/modules/$kver/$mod" || echo "svirt-init: insmod $mod failed"
    done <"/lib/modules/$kver/@ORDER_FILE@"
fi

power_off() {
    sync
    poweroff -f
    sleep 5
    echo "svirt-init: poweroff failed"
    exit 1
}

say_marker() {
    echo
    echo "$marker"
}

do_pings() {
    [ -n "$ping" ] || return 0
    oldifs=$IFS
    IFS=,
    set -- $ping
    IFS=$oldifs
    # svirt.pingtries=N: up to N one-second tries each (peers may boot later)
    for ip in "$@"; do
        result=fail
        try=0
        while [ $try -lt "$pingtries" ]; do
            if ping -c 1 -W 1 "$ip" >/dev/null 2>&1; then
                result=ok
                break
            fi
            try=$((try + 1))
        done
        echo "@PING_PREFIX@ $ip $result"
    done
}

ip link set lo up
if [ -n "$net" ]; then
    # eth0 (virtio-net, UML's legacy eth<N>=), else the first other
    # interface (UML's vector driver names it vec0).
    iface=
    n=0
    while [ -z "$iface" ] && [ $n -lt 20 ]; do
        if [ -e /sys/class/net/eth0 ]; then
            iface=eth0
        else
            for dev in /sys/class/net/*; do
                case "${dev##*/}" in
                lo | '*') ;;
                *) iface=${dev##*/}; break ;;
                esac
            done
        fi
        [ -n "$iface" ] || sleep 0.1
        n=$((n + 1))
    done
    if [ -z "$iface" ]; then
        echo "svirt-init: no network interface for svirt.net=$net"
    elif ! { ip addr add "$net" dev "$iface" && ip link set "$iface" up; }; then
        echo "svirt-init: cannot configure $iface with $net"
    fi
fi

case "$mode" in
poweroff)
    say_marker
    do_pings
    power_off
    ;;
stay|shell)
    stop=0
    trap 'stop=1' INT TERM HUP USR1 USR2 PWR
    # ctrl-alt-del (UML mconsole "cad") sends SIGINT to PID 1, no reboot.
    echo 0 >/proc/sys/kernel/ctrl-alt-del
    # ACPI power button (QEMU system_powerdown): acpid runs
    # /etc/acpi/PWRF/00000080, which signals PID 1.
    # It writes its pid file once it listens: wait for that, so a power
    # button pressed right after the marker is not lost.
    if [ -e /dev/input/event0 ]; then
        acpid -f -c /etc/acpi -l /dev/null -p /tmp/acpid.pid &
        n=0
        while [ ! -s /tmp/acpid.pid ] && [ $n -lt 50 ]; do
            sleep 0.1
            n=$((n + 1))
        done
    fi
    shpid=
    if [ "$mode" = shell ]; then
        # the console is the shell's alone: no echo of what is typed, no
        # kernel messages in the middle of a command's output
        echo 1 >/proc/sys/kernel/printk
        stty -echo </dev/console
        PS1= PS2= sh </dev/console >/dev/console 2>&1 &
        shpid=$!
    fi
    say_marker
    do_pings
    # A trapped signal interrupts "wait"; one that lands between two
    # commands has run its trap by the time of the test.
    while [ "$stop" = 0 ]; do
        sleep 1 &
        [ "$stop" = 0 ] && wait $!
        if [ -n "$shpid" ] && [ "$stop" = 0 ] && ! kill -0 "$shpid" 2>/dev/null; then
            PS1= PS2= sh </dev/console >/dev/console 2>&1 &
            shpid=$!
        fi
    done
    [ -n "$shpid" ] && kill "$shpid" 2>/dev/null
    echo @POWEROFF_MARKER@
    power_off
    ;;
panic)
    say_marker
    do_pings
    echo "svirt-init: exiting PID 1 to panic the kernel"
    exit 1
    ;;
chatty)
    filler=ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789
    filler=$filler$filler
    filler=${filler%????????????????}
    i=0
    while [ $i -lt @CHATTY_LINES@ ]; do
        printf 'svirt-chatty %05d %s\n' $i "$filler"
        i=$((i + 1))
    done
    say_marker
    do_pings
    # poweroff -f does not wait for the tty to drain: give the UART time to
    # send what is still queued, or the tail (the marker) is lost
    sleep 1
    power_off
    ;;
diskwrite)
    dev=
    n=0
    while [ -z "$dev" ] && [ $n -lt 50 ]; do
        for d in /dev/ubda /dev/vda; do
            if [ -b "$d" ]; then dev=$d; break; fi
        done
        [ -n "$dev" ] || sleep 0.1
        n=$((n + 1))
    done
    if [ -z "$dev" ]; then
        echo "svirt-init: no disk (/dev/ubda, /dev/vda) for svirt.mode=diskwrite"
        power_off
    fi
    echo "@DISK_PREFIX@ before $(head -n 1 "$dev")"
    echo "$pattern" | dd of="$dev" conv=notrunc,fsync 2>/dev/null \
        || echo "svirt-init: writing $dev failed"
    sync
    # read back from the device, not from the page cache
    echo 3 >/proc/sys/vm/drop_caches
    echo "@DISK_PREFIX@ after $(head -n 1 "$dev")"
    say_marker
    power_off
    ;;
*)
    echo "svirt-init: unknown svirt.mode=$mode, powering off"
    power_off
    ;;
esac
"""

_INIT_TEXT = (
    _INIT_SCRIPT.replace("@DEFAULT_MARKER@", DEFAULT_MARKER)
    .replace("@POWEROFF_MARKER@", POWEROFF_MARKER)
    .replace("@PING_PREFIX@", PING_PREFIX)
    .replace("@DISK_PREFIX@", DISK_PREFIX)
    .replace("@ORDER_FILE@", _MODULE_ORDER_FILE)
    .replace("@CHATTY_LINES@", str(_CHATTY_LINES))
)

# Run by busybox acpid on KEY_POWER (its built-in tables map it to
# "PWRF/00000080", relative to the -c directory).
_ACPI_POWER_HANDLER = "#!/bin/sh\nkill -USR1 1\n"


# --------------------------------------------------------------------------
# cache


def cache_dir() -> Path:
    """The cache directory (``$SVIRT_CACHE`` or :data:`DEFAULT_CACHE`), created 0755."""
    env = os.environ.get("SVIRT_CACHE")
    path = Path(env) if env else DEFAULT_CACHE
    _ensure_dir(path)
    return path


def _resolve_cache(cache: Path | None) -> Path:
    if cache is None:
        return cache_dir()
    _ensure_dir(cache)
    return cache


def _ensure_dir(path: Path) -> None:
    if path.is_dir():
        return
    try:
        path.mkdir(parents=True, exist_ok=True)
        os.chmod(path, 0o755)  # noqa: S103 - guests (other uids) read the cache
    except OSError as exc:
        raise ImageBuildError(
            f"cannot create cache directory {path}: {exc.strerror or exc}",
            hint="run as root or point SVIRT_CACHE at a writable directory",
        ) from exc


@contextlib.contextmanager
def _locked(cache: Path, name: str) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``cache/.NAME.lock``."""
    path = cache / f".{name}.lock"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise ImageBuildError(
            f"cannot open lock file {path}: {exc.strerror or exc}",
            hint="run as root or point SVIRT_CACHE at a writable directory",
        ) from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _atomic_write(dest: Path, fill: Callable[[BinaryIO], None]) -> None:
    """Write ``dest`` (mode 0644) through a temporary file in the same directory."""
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            fill(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp_name, 0o644)
        os.replace(tmp_name, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        raise


# --------------------------------------------------------------------------
# cpio "newc"


@dataclass(frozen=True)
class CpioEntry:
    """One archive member.

    ``mode`` includes the file type bits (``S_IFREG``, ``S_IFDIR`` or
    ``S_IFLNK``); for a symlink ``data`` is the link target.
    """

    name: str
    mode: int
    data: bytes = b""
    mtime: int = 0


_CPIO_MAGIC = b"070701"
_CPIO_TRAILER = "TRAILER!!!"
_U32_MAX = 0xFFFFFFFF


def _pad4(length: int) -> bytes:
    return b"\0" * (-length % 4)


def _cpio_record(
    out: BinaryIO, name: bytes, *, ino: int, mode: int, nlink: int, mtime: int, data: bytes
) -> None:
    namesize = len(name) + 1
    fields = (ino, mode, 0, 0, nlink, mtime, len(data), 0, 0, 0, 0, namesize, 0)
    header = _CPIO_MAGIC + b"".join(b"%08X" % value for value in fields)
    out.write(header)
    out.write(name + b"\0")
    out.write(_pad4(len(header) + namesize))
    out.write(data)
    out.write(_pad4(len(data)))


def write_cpio(entries: Iterable[CpioEntry], out: BinaryIO) -> None:
    """Write ``entries`` as a cpio "newc" (070701) archive, ending with ``TRAILER!!!``.

    Owners are uid/gid 0, inodes are numbered from 1, names and data are
    padded to 4 bytes.  A leading ``/`` is stripped from names.  Parents must
    come before their children (the kernel does not create them).
    """
    ino = 0
    for entry in entries:
        name = entry.name.lstrip("/")
        if not name or "\0" in name or name == _CPIO_TRAILER:
            raise ValueError(f"invalid cpio member name {entry.name!r}")
        kind = stat.S_IFMT(entry.mode)
        if kind not in (stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK):
            raise ValueError(f"{name}: unsupported file type in mode {entry.mode:#o}")
        if entry.mode > _U32_MAX or entry.mode < 0:
            raise ValueError(f"{name}: invalid mode {entry.mode:#o}")
        if kind == stat.S_IFDIR and entry.data:
            raise ValueError(f"{name}: a directory cannot have data")
        if kind == stat.S_IFLNK and not entry.data:
            raise ValueError(f"{name}: a symlink needs a target")
        if len(entry.data) > _U32_MAX:
            raise ValueError(f"{name}: too large for a newc archive")
        if not 0 <= entry.mtime <= _U32_MAX:
            raise ValueError(f"{name}: mtime {entry.mtime} out of range")
        ino += 1
        _cpio_record(
            out,
            name.encode(),
            ino=ino,
            mode=entry.mode,
            nlink=2 if kind == stat.S_IFDIR else 1,
            mtime=entry.mtime,
            data=entry.data,
        )
    _cpio_record(out, _CPIO_TRAILER.encode(), ino=0, mode=0, nlink=1, mtime=0, data=b"")


# --------------------------------------------------------------------------
# running host tools


def _tool(name: str, package: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin:/sbin:/bin")
    if path is None:
        raise ImageBuildError(f"{name} not found", hint=f"apt-get install {package}")
    return path


def _run(
    argv: Sequence[str], *, what: str, hint: str, cwd: Path | None = None, timeout: float = 120
) -> str:
    env = dict(os.environ, LC_ALL="C", LANG="C")
    try:
        proc = subprocess.run(  # noqa: S603 - fixed argv, resolved tool paths
            list(argv),
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ImageBuildError(f"{what} failed: {exc}", hint=hint) from exc
    if proc.returncode != 0:
        tail = (proc.stderr.strip() or proc.stdout.strip()).splitlines()[-5:]
        detail = "; ".join(tail) or f"exit status {proc.returncode}"
        raise ImageBuildError(f"{what} failed: {detail}", hint=hint)
    return proc.stdout


# --------------------------------------------------------------------------
# kernels


@dataclass(frozen=True)
class TinyGuest:
    """A bootable tiny guest: kernel (or UML binary) and initramfs."""

    kernel: Path
    initrd: Path


_APT_HINT = "run 'apt-get update' (Debian's archive must be reachable)"

# (cache dir) -> extracted kernel tree, for this process
_kernel_trees: dict[Path, Path] = {}


def _resolve_kernel_package() -> tuple[str, str]:
    """(package, version) that :data:`QEMU_KERNEL_PACKAGE` currently depends on."""
    apt_cache = _tool("apt-cache", "apt")
    out = _run(
        [
            apt_cache,
            "depends",
            "--no-recommends",
            "--no-suggests",
            "--no-conflicts",
            "--no-breaks",
            "--no-replaces",
            "--no-enhances",
            QEMU_KERNEL_PACKAGE,
        ],
        what=f"apt-cache depends {QEMU_KERNEL_PACKAGE}",
        hint=_APT_HINT,
    )
    package = None
    for line in out.splitlines():
        m = re.fullmatch(r"\s*\|?Depends:\s*(linux-image-[^\s<>]+)\s*", line)
        if m:
            package = m.group(1)
            break
    if package is None:
        raise ImageBuildError(
            f"cannot tell which kernel {QEMU_KERNEL_PACKAGE} depends on", hint=_APT_HINT
        )
    out = _run(
        [apt_cache, "show", "--no-all-versions", package],
        what=f"apt-cache show {package}",
        hint=_APT_HINT,
    )
    m = re.search(r"^Version:\s*(\S+)\s*$", out, re.MULTILINE)
    if m is None:
        raise ImageBuildError(f"apt-cache shows no version for {package}", hint=_APT_HINT)
    return package, m.group(1)


def _kernel_tree_ok(tree: Path) -> bool:
    return any((tree / "boot").glob("vmlinuz-*"))


def _cached_kernel_trees(kdir: Path) -> list[Path]:
    if not kdir.is_dir():
        return []
    trees = [p for p in kdir.iterdir() if not p.name.startswith(".") and _kernel_tree_ok(p)]
    return sorted(trees, key=lambda p: p.stat().st_mtime, reverse=True)


def _normalise_tree(root: Path) -> None:
    """Directories 0755, files 0644 (0755 if executable): guests run unprivileged."""
    for dirpath, dirnames, filenames in os.walk(root):
        os.chmod(dirpath, 0o755)  # noqa: S103 - guests (other uids) read the cache
        for name in [*dirnames, *filenames]:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            if stat.S_ISREG(st.st_mode):
                os.chmod(path, 0o755 if st.st_mode & 0o111 else 0o644)


def _download_kernel(kdir: Path, package: str, version: str, dest: Path) -> None:
    apt_get = _tool("apt-get", "apt")
    dpkg_deb = _tool("dpkg-deb", "dpkg")
    # We hold the lock: leftovers of killed builds can go.
    for stale in kdir.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(dir=kdir, prefix=".tmp-"))
    try:
        _run(
            [apt_get, "download", f"{package}={version}"],
            cwd=tmp,
            what=f"apt-get download {package}={version}",
            hint=_APT_HINT,
            timeout=900,
        )
        debs = sorted(tmp.glob("*.deb"))
        if len(debs) != 1:
            raise ImageBuildError(
                f"apt-get download {package} left {len(debs)} .deb files", hint=_APT_HINT
            )
        root = tmp / "root"
        _run(
            [dpkg_deb, "-x", str(debs[0]), str(root)],
            what=f"dpkg-deb -x {debs[0].name}",
            hint="is there room in the cache?",
            timeout=600,
        )
        if not _kernel_tree_ok(root):
            raise ImageBuildError(
                f"{debs[0].name} contains no boot/vmlinuz-*",
                hint=f"check what {QEMU_KERNEL_PACKAGE} depends on",
            )
        _normalise_tree(root)
        os.rename(root, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _qemu_kernel_tree(cache: Path) -> Path:
    """The unpacked kernel package (``boot/``, ``lib/modules/``), downloading it once."""
    known = _kernel_trees.get(cache)
    if known is not None and _kernel_tree_ok(known):
        return known
    kdir = cache / "kernel"
    try:
        package, version = _resolve_kernel_package()
    except ImageBuildError:
        # No package lists (offline, before apt-get update): any kernel
        # unpacked before will do.
        trees = _cached_kernel_trees(kdir)
        if not trees:
            raise
        _kernel_trees[cache] = trees[0]
        return trees[0]
    dest = kdir / f"{package}_{version.replace(':', '%3a')}"
    if not _kernel_tree_ok(dest):
        _ensure_dir(kdir)
        with _locked(cache, "kernel"):
            if not _kernel_tree_ok(dest):
                if dest.exists():  # not ours: a tree without a kernel
                    shutil.rmtree(dest)
                _download_kernel(kdir, package, version, dest)
    _kernel_trees[cache] = dest
    return dest


def qemu_kernel(cache: Path | None = None) -> Path:
    """The ``vmlinuz`` of Debian's cloud kernel, unpacked in the cache (downloaded once)."""
    tree = _qemu_kernel_tree(_resolve_cache(cache))
    return sorted((tree / "boot").glob("vmlinuz-*"))[-1]


def uml_kernel() -> Path:
    """The host's User-Mode-Linux kernel binary (``/usr/bin/linux``)."""
    path = shutil.which("linux") or shutil.which("linux", path="/usr/bin:/bin")
    if path is None:
        raise ImageBuildError(
            "the User-Mode-Linux kernel 'linux' is not installed",
            hint="apt-get install user-mode-linux",
        )
    return Path(path)


# --------------------------------------------------------------------------
# initramfs


def _is_static_elf(data: bytes) -> bool:
    """True for an ELF64 little-endian executable without a program interpreter."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return False
    (e_phoff,) = struct.unpack_from("<Q", data, 0x20)
    e_phentsize, e_phnum = struct.unpack_from("<HH", data, 0x36)
    for i in range(e_phnum):
        (p_type,) = struct.unpack_from("<I", data, e_phoff + i * e_phentsize)
        if p_type == 3:  # PT_INTERP
            return False
    return True


def _busybox() -> bytes:
    for candidate in _BUSYBOX_CANDIDATES:
        try:
            data = candidate.read_bytes()
        except OSError:
            continue
        if _is_static_elf(data):
            return data
    raise ImageBuildError(
        "no statically linked busybox found (looked at "
        + ", ".join(str(p) for p in _BUSYBOX_CANDIDATES)
        + ")",
        hint="apt-get install busybox-static",
    )


def _elf_section(data: bytes, wanted: str) -> bytes | None:
    """The contents of section ``wanted`` of an ELF64 little-endian object."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return None
    (e_shoff,) = struct.unpack_from("<Q", data, 0x28)
    e_shentsize, e_shnum, e_shstrndx = struct.unpack_from("<HHH", data, 0x3A)

    def header(i: int) -> tuple[int, int, int]:
        base = e_shoff + i * e_shentsize
        (sh_name,) = struct.unpack_from("<I", data, base)
        sh_offset, sh_size = struct.unpack_from("<QQ", data, base + 0x18)
        return sh_name, sh_offset, sh_size

    _, str_off, str_size = header(e_shstrndx)
    names = data[str_off : str_off + str_size]
    for i in range(e_shnum):
        sh_name, offset, size = header(i)
        end = names.find(b"\0", sh_name)
        if names[sh_name:end].decode(errors="replace") == wanted:
            return data[offset : offset + size]
    return None


def _module_depends(name: str, data: bytes) -> list[str]:
    modinfo = _elf_section(data, ".modinfo")
    if modinfo is None:
        raise ImageBuildError(
            f"kernel module {name} has no .modinfo section",
            hint="the kernel package looks damaged: empty the cache",
        )
    for field in modinfo.split(b"\0"):
        if field.startswith(b"depends="):
            value = field[len(b"depends=") :].decode()
            return [d.replace("-", "_") for d in value.split(",") if d]
    return []


def _read_module(path: Path) -> bytes:
    data = path.read_bytes()
    if path.name.endswith(".ko.xz"):
        return lzma.decompress(data)
    return data


def _module_index(moddir: Path) -> dict[str, Path]:
    index: dict[str, Path] = {}
    for path in sorted(moddir.rglob("*.ko*")):
        if path.name.endswith(".ko") or path.name.endswith(".ko.xz"):
            index[path.name.split(".ko")[0].replace("-", "_")] = path
    return index


def _kernel_modules(tree: Path, wanted: Sequence[str]) -> tuple[str, list[tuple[str, bytes]]]:
    """(kernel release, [(module name, .ko bytes)] in load order) for ``wanted``."""
    for base in (tree / "lib" / "modules", tree / "usr" / "lib" / "modules"):
        releases = sorted(p for p in base.glob("*") if p.is_dir()) if base.is_dir() else []
        if releases:
            moddir = releases[-1]
            break
    else:
        raise ImageBuildError(
            f"no lib/modules/<release> in {tree}",
            hint="the kernel package looks damaged: empty the cache",
        )
    index = _module_index(moddir)
    ordered: list[tuple[str, bytes]] = []
    done: set[str] = set()

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if name in done:
            return
        if name in chain:
            raise ImageBuildError(f"module dependency loop: {' -> '.join((*chain, name))}")
        path = index.get(name)
        if path is None:
            raise ImageBuildError(
                f"kernel module {name} not found in {moddir}",
                hint="the kernel may have it built in; update svirt.images.build._QEMU_MODULES",
            )
        data = _read_module(path)
        for dep in _module_depends(name, data):
            visit(dep, (*chain, name))
        done.add(name)
        ordered.append((name, data))

    for name in wanted:
        visit(name, ())
    return moddir.name, ordered


_DIR = stat.S_IFDIR | 0o755
_EXE = stat.S_IFREG | 0o755
_FILE = stat.S_IFREG | 0o644
_LINK = stat.S_IFLNK | 0o777


def _initramfs_entries(modules: tuple[str, list[tuple[str, bytes]]] | None) -> list[CpioEntry]:
    entries = [
        CpioEntry("bin", _DIR),
        CpioEntry("dev", _DIR),
        CpioEntry("etc", _DIR),
        CpioEntry("etc/acpi", _DIR),
        CpioEntry("etc/acpi/PWRF", _DIR),
        CpioEntry("etc/acpi/PWRF/00000080", _EXE, _ACPI_POWER_HANDLER.encode()),
        CpioEntry("lib", _DIR),
        CpioEntry("proc", _DIR),
        CpioEntry("sys", _DIR),
        CpioEntry("tmp", stat.S_IFDIR | 0o1777),
        CpioEntry("bin/busybox", _EXE, _busybox()),
    ]
    entries += [CpioEntry(f"bin/{applet}", _LINK, b"busybox") for applet in _APPLETS]
    if modules is not None:
        release, mods = modules
        base = f"lib/modules/{release}"
        entries += [CpioEntry("lib/modules", _DIR), CpioEntry(base, _DIR)]
        entries += [CpioEntry(f"{base}/{name}.ko", _FILE, data) for name, data in mods]
        order = "".join(f"{name}.ko\n" for name, _ in mods)
        entries.append(CpioEntry(f"{base}/{_MODULE_ORDER_FILE}", _FILE, order.encode()))
    entries.append(CpioEntry("init", _EXE, _INIT_TEXT.encode()))
    return entries


def _entries_digest(entries: Sequence[CpioEntry]) -> str:
    h = hashlib.sha256(_FORMAT_VERSION)
    for e in entries:
        name = e.name.encode()
        h.update(struct.pack("<QIIQ", len(name), e.mode, e.mtime, len(e.data)))
        h.update(name)
        h.update(e.data)
    return h.hexdigest()


def build_initramfs(cache: Path | None = None, *, qemu_modules: bool = True) -> Path:
    """The busybox initramfs (gzip-compressed newc cpio), built once per content.

    Its file name carries a hash of everything in it (busybox, ``/init``,
    modules), so a changed input gives a new image and an unchanged one is
    reused.  With ``qemu_modules`` (the default) it ships the cloud kernel's
    ACPI button, evdev and virtio-net modules, downloading that kernel if
    needed; UML guests pass ``False`` and need nothing from the network.
    """
    cache = _resolve_cache(cache)
    modules = _kernel_modules(_qemu_kernel_tree(cache), _QEMU_MODULES) if qemu_modules else None
    entries = _initramfs_entries(modules)
    dest = cache / f"initramfs-{_entries_digest(entries)[:16]}.cpio.gz"
    if dest.is_file():
        return dest

    def fill(f: BinaryIO) -> None:
        with gzip.GzipFile(filename="", fileobj=f, mode="wb", compresslevel=9, mtime=0) as gz:
            write_cpio(entries, cast(BinaryIO, gz))

    with _locked(cache, "initramfs"):
        if not dest.is_file():
            # We hold the lock: temporary files left by killed builds can go.
            for stale in cache.glob(".initramfs-*.tmp"):
                with contextlib.suppress(OSError):
                    stale.unlink()
            try:
                _atomic_write(dest, fill)
            except OSError as exc:
                raise ImageBuildError(
                    f"cannot write {dest}: {exc.strerror or exc}",
                    hint="is the cache writable and not full?",
                ) from exc
    return dest


# --------------------------------------------------------------------------
# guests


def tiny_qemu_guest(cache: Path | None = None) -> TinyGuest:
    """Debian's cloud kernel and the initramfs with its modules, for ``-accel tcg``."""
    cache = _resolve_cache(cache)
    return TinyGuest(kernel=qemu_kernel(cache), initrd=build_initramfs(cache))


def tiny_uml_guest(cache: Path | None = None) -> TinyGuest:
    """``/usr/bin/linux`` and the module-less initramfs."""
    cache = _resolve_cache(cache)
    return TinyGuest(kernel=uml_kernel(), initrd=build_initramfs(cache, qemu_modules=False))


_MARKER_RE = re.compile(r"[A-Za-z0-9._:+@%/=-]+")


def guest_cmdline(mode: str, marker: str = DEFAULT_MARKER, extra: str = "") -> str:
    """The kernel command-line fragment selecting the ``/init`` behaviour.

    ``extra`` is appended as is, e.g. ``"svirt.net=10.0.0.2/24 svirt.ping=10.0.0.1"``.
    No ``console=`` part: the backend adds that.
    """
    if mode not in GUEST_MODES:
        raise ImageBuildError(
            f"unknown guest mode {mode!r}", hint="one of " + ", ".join(GUEST_MODES)
        )
    if not _MARKER_RE.fullmatch(marker):
        raise ImageBuildError(
            f"invalid marker {marker!r}", hint="use letters, digits and ._:+@%/=- only (no spaces)"
        )
    parts = [f"svirt.mode={mode}", f"svirt.marker={marker}"]
    if extra.strip():
        parts.append(extra.strip())
    return " ".join(parts)
