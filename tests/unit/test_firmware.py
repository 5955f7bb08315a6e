"""Firmware: Debian's real SeaBIOS and OVMF files, per-guest NVRAM copies made by
fd, and a real QEMU (TCG) boot of each firmware to its banner."""

from __future__ import annotations

import hashlib
import os
import select
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from svirt.images import firmware
from svirt.images.firmware import (
    OVMF_CODE,
    OVMF_VARS,
    SEABIOS,
    Firmware,
    FirmwareMissing,
    NvramRefused,
    locate,
    persistent_nvram,
    transient_nvram,
)
from svirt.images.seed import CloudInit, make_seed
from svirt.resources import Access, ResourceKind

needs_ovmf = pytest.mark.skipif(not OVMF_VARS.exists(), reason="needs Debian's ovmf (./run)")
needs_seabios = pytest.mark.skipif(not SEABIOS.exists(), reason="needs Debian's seabios")
QEMU = shutil.which("qemu-system-x86_64")


@pytest.fixture
def root_dir(tmp_path: Path) -> Path:
    """An image root: a real directory, no symlink on its way (tmp_path may
    lie under one on some hosts, so resolve it)."""
    root = tmp_path.resolve() / "images"
    root.mkdir()
    return root


@pytest.fixture
def run_fd(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    run = tmp_path.resolve() / "run"
    run.mkdir(mode=0o700)
    fd = os.open(run, os.O_RDONLY | os.O_DIRECTORY)
    yield fd, run
    os.close(fd)


@needs_ovmf
@needs_seabios
def test_locate_debian_firmware() -> None:
    uefi = locate(Firmware.UEFI)
    assert uefi.code == OVMF_CODE and uefi.vars_template == OVMF_VARS
    assert OVMF_VARS.stat().st_size == 540672  # 528 KiB: the 4 MiB build's store
    assert OVMF_VARS.stat().st_size <= firmware.NVRAM_MAX_BYTES
    bios = locate(Firmware.BIOS)
    assert bios.code == SEABIOS and bios.vars_template is None
    res = uefi.code_resource()
    assert (res.access, res.kind, res.relabel) == (Access.RO, ResourceKind.KERNEL, False)


def test_missing_firmware_says_which_package(tmp_path: Path) -> None:
    with pytest.raises(FirmwareMissing) as err:
        locate(Firmware.UEFI, code=tmp_path / "nope.fd")
    assert "not installed" in err.value.message
    assert err.value.hint and "apt-get install ovmf" in err.value.hint
    (tmp_path / "dir.fd").mkdir()
    with pytest.raises(FirmwareMissing, match="not a regular file"):
        locate(Firmware.BIOS, code=tmp_path / "dir.fd")


@needs_ovmf
def test_transient_nvram_is_a_private_copy(run_fd: tuple[int, Path]) -> None:
    fd, run = run_fd
    nv = transient_nvram(fd, run, OVMF_VARS)
    try:
        st = os.fstat(nv.fd)
        assert (nv.created, nv.persistent) == (True, False)
        assert st.st_mode & 0o777 == 0o600 and st.st_nlink == 1
        assert (run / "nvram.fd").read_bytes() == OVMF_VARS.read_bytes()
        assert os.read(nv.fd, 16) == OVMF_VARS.read_bytes()[:16]  # rw fd at its start
        res = nv.resource()
        assert (res.path, res.access, res.kind) == (run / "nvram.fd", Access.RW,
                                                    ResourceKind.LAYER)
    finally:
        nv.close()
    with pytest.raises(NvramRefused, match="already exists"):
        transient_nvram(fd, run, OVMF_VARS)


@needs_ovmf
def test_persistent_nvram_made_once_then_kept(root_dir: Path) -> None:
    path = root_dir / "vm1" / "VARS.fd"
    path.parent.mkdir()
    nv = persistent_nvram(path, [root_dir], OVMF_VARS)
    assert nv.created and nv.persistent
    os.pwrite(nv.fd, b"guest wrote this", 4096)  # what the guest's firmware does
    nv.close()
    again = persistent_nvram(path, [root_dir], OVMF_VARS)
    try:
        assert not again.created
        assert os.pread(again.fd, 16, 4096) == b"guest wrote this"
        assert again.resource().kind is ResourceKind.DISK
    finally:
        again.close()


@needs_ovmf
def test_persistent_nvram_outside_roots_refused(root_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(NvramRefused, match="outside the image roots"):
        persistent_nvram(tmp_path / "elsewhere.fd", [root_dir], OVMF_VARS)
    with pytest.raises(NvramRefused, match="does not exist"):
        persistent_nvram(root_dir / "no-such-dir" / "v.fd", [root_dir], OVMF_VARS)
    assert not (tmp_path / "elsewhere.fd").exists()


def _boot_until(argv: list[str], banner: bytes, pass_fds: tuple[int, ...] = (),
                timeout: float = 10.0) -> bytes:
    """Run QEMU until ``banner`` shows on its stdout (or ``timeout``)."""
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, pass_fds=pass_fds)
    assert proc.stdout is not None
    out = b""
    deadline = time.monotonic() + timeout
    try:
        while banner not in out and (left := deadline - time.monotonic()) > 0:
            if select.select([proc.stdout], [], [], left)[0]:
                chunk = os.read(proc.stdout.fileno(), 65536)
                if not chunk:
                    break
                out += chunk
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
    return out


def _ovmf_argv(code: int, vars_fd: int) -> list[str]:
    """OVMF's two flashes from fds: the code read-only, the store read-write."""
    return [
        str(QEMU), *BASE, "-machine", "q35,pflash0=fw-code,pflash1=fw-vars",
        "-add-fd", f"fd={code},set=1,opaque=fw-code",
        "-add-fd", f"fd={vars_fd},set=2,opaque=fw-vars",
        "-blockdev", "driver=file,filename=/dev/fdset/1,node-name=fw-code-file,read-only=on",
        "-blockdev", "driver=raw,file=fw-code-file,node-name=fw-code,read-only=on",
        "-blockdev", "driver=file,filename=/dev/fdset/2,node-name=fw-vars-file",
        "-blockdev", "driver=raw,file=fw-vars-file,node-name=fw-vars",
    ]


BASE = ["-nodefaults", "-no-user-config", "-display", "none", "-m", "128", "-accel", "tcg"]


@pytest.mark.integration
@pytest.mark.skipif(QEMU is None, reason="needs qemu-system-x86_64")
@needs_seabios
def test_seabios_boots_to_its_banner() -> None:
    """Real SeaBIOS under TCG: it logs to the debug port (0x402) from its
    first instruction; the serial port stays silent without a VGA."""
    fw = locate(Firmware.BIOS)
    out = _boot_until([str(QEMU), *BASE, "-machine", "pc", "-bios", str(fw.code),
                       "-serial", "none", "-chardev", "stdio,id=dbg",
                       "-device", "isa-debugcon,iobase=0x402,chardev=dbg"], b"SeaBIOS (version")
    assert b"SeaBIOS (version" in out, out[-500:]


@pytest.mark.integration
@pytest.mark.skipif(QEMU is None, reason="needs qemu-system-x86_64")
@needs_ovmf
def test_ovmf_boots_from_fds_with_a_per_guest_store(run_fd: tuple[int, Path]) -> None:
    """Real OVMF under TCG, both flashes and a cloud-init seed passed as fds
    (``-add-fd`` and ``/dev/fdset/N``: what the jail needs), the code and the
    seed read-only: the firmware reaches its boot manager on the serial port."""
    dirfd, run = run_fd
    fw = locate(Firmware.UEFI)
    assert fw.vars_template is not None
    nv = transient_nvram(dirfd, run, fw.vars_template)
    seed_path = make_seed(CloudInit(user_data="#cloud-config\n"), uuid="u-1", name="g1",
                          dirfd=dirfd, directory=run).path
    seed = os.open(seed_path, os.O_RDONLY | os.O_CLOEXEC)
    code = firmware.open_firmware_file(fw.code, firmware.CODE_MAX_BYTES)
    before = hashlib.sha256(fw.code.read_bytes()).hexdigest()
    try:
        out = _boot_until([
            *_ovmf_argv(code, nv.fd),
            "-add-fd", f"fd={seed},set=3,opaque=seed",
            "-blockdev", "driver=file,filename=/dev/fdset/3,node-name=seed-file,read-only=on",
            "-blockdev", "driver=raw,file=seed-file,node-name=seed,read-only=on",
            "-device", "ide-cd,drive=seed,bus=ide.1",
            "-serial", "stdio"], b"BdsDxe", pass_fds=(code, nv.fd, seed))
    finally:
        os.close(seed)
        os.close(code)
        nv.close()
    assert b"BdsDxe" in out, out[-500:]
    assert hashlib.sha256(fw.code.read_bytes()).hexdigest() == before  # shared, unchanged


@pytest.mark.integration
@pytest.mark.skipif(QEMU is None, reason="needs qemu-system-x86_64")
@needs_ovmf
def test_ovmf_writes_a_persistent_store_that_is_kept(root_dir: Path) -> None:
    """What the firmware wrote (its boot entries) is what the next start gets."""
    path = root_dir / "vm1" / "VARS.fd"
    path.parent.mkdir()
    nv = persistent_nvram(path, [root_dir], OVMF_VARS)
    code = firmware.open_firmware_file(OVMF_CODE, firmware.CODE_MAX_BYTES)
    try:
        out = _boot_until([*_ovmf_argv(code, nv.fd), "-serial", "stdio"], b"BdsDxe",
                          pass_fds=(code, nv.fd))
    finally:
        os.close(code)
        nv.close()
    assert b"BdsDxe" in out, out[-500:]
    written = path.read_bytes()
    assert written != OVMF_VARS.read_bytes() and len(written) == OVMF_VARS.stat().st_size
    again = persistent_nvram(path, [root_dir], OVMF_VARS)
    try:
        assert not again.created
        assert os.pread(again.fd, len(written) + 1, 0) == written
    finally:
        again.close()
