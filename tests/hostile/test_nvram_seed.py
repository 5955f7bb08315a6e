"""Attacks on a guest's NVRAM store and cloud-init seed.

What a guest really can do to its NVRAM: while it runs, the DAC driver makes
the store its own (owner = the guest's uid, mode 0600), so the guest may
truncate or extend it (a sparse 1 GiB file), chmod it, and hard-link it into
any directory it can write on the same file system.  It cannot rename,
unlink or replace it: the store's directory is not the guest's.  These
tests play exactly that, as a real uid, and then check the next start
refuses the result.  What the guest cannot do (plant a symlink, a FIFO, a
link to another guest's store at the store's name) is played too, by
whoever could write the directory between runs (an admin's mistake, another
tool): it must be refused without being followed, opened or read.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import stat
import tempfile
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from svirt.images.firmware import (
    NVRAM_MAX_BYTES,
    OVMF_VARS,
    Firmware,
    FirmwareMissing,
    NvramRefused,
    locate,
    persistent_nvram,
    transient_nvram,
)
from svirt.images.seed import (
    SEED_MAX_BYTES,
    CloudInit,
    SeedRefused,
    make_seed,
    seed_files,
    write_seed,
)

from .helpers import can_open, run_as

pytestmark = pytest.mark.skipif(not OVMF_VARS.exists(), reason="needs Debian's ovmf (./run)")

GUEST = int(os.environ.get("SVIRT_UID_BASE", "3700000")) + 7  # this test's guest uid
OTHER = GUEST + 1
UUID = "1b4e28ba-2fa1-11d2-883f-0016d3cca427"


@pytest.fixture
def root_dir() -> Iterator[Path]:
    """An image root the guest uid can reach (pytest's tmp_path is 0700 root's)."""
    base = Path(tempfile.mkdtemp(prefix="svirt-nvram-", dir="/var/tmp"))
    base.chmod(0o755)
    root = base / "images"
    root.mkdir(mode=0o755)
    yield root
    shutil.rmtree(base)


@pytest.fixture
def alarm() -> Iterator[None]:
    """Whatever blocks (a FIFO opened for reading) fails the test, not hangs it."""
    def fire(signum: int, frame: object) -> None:
        raise TimeoutError("blocked")

    old = signal.signal(signal.SIGALRM, fire)
    signal.alarm(10)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def _digest(path: Path) -> tuple[str, int, int]:
    st = path.stat()
    return hashlib.sha256(path.read_bytes()).hexdigest(), st.st_mtime_ns, st.st_size


def _store(root: Path, name: str = "vm1") -> Path:
    path = root / name / "VARS.fd"
    path.parent.mkdir(exist_ok=True)
    persistent_nvram(path, [root], OVMF_VARS).close()
    return path


def _while_running(path: Path) -> None:
    """What the DAC driver does for the run; release puts it back."""
    os.chown(path, GUEST, GUEST)
    os.chmod(path, 0o600)


def _released(path: Path) -> None:
    os.chown(path, 0, 0, follow_symlinks=False)
    if not path.is_symlink():
        os.chmod(path, 0o600)


def test_guest_extends_its_store_to_a_sparse_gib(root_dir: Path) -> None:
    path = _store(root_dir)
    _while_running(path)
    assert run_as(GUEST, GUEST, os.truncate, path, 1 << 30) == ""
    _released(path)
    with pytest.raises(NvramRefused, match="more than any OVMF store"):
        persistent_nvram(path, [root_dir], OVMF_VARS)
    assert path.stat().st_size == 1 << 30  # refused, not "repaired" behind the admin's back


def test_guest_truncates_its_store(root_dir: Path) -> None:
    path = _store(root_dir)
    _while_running(path)
    assert run_as(GUEST, GUEST, os.truncate, path, 0) == ""
    _released(path)
    with pytest.raises(NvramRefused, match="its template"):
        persistent_nvram(path, [root_dir], OVMF_VARS)


def test_guest_cannot_replace_its_store(root_dir: Path) -> None:
    path = _store(root_dir)
    before = _digest(path)
    _while_running(path)

    def swap() -> None:
        os.symlink("/etc/shadow", path.with_name("evil"))

    def unlink() -> None:
        os.unlink(path)

    def rename() -> None:
        os.rename(path, path.with_name("moved"))

    for attack in (swap, unlink, rename):
        err = run_as(GUEST, GUEST, attack)
        assert err.startswith("PermissionError"), (attack.__name__, err)
    assert _digest(path) == before and sorted(os.listdir(path.parent)) == ["VARS.fd"]


def test_guest_hard_links_its_store(root_dir: Path) -> None:
    """protected_hardlinks lets the owner link its own file: into a directory
    of its own on the same file system, the store now has two names."""
    path = _store(root_dir)
    own = root_dir / "guest-own"
    own.mkdir()
    os.chown(own, GUEST, GUEST)
    _while_running(path)
    assert run_as(GUEST, GUEST, os.link, path, own / "keep") == ""
    _released(path)
    with pytest.raises(NvramRefused, match="2 hard links"):
        persistent_nvram(path, [root_dir], OVMF_VARS)


def test_store_swapped_for_a_symlink_to_shadow(root_dir: Path) -> None:
    path = _store(root_dir)
    path.unlink()
    path.symlink_to("/etc/shadow")
    before = _digest(Path("/etc/shadow"))
    with pytest.raises(NvramRefused, match="symbolic link"):
        persistent_nvram(path, [root_dir], OVMF_VARS)
    assert _digest(Path("/etc/shadow")) == before
    assert os.stat("/etc/shadow").st_uid == 0 and path.is_symlink()


def test_store_directory_swapped_for_a_symlink(root_dir: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (root_dir / "vm1").symlink_to(elsewhere)
    with pytest.raises(NvramRefused, match="symbolic link"):
        persistent_nvram(root_dir / "vm1" / "VARS.fd", [root_dir], OVMF_VARS)
    assert list(elsewhere.iterdir()) == []  # nothing created through the link


def test_store_is_a_hard_link_to_another_guests(root_dir: Path) -> None:
    other = _store(root_dir, "vm2")
    os.pwrite(os.open(other, os.O_WRONLY), b"vm2 secrets", 0)
    before = _digest(other)
    (root_dir / "vm1").mkdir()
    os.link(other, root_dir / "vm1" / "VARS.fd")
    with pytest.raises(NvramRefused, match="hard links"):
        persistent_nvram(root_dir / "vm1" / "VARS.fd", [root_dir], OVMF_VARS)
    assert _digest(other) == before


def test_store_is_a_fifo(root_dir: Path, alarm: None) -> None:
    (root_dir / "vm1").mkdir()
    os.mkfifo(root_dir / "vm1" / "VARS.fd")
    started = time.monotonic()
    with pytest.raises(NvramRefused, match="not a regular file"):
        persistent_nvram(root_dir / "vm1" / "VARS.fd", [root_dir], OVMF_VARS)
    assert time.monotonic() - started < 2


def test_transient_name_planted(tmp_path: Path) -> None:
    run = tmp_path.resolve() / "run"
    run.mkdir()
    canary = tmp_path / "canary"
    canary.write_bytes(b"root's")
    (run / "nvram.fd").symlink_to(canary)
    fd = os.open(run, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(NvramRefused, match="already exists"):
            transient_nvram(fd, run, OVMF_VARS)
    finally:
        os.close(fd)
    assert canary.read_bytes() == b"root's" and (run / "nvram.fd").is_symlink()


def test_template_replaced_by_a_symlink(tmp_path: Path, alarm: None) -> None:
    link = tmp_path / "VARS.fd"
    link.symlink_to(OVMF_VARS)
    with pytest.raises(FirmwareMissing, match="symbolic link"):
        locate(Firmware.UEFI, vars_template=link)
    linked_dir = tmp_path / "ovmf"
    linked_dir.symlink_to(OVMF_VARS.parent)
    with pytest.raises(FirmwareMissing, match="symbolic link"):
        locate(Firmware.UEFI, vars_template=linked_dir / OVMF_VARS.name)
    fifo = tmp_path / "fifo.fd"
    os.mkfifo(fifo)
    with pytest.raises(FirmwareMissing, match="not a regular file"):
        locate(Firmware.UEFI, vars_template=fifo)
    huge = tmp_path / "huge.fd"
    with open(huge, "wb") as f:
        f.truncate(1 << 30)
    run = tmp_path.resolve() / "run"
    run.mkdir()
    fd = os.open(run, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(FirmwareMissing, match=f"at most {NVRAM_MAX_BYTES}"):
            transient_nvram(fd, run, huge)
        with pytest.raises(FirmwareMissing, match="symbolic link"):
            transient_nvram(fd, run, link)
    finally:
        os.close(fd)
    assert list(run.iterdir()) == []  # nothing left behind by a refused copy


def test_user_data_of_100_mib(tmp_path: Path, alarm: None) -> None:
    big = tmp_path / "user-data"
    with open(big, "wb") as f:
        f.write(b"#cloud-config\n")
        f.truncate(100 << 20)
    tracemalloc.start()
    started = time.monotonic()
    try:
        with pytest.raises(SeedRefused, match="exceed"):
            seed_files(CloudInit(user_data_file=big), uuid=UUID, name="a", roots=[tmp_path])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * SEED_MAX_BYTES, peak  # read at most the bound, never the file
    assert time.monotonic() - started < 2
    with pytest.raises(SeedRefused, match="exceed"):
        seed_files(CloudInit(user_data="#cloud-config\n" + "a" * (100 << 20)),
                   uuid=UUID, name="a")
    os.mkfifo(tmp_path / "fifo")
    os.mknod(tmp_path / "zero", 0o600 | stat.S_IFCHR, os.makedev(1, 5))  # /dev/zero
    for odd, why in ((tmp_path / "fifo", "not a regular file"),
                     (tmp_path / "zero", "character device"),
                     (Path("/dev/zero"), "never relabels")):
        with pytest.raises(SeedRefused, match=why):
            seed_files(CloudInit(user_data_file=odd), uuid=UUID, name="a",
                       roots=[tmp_path, Path("/dev")])


def test_user_data_file_is_a_symlink_to_shadow(tmp_path: Path) -> None:
    """A spec that names /etc/shadow (itself, or through a link or a hard
    link in an image root) never gets its bytes into the guest's seed."""
    (tmp_path / "ud").symlink_to("/etc/shadow")
    cases = [(tmp_path / "ud", "symbolic link"), (Path("/etc/shadow"), "never relabels")]
    try:
        os.link("/etc/shadow", tmp_path / "hl")
        cases.append((tmp_path / "hl", "hard links"))
    except OSError:
        pass  # another file system here: a hard link cannot be made at all
    try:
        for path, why in cases:
            with pytest.raises(SeedRefused, match=why):
                seed_files(CloudInit(user_data_file=path), uuid=UUID, name="a",
                           roots=[tmp_path])
    finally:
        (tmp_path / "hl").unlink(missing_ok=True)  # never leave a second name of shadow


