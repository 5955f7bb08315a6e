"""A small disk that boots through firmware: the tiny QEMU guest behind GRUB.

``grub-mkrescue`` (Debian's grub-common, with grub-pc-bin, grub-efi-amd64-bin,
xorriso and mtools) makes a hybrid ISO 9660 image holding the tiny guest's
kernel and initramfs and a ``grub.cfg`` that boots them with a serial
console.  The same file boots three ways: as a disk through SeaBIOS (its
MBR), as a disk through OVMF (its EFI system partition with GRUB's
``BOOTX64.EFI``) and as a cdrom through either (El Torito).  GRUB writes
to the serial port, and the guest's ``/init`` prints its marker there, so
a test sees the firmware, the loader and the kernel all do their part.

Built once per input (the kernel's and initramfs's bytes, the command
line) into the image cache, like the tiny guests: world-readable, written
through a temporary file, under the cache lock.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from svirt.errors import ImageBuildError
from svirt.images.build import TinyGuest
from svirt.images.cache import locked, resolve_cache

#: the Debian packages the image needs on the host that builds it
PACKAGES = ("grub-common", "grub-pc-bin", "grub-efi-amd64-bin", "xorriso", "mtools")
MKRESCUE = "grub-mkrescue"
BUILD_SECONDS = 120

GRUB_CFG = """\
serial --unit=0 --speed=115200
terminal_input serial
terminal_output serial
set timeout=0
menuentry svirt-tiny {{
  linux /boot/vmlinuz console=ttyS0 {cmdline}
  initrd /boot/initrd
}}
"""


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def boot_disk(guest: TinyGuest, cmdline: str, cache: Path | None = None) -> Path:
    """The hybrid image for ``guest`` booting with ``cmdline`` (cached)."""
    if "\n" in cmdline or "}" in cmdline or ";" in cmdline:
        raise ImageBuildError(f"boot disk: a command line of plain words only: {cmdline!r}")
    cache = resolve_cache(cache)
    cfg = GRUB_CFG.format(cmdline=cmdline)
    key = hashlib.sha256("\0".join(
        (_digest(guest.kernel), _digest(guest.initrd), cfg)).encode()).hexdigest()[:16]
    dest = cache / f"bootdisk-{key}.img"
    if dest.exists():
        return dest
    mkrescue = shutil.which(MKRESCUE)
    if mkrescue is None:
        raise ImageBuildError(f"{MKRESCUE} is not installed",
                              hint="apt-get install --no-install-recommends "
                                   + " ".join(PACKAGES))
    with locked(cache, "bootdisk"):
        if dest.exists():
            return dest
        with tempfile.TemporaryDirectory(prefix=".bootdisk-", dir=cache) as tmp:
            tree = Path(tmp) / "tree"
            (tree / "boot" / "grub").mkdir(parents=True)
            shutil.copyfile(guest.kernel, tree / "boot" / "vmlinuz")
            shutil.copyfile(guest.initrd, tree / "boot" / "initrd")
            (tree / "boot" / "grub" / "grub.cfg").write_text(cfg)
            out = Path(tmp) / "boot.img"
            try:
                subprocess.run([mkrescue, "-o", str(out), str(tree)],  # noqa: S603
                               check=True, capture_output=True, timeout=BUILD_SECONDS)
            except subprocess.CalledProcessError as err:
                tail = err.stderr.decode(errors="replace")[-400:]
                raise ImageBuildError(f"{MKRESCUE} failed: {tail}",
                                      hint="apt-get install --no-install-recommends "
                                           + " ".join(PACKAGES)) from err
            except subprocess.TimeoutExpired as err:
                raise ImageBuildError(f"{MKRESCUE} took over {BUILD_SECONDS} s") from err
            out.chmod(0o644)
            os.replace(out, dest)
    return dest
