"""A bootable disk from a root directory, without a loop device or a mount.

The layout (:func:`svirt.images.parttable.gpt_layout`): a protective MBR
carrying GRUB's ``boot.img``; a 1 MiB BIOS boot partition holding GRUB's
``core.img`` (``boot.img`` and ``core.img``'s first sector patched with
where it lies, as ``grub-bios-setup`` does: GRUB's ``boot.h``); a 32 MiB
ESP (``mkfs.vfat`` on a file, ``EFI/BOOT/BOOTX64.EFI`` put there with
``mcopy``); the root file system filling the rest (``mke2fs -d`` of the
tree at its offset in the disk file).  GRUB's images are made with the
release's own ``grub-mkimage`` inside the tree (``chroot``); both carry a
small config that finds the root by its UUID and loads the modules and
``/boot/grub/grub.cfg`` from there.  The raw disk, sparse, is then
converted to a compressed qcow2.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import struct
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from svirt.errors import ImageBuildError
from svirt.images.apt import run_tool
from svirt.images.parttable import SECTOR, gpt_layout, gpt_sectors, protective_mbr

#: part of every cache key of an image made here
RECIPE_VERSION = "2"
ESP_BYTES = 32 << 20
#: GRUB's boot.h (i386-pc): where boot.img keeps core.img's sector, the boot
#: drive, the jump over the drive check; diskboot.img's blocklist at its end
KERNEL_SECTOR, BOOT_DRIVE, DRIVE_CHECK = 0x5C, 0x64, 0x66
MBR_CODE_END = 0x1B8  # the disk signature and partition table follow
BLOCKLIST = SECTOR - 12
#: modules in the core images; the rest load from the root's /usr/lib/grub
CORE_MODULES = ("part_gpt", "ext2", "search", "search_fs_uuid")
EARLY_CFG = """search --no-floppy --fs-uuid --set=root {root}
set prefix=($root)/usr/lib/grub
insmod normal
normal ($root)/boot/grub/grub.cfg
"""


@dataclass(frozen=True)
class DiskIds:
    """The disk's GUID and the root file system's UUID, derived from the
    cache key (the same inputs give the same image)."""

    disk: uuid.UUID
    root_fs: uuid.UUID
    seed: bytes

    @classmethod
    def derive(cls, key: str) -> DiskIds:
        base = uuid.uuid5(uuid.NAMESPACE_URL, f"svirt-image:{key}")
        return cls(disk=uuid.uuid5(base, "disk"), root_fs=uuid.uuid5(base, "root"),
                   seed=key.encode())


def assemble(root: Path, raw: Path, size: int, ids: DiskIds, tools: dict[str, str],
             progress: Callable[[str, Path | None], None], *, bios: bool = True,
             uefi: bool = True) -> None:
    """Write the bootable raw disk ``raw`` of ``size`` bytes from ``root``."""
    size -= size % (1 << 20)
    bios_part, esp_part, root_part = gpt_layout(size, esp=ESP_BYTES)
    with open(raw, "wb") as f:
        f.truncate(size)
    mbr = bytearray(protective_mbr(size))
    primary, backup = gpt_sectors(size, (bios_part, esp_part, root_part), ids.disk, ids.seed)
    progress("grub", None)
    early = root / "boot/grub/early.cfg"
    early.write_text(EARLY_CFG.format(root=ids.root_fs))
    chroot = tools["chroot"]
    if bios:
        core = _mkimage(root, chroot, "i386-pc", ("biosdisk", *CORE_MODULES))
        if len(core) > bios_part.size:
            raise ImageBuildError(f"GRUB's core image ({len(core)} bytes) does not fit the "
                                  "BIOS boot partition")
        boot_img = (root / "usr/lib/grub/i386-pc/boot.img").read_bytes()
        mbr[:MBR_CODE_END] = patch_boot_img(boot_img, bios_part.first)[:MBR_CODE_END]
        _write_at(raw, bios_part.offset, patch_core_img(core, bios_part.first))
    esp_file = raw.with_name("esp.img")
    progress("esp", esp_file)
    _make_esp(esp_file, root, chroot, tools, uefi)
    _copy_into(esp_file, raw, esp_part.offset)
    esp_file.unlink()
    _write_at(raw, 0, bytes(mbr) + primary)
    _write_at(raw, size - len(backup), backup)
    progress("mke2fs", raw)
    run_tool([tools["mke2fs"], "-q", "-t", "ext4", "-L", "root", "-U", str(ids.root_fs),
              "-E", f"offset={root_part.offset},root_owner=0:0", "-d", str(root), str(raw),
              f"{root_part.size // 1024}k"],
             what="mke2fs -d", hint="is there room in the cache?", timeout=1800)


def _mkimage(root: Path, chroot: str, target: str, modules: tuple[str, ...]) -> bytes:
    name = f"/tmp/svirt-grub-{target}.img"  # noqa: S108 - inside the image's tree
    run_tool([chroot, str(root), "grub-mkimage", "-O", target, "-o", name,
              "-p", "/usr/lib/grub", "-c", "/boot/grub/early.cfg", *modules],
             what=f"grub-mkimage -O {target}", hint="grub-pc-bin / grub-efi-amd64-bin in "
             "the image")
    path = root / name.lstrip("/")
    data = path.read_bytes()
    path.unlink()
    return data


def patch_boot_img(boot_img: bytes, core_sector: int) -> bytes:
    """GRUB's MBR code pointed at ``core_sector``; the BIOS's drive number
    used, the floppy check skipped (as grub-bios-setup does for a disk)."""
    if len(boot_img) != SECTOR:
        raise ImageBuildError(f"GRUB's boot.img is {len(boot_img)} bytes, not {SECTOR}")
    img = bytearray(boot_img)
    struct.pack_into("<Q", img, KERNEL_SECTOR, core_sector)
    img[BOOT_DRIVE] = 0xFF
    img[DRIVE_CHECK:DRIVE_CHECK + 2] = b"\x90\x90"
    return bytes(img)


def patch_core_img(core: bytes, core_sector: int) -> bytes:
    """core.img with its first sector's blocklist naming the rest of it
    (contiguous, right after it)."""
    padded = bytearray(core + bytes(-len(core) % SECTOR))
    sectors = len(padded) // SECTOR
    struct.pack_into("<QH", padded, BLOCKLIST, core_sector + 1, sectors - 1)
    return bytes(padded)


def _make_esp(esp_file: Path, root: Path, chroot: str, tools: dict[str, str],
              uefi: bool) -> None:
    run_tool([tools["mkfs.vfat"], "-n", "EFI", "-i", "5e1f1e5e", "-C", str(esp_file),
              str(ESP_BYTES // 1024)], what="mkfs.vfat", hint="dosfstools")
    if not uefi:
        return
    efi = _mkimage(root, chroot, "x86_64-efi", CORE_MODULES)
    with tempfile.TemporaryDirectory(dir=esp_file.parent) as tmp:
        loader = Path(tmp) / "BOOTX64.EFI"
        loader.write_bytes(efi)
        run_tool([tools["mmd"], "-i", str(esp_file), "::/EFI", "::/EFI/BOOT"], what="mmd",
                 hint="mtools")
        run_tool([tools["mcopy"], "-i", str(esp_file), str(loader), "::/EFI/BOOT/BOOTX64.EFI"],
                 what="mcopy", hint="mtools")


def _write_at(path: Path, offset: int, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        view = memoryview(data)
        while view:
            view = view[os.pwrite(fd, view, offset + len(data) - len(view)):]
    finally:
        os.close(fd)


def _copy_into(src: Path, dest: Path, offset: int) -> None:
    """``src`` into ``dest`` at ``offset``, holes kept (zero blocks skipped)."""
    block = 1 << 20
    with open(src, "rb") as f:
        pos = 0
        while chunk := f.read(block):
            if chunk.count(0) != len(chunk):
                _write_at(dest, offset + pos, chunk)
            pos += len(chunk)


def to_qcow2(raw: Path, dest: Path, qemu_img: str) -> None:
    """``raw`` as a compressed qcow2 at ``dest``, through a temporary file
    renamed in (zlib: a third of the size, about 12 s more to build, no
    measurable cost to a TCG boot: QEMU inflates on the host; what the
    guest writes is stored uncompressed)."""
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    os.close(fd)
    try:
        run_tool([qemu_img, "convert", "-q", "-c", "-f", "raw", "-O", "qcow2", "-o",
                  "compression_type=zlib", str(raw), tmp], what="qemu-img convert",
                 hint="is there room in the cache?", timeout=1800)
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def copy_atomic(src: Path, dest: Path) -> None:
    """``src`` copied to ``dest`` through a new temporary file in ``dest``'s
    directory, every step by the directory's fd and the file's (the
    directory may be a user's: a name there may be swapped for a symlink at
    any time), renamed over it."""
    dest = dest.absolute()
    dfd = os.open(dest.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        tmp = f".{dest.name}.{secrets.token_hex(6)}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600, dir_fd=dfd)
        made = os.fstat(fd)
        try:
            with open(src, "rb") as s, os.fdopen(fd, "wb") as d:
                shutil.copyfileobj(s, d, 1 << 20)
                d.flush()
                os.fchmod(d.fileno(), 0o644)
                os.fsync(d.fileno())
            os.rename(tmp, dest.name, src_dir_fd=dfd, dst_dir_fd=dfd)
        except BaseException:
            with contextlib.suppress(OSError):
                if os.path.samestat(os.stat(tmp, dir_fd=dfd, follow_symlinks=False), made):
                    os.unlink(tmp, dir_fd=dfd)
            raise
    finally:
        os.close(dfd)
