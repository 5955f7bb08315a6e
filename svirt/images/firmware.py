"""Firmware for QEMU guests that boot without a kernel, and each UEFI guest's NVRAM.

BIOS is the SeaBIOS that Debian's QEMU runs (package ``seabios``); UEFI is
OVMF (package ``ovmf``): a code file, read-only and shared by every guest
(it lies under /usr, which svirt never relabels and the jail binds
read-only), and a variables store that the guest writes (boot entries,
Secure Boot keys).  The store is per guest: a copy of the package's
template made by fd, private to that guest while it runs.

- **Transient guests**: the copy is made in a directory the launcher owns
  (the run directory, given as a dirfd) and goes with it at release.
- **Persistent guests** (``[firmware] nvram = "PATH"``): the file lives
  under an image root, reached like every object (from the root's dirfd,
  ``openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_XDEV)``); it
  is created from the template only when it does not exist yet.  An
  existing file must be a regular file with one link, at most
  :data:`NVRAM_MAX_BYTES` (checked first: the bound holds whatever the
  template) and of the template's size: the guest owns it while it runs (it may
  truncate, extend, chmod or hard-link it where it can write), but it
  cannot rename or replace it, since its directory is not the guest's.

The template is opened ``O_RDONLY | O_NOFOLLOW`` with no symlink anywhere on
its path, checked to be a regular file within the bound, and copied from
that fd; the copy is created ``O_CREAT | O_EXCL | O_NOFOLLOW`` (nothing
planted at its name is ever followed or reused) relative to the dirfd.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from svirt.errors import HostError, RelabelRefused
from svirt.resources import Access, Resource, ResourceKind
from svirt.security.files import AT_FDCWD, ROOT_WALK, WALK, open_root, openat2
from svirt.spec import Firmware as Firmware  # the spec's word (firmware = "bios" | "uefi")

SEABIOS = Path("/usr/share/seabios/bios-256k.bin")
#: Debian 12's OVMF without Secure Boot, the pair its firmware descriptor
#: (/usr/share/qemu/firmware/60-edk2-x86_64.json) names: a 4 MiB flash, of
#: which the variables are 528 KiB (540672 bytes)
OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
#: the largest variables store svirt copies or hands to a guest: OVMF's are
#: 128 KiB (the 2 MiB build) or 528 KiB (the 4 MiB build); a store the guest
#: grew past the whole 4 MiB flash (a sparse 1 GiB file, say) is refused
NVRAM_MAX_BYTES = 4 * 1024 * 1024
#: the largest firmware code file read (SeaBIOS 256 KiB, OVMF 3.5 MiB)
CODE_MAX_BYTES = 16 * 1024 * 1024
#: the name of a transient guest's store in its run directory
TRANSIENT_NVRAM = "nvram.fd"
PACKAGE_HINT = "install Debian's firmware: apt-get install ovmf seabios"


class FirmwareMissing(HostError):
    """A firmware file svirt needs is not on the host (or is not a plain file)."""

    def __init__(self, message: str, *, path: Path, hint: str | None = PACKAGE_HINT) -> None:
        super().__init__(message, hint=hint)
        self.path = str(path)


class NvramRefused(RelabelRefused):
    """A guest's NVRAM file may not be used (a link, not a regular file,
    grown past the bound, outside the image roots)."""


@dataclass(frozen=True)
class FirmwareFiles:
    """Where one guest's firmware comes from (no NVRAM for BIOS)."""

    firmware: Firmware
    code: Path
    vars_template: Path | None = None

    def code_resource(self) -> Resource:
        """The code file: read-only, shared, under /usr (never relabelled; the
        jail binds /usr read-only; the kind is the kernel's, a boot image)."""
        return Resource(self.code, Access.RO, ResourceKind.KERNEL, relabel=False)


def locate(firmware: Firmware, *, code: Path | None = None,
           vars_template: Path | None = None) -> FirmwareFiles:
    """The host's firmware files for ``firmware`` (Debian's paths unless
    given), each checked to exist as a regular file; FirmwareMissing otherwise."""
    if firmware is Firmware.BIOS:
        files = FirmwareFiles(firmware, code or SEABIOS)
    else:
        files = FirmwareFiles(firmware, code or OVMF_CODE, vars_template or OVMF_VARS)
    for path, bound in ((files.code, CODE_MAX_BYTES), (files.vars_template, NVRAM_MAX_BYTES)):
        if path is not None:
            os.close(open_firmware_file(path, bound))
    return files