@pytest.mark.parametrize("hostname", [
    "web1\ninstance-id: evil", "web1\nlocal-hostname: evil", "a: b", "web1 #x",
    "{instance-id: evil}", "-web", "x" * 64, "web1\r", "wéb", "",
])
def test_hostname_injection_refused(hostname: str) -> None:
    with pytest.raises(SeedRefused, match="not a host name"):
        seed_files(CloudInit(), uuid=UUID, name=hostname)
    with pytest.raises(SeedRefused, match="not a host name"):
        seed_files(CloudInit(meta_data={"local-hostname": hostname}), uuid=UUID, name="a")


def test_meta_data_values_stay_values() -> None:
    """An extra value that tries to be YAML stays one JSON string; a value
    with a newline or another control character is refused."""
    evil = "x\ninstance-id: evil\nlocal-hostname: evil\n"
    tricky = 'a: b - c #x {instance-id: evil} "\\" \'q\' &anchor *alias !!python/object'
    meta = seed_files(CloudInit(meta_data={"note": tricky}), uuid=UUID, name="web1")
    assert meta["meta-data"].count(b"\n") == 1
    assert yaml.safe_load(meta["meta-data"]) == {"instance-id": UUID,
                                                 "local-hostname": "web1", "note": tricky}
    with pytest.raises(SeedRefused, match="control character"):
        seed_files(CloudInit(meta_data={"note": evil}), uuid=UUID, name="web1")
    with pytest.raises(SeedRefused):
        seed_files(CloudInit(meta_data={"instance-id": evil}), uuid=UUID, name="web1")
    with pytest.raises(SeedRefused):
        seed_files(CloudInit(), uuid=evil, name="web1")


def test_seed_name_planted_and_other_uid_cannot_read(root_dir: Path, tmp_path: Path) -> None:
    run = root_dir.parent / "run"
    run.mkdir(mode=0o755)
    fd = os.open(run, os.O_RDONLY | os.O_DIRECTORY)
    try:
        seed = make_seed(CloudInit(user_data="#cloud-config\npassword: s3cret\n"),
                         uuid=UUID, name="web1", dirfd=fd, directory=run)
        assert run_as(OTHER, OTHER, os.listdir, run) == ""  # the way there is open...
        assert not can_open(OTHER, OTHER, seed.path)  # ...the file is not: 0400 root's
        canary = tmp_path / "canary"
        canary.write_bytes(b"root's")
        (run / "seed2.iso").symlink_to(canary)
        with pytest.raises(SeedRefused, match="already exists"):
            write_seed(fd, run, b"x" * 2048, "seed2.iso")
        assert canary.read_bytes() == b"root's"
    finally:
        os.close(fd)
    assert os.stat(seed.path).st_mode & 0o777 == 0o400
