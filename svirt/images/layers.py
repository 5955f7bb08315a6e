"""Ephemeral disks: a copy-on-write layer per guest over a shared, read-only base.

``[[disk]] ephemeral = true`` (or ``svirt run --ephemeral``): the guest
writes to a layer in its run directory; the base (``disk.path``, and the
backing chain declared below it) is held read-only, labelled as shared
content, so any number of guests can run on one base at once and its bytes
never change.  The layer is the guest's alone and goes with the run
directory on every exit path: ``Registry.release`` (a normal stop, a failed
launch, ``svirt gc`` after a killed launcher) unmounts the guest's storage
(:mod:`svirt.launcher.storage`), and a reboot empties it.

- **QEMU**: a qcow2 overlay ``RUN/NAME.d/layers/diskN.qcow2``, made by the
  launcher before exec.  ``layers/`` is root's; the file is created there
  ``O_CREAT | O_EXCL | O_NOFOLLOW`` (nothing planted at that name is ever
  followed), and ``qemu-img create -u`` writes the header into that very
  inode through ``/proc/self/fd/N``, without opening the base (its size
  comes from the fd the root walk checked).  The header is read back and
  must name exactly the base and its format.  The overlay is then held
  like any private disk (owned by the guest, its image label).
- **UML**: ``ubdN=COW,BASE``: UML creates the COW file itself, as the
  guest's uid, at ``RUN/NAME.d/home/.diskN.cow`` (in its home: it needs
  a directory it may write, and names starting with a dot are no guest's
  umid), and opens the base read-only.  The COW header records the base's
  path and mtime; relabelling the base changes neither (only its ctime), and
  the COW is new at every start, so the check UML makes on a reused COW never
  comes into play.  UML's COW sits on raw images only.

The layer lives on the guest's own storage mount (the run directory is a
tmpfs of its own, :mod:`svirt.launcher.storage`), sized from the bases'
virtual sizes (:func:`layer_sizes`): a guest that grows its layer (or writes
anything else) without end gets ENOSPC there, never on ``/run``.  Its pages
are charged to the guest's memory cgroup as it writes them, and the launch
adds the mount's size to that cgroup's limit.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import struct
import subprocess
from pathlib import Path

from svirt.errors import HostError, LaunchError, RelabelRefused, SecurityError
from svirt.host import CLEAN_PATH
from svirt.resources import LAYERS_DIR, Access, Resource, ResourceKind, layer_path
from svirt.spec import Backend, Disk, DiskFormat, GuestSpec

QEMU_IMG = "qemu-img"
QEMU_IMG_TIMEOUT = 60.0


def _qcow2_virtual_size(fd: int, path: Path) -> int:
    header = os.pread(fd, 32, 0)
    if len(header) < 32 or header[:4] != b"QFI\xfb":
        raise SecurityError(f"{path}: not a qcow2 image (bad magic)", path=path)
    (size,) = struct.unpack_from(">Q", header, 24)
    return int(size)


def base_size(disk: Disk, opened_fd: int) -> int:
    """The virtual size of the base, read through the fd the root walk checked
    (an ``O_PATH`` fd: reopened read-only through /proc, the same inode)."""
    st = os.fstat(opened_fd)
    if not stat.S_ISREG(st.st_mode):
        raise RelabelRefused(f"{disk.path}: the base of an ephemeral disk must be a regular "
                             "file", path=disk.path)
    if disk.format is DiskFormat.RAW:
        size = st.st_size
    else:
        fd = os.open(f"/proc/self/fd/{opened_fd}", os.O_RDONLY | os.O_CLOEXEC)
        try:
            size = _qcow2_virtual_size(fd, disk.path)
        finally:
            os.close(fd)
    if size <= 0:
        raise SecurityError(f"{disk.path}: the base of an ephemeral disk is empty",
                            path=disk.path)
    return size


def create_qcow2_layer(run_dir: Path, layer: Path, disk: Disk, size: int, qemu_img: str
                       ) -> None:
    """Create the overlay ``layer`` (in ``run_dir/layers``, root's) over ``disk``.

    Every step is by fd: the directory is made and opened without following
    a link, the file is created ``O_EXCL | O_NOFOLLOW`` (an entry already
    there, a planted symlink included, is refused, never followed), and
    qemu-img writes into that inode through ``/proc/self/fd/N``.
    """
    if layer.parent != run_dir / LAYERS_DIR:
        raise LaunchError(f"{layer} is not in {run_dir / LAYERS_DIR}")
    run_fd = os.open(run_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        try:
            os.mkdir(LAYERS_DIR, 0o711, dir_fd=run_fd)
        except FileExistsError:
            pass
        dir_fd = os.open(LAYERS_DIR, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                         dir_fd=run_fd)
    except OSError as err:
        raise RelabelRefused(f"{run_dir / LAYERS_DIR}: {err.strerror}",
                             path=run_dir / LAYERS_DIR) from err
    finally:
        os.close(run_fd)
    try:
        st = os.fstat(dir_fd)
        if st.st_uid != os.geteuid() or stat.S_IMODE(st.st_mode) & 0o022:
            raise RelabelRefused(f"{layer.parent} is not root's alone", path=layer.parent)
        try:
            fd = os.open(layer.name, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
        except FileExistsError:
            raise RelabelRefused(
                f"{layer} already exists; svirt creates an ephemeral layer only as a new "
                "file and never follows or reuses what is there", path=layer) from None
    finally:
        os.close(dir_fd)
    try:
        _run_qemu_img(qemu_img, fd, disk, size)
        _check_layer_header(fd, layer, disk)
    finally:
        os.close(fd)


def _run_qemu_img(qemu_img: str, fd: int, disk: Disk, size: int) -> None:
    size = -(-size // 512) * 512  # qcow2 sizes are whole sectors
    argv = [qemu_img, "create", "-q", "-f", "qcow2",
            "-u",  # do not open the base: its size is known, and it is not root's to read
            "-F", str(disk.format), "-b", str(disk.path),
            f"/proc/self/fd/{fd}", str(size)]
    try:
        done = subprocess.run(argv, pass_fds=(fd,), capture_output=True, text=True,  # noqa: S603
                              timeout=QEMU_IMG_TIMEOUT, env={"PATH": CLEAN_PATH},
                              check=False, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise LaunchError(f"{disk.path}: qemu-img could not create the ephemeral layer: {err}",
                          argv=argv) from err
    if done.returncode != 0:
        raise LaunchError(f"{disk.path}: qemu-img could not create the ephemeral layer "
                          f"(exit {done.returncode})", argv=argv,
                          log_tail=(done.stderr or done.stdout)[-2000:])


def _check_layer_header(fd: int, layer: Path, disk: Disk) -> None:
    from svirt.images.chain import HEADER_READ, read_qcow2_backing

    try:
        name, fmt = read_qcow2_backing(os.pread(fd, HEADER_READ, 0))
    except SecurityError as err:
        raise LaunchError(f"{layer}: qemu-img wrote no valid header: {err.message}") from None
    if name != str(disk.path) or fmt != str(disk.format):
        raise LaunchError(f"{layer}: its header names {name!r} ({fmt}), not {disk.path} "
                          f"({disk.format})")


def check_cow_name_free(layer: Path) -> None:
    """UML creates the COW file itself; before exec nothing may be at its name
    (the home is new, so only root could have put anything there)."""
    try:
        home_fd = os.open(layer.parent, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW
                          | os.O_CLOEXEC)
    except OSError as err:
        raise RelabelRefused(f"{layer.parent}: {err.strerror}", path=layer.parent) from err
    try:
        os.stat(layer.name, dir_fd=home_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    except OSError as err:
        raise RelabelRefused(f"{layer}: {err.strerror}", path=layer) from err
    finally:
        os.close(home_fd)
    raise RelabelRefused(f"{layer} already exists; UML would open it as the COW file of an "
                         "ephemeral disk (svirt never reuses one)", path=layer)


def layer_sizes(spec: GuestSpec, roots: tuple[Path, ...]) -> dict[int, int]:
    """The virtual size of each ephemeral disk's base (by disk index), read
    through the fd the root walk checked: what its layer is sized from."""
    from svirt.security.files import open_resource

    sizes: dict[int, int] = {}
    for i, disk in enumerate(spec.disks):
        if not disk.ephemeral:
            continue
        base = open_resource(Resource(disk.path, Access.RO, ResourceKind.BACKING), roots)
        try:
            sizes[i] = base_size(disk, base.fd)
        finally:
            base.close()
    return sizes


def prepare_layers(spec: GuestSpec, run_dir: Path, home: Path, roots: tuple[Path, ...],
                   sizes: dict[int, int] | None = None) -> None:
    """Make every ephemeral disk's layer ready before its objects are held:
    QEMU overlays are created; UML's COW names are checked free (UML makes
    the file).  ``sizes``: :func:`layer_sizes`, when the caller read them
    already (the storage mount is sized from them)."""
    qemu_img: str | None = None
    if sizes is None:
        sizes = layer_sizes(spec, roots)
    for i, disk in enumerate(spec.disks):
        if not disk.ephemeral:
            continue
        layer = layer_path(spec, i, home)
        if spec.backend is Backend.UML:
            if re.search(r"[\s,:=]", str(layer)):
                raise HostError(f"{layer}: UML reads ',' ':' '=' and spaces in disk paths as "
                                "syntax, and the run directory's path has one",
                                hint="set SVIRT_RUN_DIR to a plain path")
            check_cow_name_free(layer)
            continue
        if qemu_img is None:
            qemu_img = shutil.which(QEMU_IMG, path=CLEAN_PATH)
            if qemu_img is None:
                raise HostError("ephemeral qemu disks need qemu-img",
                                hint="apt-get install --no-install-recommends qemu-utils")
        create_qcow2_layer(run_dir, layer, disk, sizes[i], qemu_img)