def open_firmware_file(path: Path, bound: int) -> int:
    """An ``O_RDONLY`` fd of ``path``, reached from / with no symlink on the
    way (ROOT_WALK), a regular file of at most ``bound`` bytes."""
    try:
        fd = openat2(AT_FDCWD, path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, 0, ROOT_WALK)
    except FileNotFoundError:
        raise FirmwareMissing(f"firmware {path} is not installed", path=path) from None
    except OSError as err:
        why = ("is a symbolic link or lies under one" if err.errno == errno.ELOOP
               else err.strerror)
        raise FirmwareMissing(f"firmware {path} {why}; svirt opens firmware only by its "
                              "real path", path=path) from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_size > bound:
        os.close(fd)
        what = "not a regular file" if not stat.S_ISREG(st.st_mode) else (
            f"{st.st_size} bytes (at most {bound})")
        raise FirmwareMissing(f"firmware {path} is {what}", path=path)
    os.set_blocking(fd, True)
    return fd


@dataclass(frozen=True)
class Nvram:
    """One guest's variables store, open read-write (``fd``: the launcher
    passes it to QEMU and closes its copy; the path is what gets labelled)."""

    path: Path
    fd: int
    created: bool  # made from the template by this call
    persistent: bool

    def resource(self) -> Resource:
        """Read-write for this guest alone.  A transient store is reached like
        an ephemeral layer (from its run directory); a persistent one like a
        private disk (from its image root)."""
        kind = ResourceKind.DISK if self.persistent else ResourceKind.LAYER
        return Resource(self.path, Access.RW, kind)

    def close(self) -> None:
        os.close(self.fd)


def transient_nvram(run_fd: int, run_dir: Path, template: Path,
                    name: str = TRANSIENT_NVRAM) -> Nvram:
    """A fresh copy of ``template`` as ``name`` in the launcher's directory
    ``run_fd`` (``run_dir`` is its path, for the resource); NvramRefused when
    the name is already taken (nothing there is reused)."""
    try:
        fd = _create_copy(run_fd, name, template, run_dir / name)
    except FileExistsError:
        raise NvramRefused(f"NVRAM {run_dir / name} already exists in the run directory",
                           path=run_dir / name) from None
    return Nvram(run_dir / name, fd, True, False)


def persistent_nvram(path: Path, roots: Iterable[Path], template: Path) -> Nvram:
    """The store at ``path``, under one of the image ``roots``: opened when it
    exists (and passes :func:`check_nvram`), else made from ``template``."""
    path = Path(os.path.normpath(path))
    root = _pick_root(path, roots)
    rel_dir, name = os.path.split(str(path.relative_to(root)))
    if not name:
        raise NvramRefused(f"NVRAM {path} is an image root itself", path=path)
    src = open_firmware_file(template, NVRAM_MAX_BYTES)
    size = os.fstat(src).st_size
    os.close(src)
    dirfd = _walk_dir(path, root, rel_dir or ".")
    try:
        for _ in range(8):
            try:
                pfd = openat2(dirfd, name, os.O_PATH | os.O_NOFOLLOW, 0, WALK)
            except FileNotFoundError:
                try:
                    return Nvram(path, _create_copy(dirfd, name, template, path), True, True)
                except FileExistsError:
                    continue  # appeared meanwhile: check what it is
            except OSError as err:
                raise _refusal(path, err) from None
            try:
                check_nvram(path, os.fstat(pfd), size)
                # the checked inode itself, reopened: never a FIFO or a device
                fd = os.open(f"/proc/self/fd/{pfd}", os.O_RDWR | os.O_CLOEXEC)
            finally:
                os.close(pfd)
            try:
                check_nvram(path, os.fstat(fd), size)
            except BaseException:
                os.close(fd)
                raise
            return Nvram(path, fd, False, True)
        raise NvramRefused(f"NVRAM {path} keeps appearing and disappearing", path=path)
    finally:
        os.close(dirfd)


