"""``svirt image build debian``: a bootable Debian disk image from Debian's
archive alone (nothing else is downloaded).

The recipe (:data:`RECIPE_VERSION` changes whenever it does):

1. ``mmdebstrap --variant=minbase`` of the release (main, -updates and
   -security) with systemd, udev, Debian's cloud kernel
   (``linux-image-cloud-amd64``: measured against ``linux-image-amd64``
   under TCG on 2 busy cores, 32.5 s to qemu-ga instead of 43-48 s, and
   148 MiB of image instead of 228), cloud-init, qemu-guest-agent, GRUB's BIOS and UEFI
   images (``grub-pc-bin``, ``grub-efi-amd64-bin``: the binaries only, so
   both fit in one system), no Recommends, no documentation; the
   initramfs holds only the drivers a QEMU disk needs
   (:data:`INITRAMFS_MODULES`).
2. The tree configured (:func:`configure_tree`): the root file system by
   UUID in ``/etc/fstab``, cloud-init limited to NoCloud (then None),
   systemd-networkd for whatever network cloud-init renders, its
   wait-online masked (a guest without a network boots without waiting),
   an empty machine-id, root locked (no password login: cloud-init's
   user-data or ``ssh_authorized_keys`` give access), GRUB's config with
   the serial console (``console=ttyS0``); qemu-ga starts when its port
   appears (Debian's udev rule).
3. The disk (:mod:`svirt.images.disk`): GPT with a BIOS boot partition
   (GRUB's core image), an ESP holding ``EFI/BOOT/BOOTX64.EFI`` (the
   removable path: OVMF finds it with no NVRAM entry) and the ext4 root,
   made from the directory (``mke2fs -d``, ``mkfs.vfat`` + ``mcopy``), no
   loop device, then converted to qcow2.

Built as root (mmdebstrap's root mode and ``chroot`` to run GRUB's
``grub-mkimage`` of the release itself), cached in the image cache under a
key of every input (:func:`image_key`), written atomically.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from svirt.errors import ImageBuildError
from svirt.images import disk
from svirt.images.apt import run_tool, tool
from svirt.images.cache import ensure_dir, locked, resolve_cache

#: bump whenever the recipe changes: it is part of every cache key
RECIPE_VERSION = "2"
DEFAULT_RELEASE = "bookworm"
DEFAULT_SIZE = 4 << 30
MIN_SIZE, MAX_SIZE = 1 << 30, 2 << 40
MIRROR = "http://deb.debian.org/debian"
SECURITY_MIRROR = "http://deb.debian.org/debian-security"
KERNEL_PACKAGE = "linux-image-cloud-amd64"
PACKAGES: tuple[str, ...] = (
    "systemd-sysv", "udev", "dbus", KERNEL_PACKAGE, "initramfs-tools", "e2fsprogs",
    "cloud-init", "qemu-guest-agent", "iproute2", "netbase", "ca-certificates",
    "grub-pc-bin", "grub-efi-amd64-bin",
)
INITRAMFS_MODULES: tuple[str, ...] = (
    "virtio_pci", "virtio_blk", "virtio_scsi", "sd_mod", "ata_piix", "ahci", "nvme", "ext4",
)
DPKG_EXCLUDES: tuple[str, ...] = ("/usr/share/man/*", "/usr/share/locale/*",
                                  "/usr/share/doc/*", "/usr/share/info/*")
KERNEL_ARGS = "console=tty0 console=ttyS0,115200n8 rw"
#: units masked: waiting for a network that may not exist; e2scrub's reap
#: at boot (seconds under TCG, nothing to reap in a fresh image)
MASKED = ("systemd-networkd-wait-online.service", "e2scrub_reap.service")
#: a package name (Debian policy) and a release name
_PACKAGE = re.compile(r"[a-z0-9][a-z0-9+.-]{1,99}")
_RELEASE = re.compile(r"[a-z][a-z0-9-]{1,31}")
#: host tools and the Debian packages that have them
HOST_TOOLS: tuple[tuple[str, str], ...] = (
    ("mmdebstrap", "mmdebstrap"), ("chroot", "coreutils"), ("mke2fs", "e2fsprogs"),
    ("mkfs.vfat", "dosfstools"), ("mcopy", "mtools"), ("mmd", "mtools"),
    ("qemu-img", "qemu-utils"),
)

#: ``progress(step, watched)``: a step begins; ``watched`` is the file or
#: directory whose growth shows its progress (None: nothing to watch)
Progress = Callable[[str, "Path | None"], None]


@dataclass(frozen=True)
class DebianRecipe:
    """What ``svirt image build debian`` was asked for."""

    release: str = DEFAULT_RELEASE
    size: int = DEFAULT_SIZE
    packages: tuple[str, ...] = ()
    bios: bool = True
    uefi: bool = True
    mirror: str = MIRROR
    security_mirror: str = SECURITY_MIRROR
    timings: dict[str, float] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        if not _RELEASE.fullmatch(self.release):
            raise ImageBuildError(f"not a Debian release name: {self.release!r}")
        if not MIN_SIZE <= self.size <= MAX_SIZE:
            raise ImageBuildError(f"size {self.size} bytes: from 1 GiB to 2 TiB")
        for p in self.packages:
            if not _PACKAGE.fullmatch(p):
                raise ImageBuildError(f"not a Debian package name: {p!r}")
        if not (self.bios or self.uefi):
            raise ImageBuildError("an image must boot through BIOS, UEFI or both")
        for m in (self.mirror, self.security_mirror):
            if not re.fullmatch(r"(https?|file)://[\x21-\x7e]+", m):
                raise ImageBuildError(f"not a mirror URL: {m!r}")


def parse_size(text: str) -> int:
    """``4G``, ``512M``, ``2T`` or bytes."""
    m = re.fullmatch(r"\s*(\d{1,15})\s*([KMGT]?)(i?B)?\s*", text, re.IGNORECASE)
    if m is None:
        raise ImageBuildError(f"not a size: {text!r} (e.g. 4G)")
    shift = {"": 0, "K": 10, "M": 20, "G": 30, "T": 40}[m.group(2).upper()]
    return int(m.group(1)) << shift


def image_key(recipe: DebianRecipe) -> str:
    """Every input of a build: the recipe's fields, svirt's recipe version
    and the lists above (the archive is read at build time: ``--rebuild``
    takes its newer packages)."""
    data = {"recipe": RECIPE_VERSION, "release": recipe.release, "size": recipe.size,
            "packages": sorted(set(recipe.packages)), "bios": recipe.bios,
            "uefi": recipe.uefi, "mirror": recipe.mirror, "security": recipe.security_mirror,
            "base": PACKAGES, "modules": INITRAMFS_MODULES, "excludes": DPKG_EXCLUDES,
            "args": KERNEL_ARGS, "masked": MASKED, "disk": disk.RECIPE_VERSION,
            "files": [_FSTAB, _CLOUD_CFG, _CLOUD_NO_SSH, _GRUB_CFG, disk.EARLY_CFG]}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def check_host() -> dict[str, str]:
    """Every host tool, or an ImageBuildError naming the package to install."""
    if os.geteuid() != 0:
        raise ImageBuildError("building a Debian image needs root (mmdebstrap, chroot)",
                              hint="run it as root: sudo svirt image build ...")
    missing = [pkg for name, pkg in HOST_TOOLS if shutil.which(name) is None
               and shutil.which(name, path="/usr/sbin:/sbin") is None]
    if missing:
        pkgs = " ".join(sorted(set(missing)))
        raise ImageBuildError(f"host tools missing: install {pkgs}",
                              hint=f"apt-get install {pkgs}")
    return {name: tool(name, pkg) for name, pkg in HOST_TOOLS}


def ensure_debian(recipe: DebianRecipe, *, cache: Path | None = None, rebuild: bool = False,
                  progress: Progress | None = None) -> Path:
    """The cached image for ``recipe``, built first unless it is there
    (under the cache's lock: concurrent builders build once).  Never write
    to it: boot an overlay or ``snapshot=on``, or copy it
    (:func:`build_debian`)."""
    tools = check_host()
    cache = resolve_cache(cache) / "debian"
    ensure_dir(cache)
    cached = cache / f"{recipe.release}-{image_key(recipe)}.qcow2"
    with locked(cache, "debian"):
        if rebuild or not cached.is_file():
            _build_locked(recipe, cache, cached, tools, progress or _silent)
    return cached


def build_debian(recipe: DebianRecipe, out: Path, *, cache: Path | None = None,
                 rebuild: bool = False, progress: Progress | None = None) -> Path:
    """Write the image for ``recipe`` to ``out`` (a copy of the cached one,
    renamed into place whole); the cached image's path."""
    cached = ensure_debian(recipe, cache=cache, rebuild=rebuild, progress=progress)
    if progress:
        progress("copy", out)
    disk.copy_atomic(cached, out)
    return cached


def _silent(step: str, watched: Path | None) -> None:
    return None


def _build_locked(recipe: DebianRecipe, cache: Path, cached: Path, tools: dict[str, str],
                  progress: Progress) -> None:
    for stale in cache.glob(".build-*"):  # left by a killed build (we hold the lock)
        shutil.rmtree(stale, ignore_errors=True)
    for stale in cache.glob(".*.qcow2.*.tmp"):
        stale.unlink(missing_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".build-", dir=cache))
    try:
        root = work / "root"
        ids = disk.DiskIds.derive(image_key(recipe))
        start = time.monotonic()
        progress("mmdebstrap", root)
        bootstrap(recipe, root, tools["mmdebstrap"])
        recipe.timings["mmdebstrap"] = time.monotonic() - start
        progress("configure", None)
        configure_tree(root, ids, tools["chroot"])
        manifest = {"recipe": RECIPE_VERSION, "key": image_key(recipe),
                    "release": recipe.release, "size": recipe.size,
                    "packages": installed_versions(root, tools["chroot"])}
        t = time.monotonic()
        raw = work / "disk.raw"
        disk.assemble(root, raw, recipe.size, ids, tools, progress, bios=recipe.bios,
                      uefi=recipe.uefi)
        recipe.timings["disk"] = time.monotonic() - t
        progress("qcow2", cached)
        disk.to_qcow2(raw, cached, tools["qemu-img"])
        manifest["timings"] = dict(recipe.timings)
        (cache / f"{cached.stem}.json").write_text(json.dumps(manifest, indent=1) + "\n")
        for old in cache.glob(f"{recipe.release}-*.qcow2"):
            if old != cached:  # one image per release: the newest recipe
                old.unlink(missing_ok=True)
                old.with_suffix(".json").unlink(missing_ok=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def bootstrap(recipe: DebianRecipe, root: Path, mmdebstrap: str) -> None:
    """mmdebstrap the release into ``root`` (which must not exist)."""
    modules = "\\n".join(INITRAMFS_MODULES)
    # before the kernel's postinst runs update-initramfs: only these modules
    hook = ('mkdir -p "$1/etc/initramfs-tools/conf.d" "$1/etc/initramfs-tools" && '
            "printf 'MODULES=list\\n' > \"$1/etc/initramfs-tools/conf.d/svirt.conf\" && "
            f"printf '{modules}\\n' >> \"$1/etc/initramfs-tools/modules\"")
    include = ",".join(dict.fromkeys((*PACKAGES, *recipe.packages)))
    argv = [mmdebstrap, "--variant=minbase", "--mode=root", "--format=directory",
            "--aptopt=APT::Install-Recommends \"false\"", f"--include={include}",
            f"--essential-hook={hook}", "--dpkgopt=path-include=/usr/share/doc/*/copyright"]
    argv[-1:-1] = [f"--dpkgopt=path-exclude={p}" for p in DPKG_EXCLUDES]
    argv += [recipe.release, str(root),
             f"deb {recipe.mirror} {recipe.release} main",
             f"deb {recipe.mirror} {recipe.release}-updates main",
             f"deb {recipe.security_mirror} {recipe.release}-security main"]
    run_tool(argv, what="mmdebstrap", timeout=3600,
             hint=f"is {recipe.mirror} reachable, and is {recipe.release!r} a release it "
                  "carries? (the message ends with mmdebstrap's last lines)")


def installed_versions(root: Path, chroot: str) -> dict[str, str]:
    out = run_tool([chroot, str(root), "dpkg-query", "-W", "-f=${Package} ${Version}\\n"],
                   what="dpkg-query in the image", hint="the bootstrap did not finish")
    return dict(line.split(" ", 1) for line in out.splitlines() if " " in line)


_FSTAB = "UUID={root} / ext4 rw,errors=remount-ro 0 1\n"
_CLOUD_CFG = """\
# svirt image build: NoCloud seeds (a cidata ISO or vfat), nothing else probed
datasource_list: [ NoCloud, None ]
# no locales package: the C.UTF-8 locale stays
locale: false
"""
#: without openssh-server: no host keys to make
_CLOUD_NO_SSH = """\
ssh_genkeytypes: []
ssh_deletekeys: false
"""
_GRUB_CFG = """\
set timeout=0
serial --unit=0 --speed=115200
terminal_input serial console
terminal_output serial console
search --no-floppy --fs-uuid --set=root {root}
menuentry 'Debian GNU/Linux' {{
    linux /boot/vmlinuz root=UUID={root} {args}
    initrd /boot/initrd.img
}}
"""


def configure_tree(root: Path, ids: disk.DiskIds, chroot: str) -> None:
    """Step 2 of the recipe, on the bootstrapped tree."""
    etc = root / "etc"
    (etc / "fstab").write_text(_FSTAB.format(root=ids.root_fs))
    (etc / "hostname").write_text("debian\n")
    (etc / "hosts").write_text("127.0.0.1 localhost\n127.0.1.1 debian\n"
                               "::1 localhost ip6-localhost ip6-loopback\n")
    (etc / "machine-id").write_text("")
    ssh = (root / "usr/sbin/sshd").exists()
    (etc / "cloud/cloud.cfg.d/90-svirt.cfg").write_text(_CLOUD_CFG + ("" if ssh
                                                                       else _CLOUD_NO_SSH))
    resolv = etc / "resolv.conf"
    if resolv.is_file() or resolv.is_symlink():
        resolv.unlink()
    for unit in ("systemd-networkd.service",):
        run_tool([chroot, str(root), "systemctl", "enable", unit], what=f"enable {unit}",
                 hint="the bootstrap did not finish")
    for unit in MASKED:
        run_tool([chroot, str(root), "systemctl", "mask", unit], what=f"mask {unit}",
                 hint="the bootstrap did not finish")
    run_tool([chroot, str(root), "passwd", "--lock", "root"], what="lock root",
             hint="the bootstrap did not finish")
    boot = root / "boot"
    kernels = sorted(boot.glob("vmlinuz-*"))
    initrds = sorted(boot.glob("initrd.img-*"))
    if len(kernels) != 1 or len(initrds) != 1:
        raise ImageBuildError(f"expected one kernel and one initrd in /boot, found "
                              f"{len(kernels)} and {len(initrds)}")
    for link, target in (("vmlinuz", kernels[0].name), ("initrd.img", initrds[0].name)):
        (boot / link).unlink(missing_ok=True)
        (boot / link).symlink_to(target)
    grub = boot / "grub"
    grub.mkdir(exist_ok=True)
    (grub / "grub.cfg").write_text(_GRUB_CFG.format(root=ids.root_fs, args=KERNEL_ARGS))
    for stale in (root / "var/lib/apt/lists").glob("*_*"):
        stale.unlink()
    shutil.rmtree(root / "var/cache/apt/archives", ignore_errors=True)
    (root / "var/cache/apt/archives/partial").mkdir(parents=True, exist_ok=True)
    for log in (root / "var/log").rglob("*"):
        if log.is_file():
            log.write_bytes(b"")