def check_nvram(path: Path, st: os.stat_result, size: int | None = None) -> None:
    """Refuse a store that is not a regular file with one link within the
    bound, or (``size``: its template's) not the template's size: QEMU
    would refuse it less clearly (a store of another OVMF build, or one the
    guest truncated or extended while it ran)."""
    if stat.S_ISLNK(st.st_mode):
        raise NvramRefused(f"NVRAM {path} is a symbolic link", path=path,
                           hint="name the real file, or remove the link to start afresh")
    if not stat.S_ISREG(st.st_mode):
        raise NvramRefused(f"NVRAM {path} is not a regular file", path=path,
                           hint="remove it; svirt makes a new one from the template")
    if st.st_nlink > 1:
        raise NvramRefused(
            f"NVRAM {path} has {st.st_nlink} hard links; another name could be another "
            "guest's store", path=path, hint="copy it so that it has a single link")
    if st.st_size > NVRAM_MAX_BYTES:
        raise NvramRefused(
            f"NVRAM {path} is {st.st_size} bytes, more than any OVMF store "
            f"(at most {NVRAM_MAX_BYTES})", path=path,
            hint="remove it; svirt makes a new one from the template")
    if size is not None and st.st_size != size:
        raise NvramRefused(
            f"NVRAM {path} is {st.st_size} bytes, its template {size}: another firmware "
            "build's store, or one the guest truncated or extended", path=path,
            hint="remove it; svirt makes a new one from the template")


def _create_copy(dirfd: int, name: str, template: Path, path: Path) -> int:
    """Create ``name`` below ``dirfd`` (O_EXCL, 0600) and copy ``template``
    into it by fd; the new file is removed again if the copy fails."""
    src = open_firmware_file(template, NVRAM_MAX_BYTES)
    try:
        try:
            fd = openat2(dirfd, name, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW,
                         0o600, WALK)
        except OSError as err:
            if err.errno == errno.EEXIST:
                raise
            raise _refusal(path, err) from None
        try:
            _copy(src, fd, NVRAM_MAX_BYTES)
            os.fsync(fd)
            os.lseek(fd, 0, os.SEEK_SET)
        except BaseException:
            _unlink_if_same(dirfd, name, fd)
            os.close(fd)
            raise
        return fd
    finally:
        os.close(src)


def _copy(src: int, dst: int, bound: int) -> None:
    done = 0
    while chunk := os.read(src, 1 << 16):
        done += len(chunk)
        if done > bound:  # the template grew while it was copied
            raise NvramRefused(f"NVRAM template grew past {bound} bytes")
        view = memoryview(chunk)
        while view:
            view = view[os.write(dst, view):]


def _unlink_if_same(dirfd: int, name: str, fd: int) -> None:
    try:
        if os.path.samestat(os.stat(name, dir_fd=dirfd, follow_symlinks=False), os.fstat(fd)):
            os.unlink(name, dir_fd=dirfd)
    except OSError:
        pass


def _pick_root(path: Path, roots: Iterable[Path]) -> Path:
    norm = [Path(os.path.normpath(r)) for r in roots]
    inside = [r for r in norm if r == path or r in path.parents]
    if not inside:
        raise NvramRefused(
            f"NVRAM {path} is outside the image roots "
            f"({', '.join(map(str, norm)) or 'none'})", path=path,
            hint="put it under an image root of the host config")
    return max(inside, key=lambda r: len(r.parts))


def _walk_dir(path: Path, root: Path, rel: str) -> int:
    try:
        rootfd = open_root(root)
    except FileNotFoundError:
        raise NvramRefused(f"NVRAM {path}: its root {root} does not exist", path=path) from None
    try:
        return openat2(rootfd, rel, os.O_PATH | os.O_DIRECTORY, 0, WALK)
    except OSError as err:
        raise _refusal(path, err) from None
    finally:
        os.close(rootfd)


def _refusal(path: Path, err: OSError) -> NvramRefused:
    if err.errno == errno.ELOOP:
        return NvramRefused(f"NVRAM {path}: a symbolic link on its way from the image root",
                            path=path, hint="name the real path")
    if err.errno == errno.EXDEV:
        return NvramRefused(f"NVRAM {path} crosses a mount point below its image root",
                            path=path)
    if err.errno == errno.ENOENT:
        return NvramRefused(f"NVRAM {path}: its directory does not exist", path=path)
    return NvramRefused(f"NVRAM {path}: {err.strerror}", path=path)
