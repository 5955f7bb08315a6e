"""Paths a guest (or a careless config) shapes: nothing is opened by path
before the root walk, roots are compared in one spelling, and nothing is
created before every check of that object has passed.

- A guest that owns its image directory plants a FIFO where the spec's
  backing layer is: ``svirt check`` (and a launch) read every header through
  the walked fd, so the FIFO is refused at once instead of blocking the
  open forever.
- ``//etc`` (POSIX keeps a leading double slash in ``normpath``) and other
  spellings of ``/etc`` as a root are refused by the deny-list.
- A console log refused for where it is leaves no file behind.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from svirt import config
from svirt.errors import ConfigError, RelabelRefused
from svirt.images.build import DEFAULT_CACHE, TinyGuest
from svirt.images.chain import chain_resources
from svirt.security.files import Roots, open_log
from svirt.spec import load_spec
from svirt.testing import TEST_IMAGE_ROOTS, write_host_config

from ..integration.helpers import write_spec
from .helpers import run_as

ROOT = Path(__file__).resolve().parents[2]
#: what `svirt check` may take with a FIFO planted in the chain
CHECK_BOUND = 15.0


def _qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


def _svirt(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "svirt", *args], capture_output=True,
                          text=True, timeout=timeout, check=False, cwd=ROOT)


def _chain(image_dir: Path, tiny_qemu: TinyGuest) -> tuple[Path, Path, Path]:
    base, top = image_dir / "base.qcow2", image_dir / "top.qcow2"
    _qemu_img("create", "-q", "-f", "qcow2", str(base), "1M")
    _qemu_img("create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(top))
    spec = write_spec(image_dir / "chain.toml", "chained", "qemu", tiny_qemu, extra=(
        f'accel = "tcg"\n[[disk]]\npath = "{top}"\nformat = "qcow2"\n'
        f'backing = [{{path = "{base}", format = "qcow2"}}]\n'))
    return base, top, spec


def _swap_to_fifo(victim: Path, uid: int) -> None:
    """As the guest's uid (it owns the directory): the layer becomes a FIFO
    under the same name, atomically."""
    def plant() -> None:
        fifo = victim.with_name(victim.name + ".fifo")
        os.mkfifo(fifo, 0o600)
        os.rename(fifo, victim)

    assert run_as(uid, uid, plant) == ""
    assert victim.is_fifo()


@pytest.mark.parametrize("where", ["backing", "top"])
def test_a_fifo_swapped_into_the_chain_does_not_hang_check(
        tiny_qemu: TinyGuest, image_dir: Path, where: str) -> None:
    """The spec is loaded and preflighted (every layer a regular file: both
    stat it), then the guest's uid swaps a declared qcow2 layer for a FIFO
    before the headers are read (the window between preflight and the chain
    check of `svirt check` and of a launch; the loop test below hits it
    through the CLI): the chain check, in a thread with a bound.  Read by
    path, open(2) blocked for as long as nobody wrote the FIFO; through the
    walk it is refused at once."""
    base, top, spec_file = _chain(image_dir, tiny_qemu)
    spec = load_spec(spec_file)
    uid = 1_999_123
    os.chown(image_dir, uid, uid)
    victim = base if where == "backing" else top
    outcome: list[BaseException | None] = []
    try:
        _swap_to_fifo(victim, uid)

        def check() -> None:
            try:
                chain_resources(spec.disks)
                outcome.append(None)
            except BaseException as err:  # noqa: BLE001 - the test reads it
                outcome.append(err)

        started = time.monotonic()
        worker = threading.Thread(target=check, daemon=True)
        worker.start()
        worker.join(CHECK_BOUND)
        took = time.monotonic() - started
        if worker.is_alive():  # set it free: a writer lets the open return
            fd = os.open(victim, os.O_WRONLY | os.O_NONBLOCK)
            os.close(fd)
            worker.join(5)
            pytest.fail(f"svirt check blocked on the FIFO ({where}) for {CHECK_BOUND}s")
        print(f"check with a FIFO as the {where} layer: refused in {took:.3f}s")
        assert isinstance(outcome[0], RelabelRefused), outcome
        assert f"{victim} is not a regular file" in str(outcome[0])
    finally:
        os.chown(image_dir, 0, 0)


def test_svirt_check_stays_bounded_while_the_guest_swaps_a_fifo_in_and_out(
        tiny_qemu: TinyGuest, image_dir: Path) -> None:
    """The CLI under a guest-uid loop that renames a FIFO and the real layer
    in turn: every `svirt check` ends within its bound (refused, or checked
    when it saw the real file)."""
    base, _top, spec_file = _chain(image_dir, tiny_qemu)
    uid = 1_999_124
    os.chown(image_dir, uid, uid)
    os.chown(base, uid, uid)
    stop = image_dir / "stop"
    script = (f"import os\nreal, fifo, spare = {str(base)!r}, {str(base)!r} + '.f', "
              f"{str(base)!r} + '.r'\nos.mkfifo(fifo)\n"
              f"while not os.path.exists({str(stop)!r}):\n"
              "    os.rename(real, spare); os.rename(fifo, real)\n"
              "    os.rename(real, fifo); os.rename(spare, real)\n")
    swapper = subprocess.Popen([sys.executable, "-c", script], user=uid, group=uid,
                               extra_groups=[])
    results: dict[int, int] = {}
    try:
        worst = 0.0
        for _ in range(12):
            started = time.monotonic()
            try:
                out = _svirt("check", str(spec_file), timeout=CHECK_BOUND)
            except subprocess.TimeoutExpired:
                pytest.fail(f"svirt check blocked for {CHECK_BOUND}s while a FIFO was swapped in")
            worst = max(worst, time.monotonic() - started)
            results[out.returncode] = results.get(out.returncode, 0) + 1
        print(f"12 checks under the swap loop: exit codes {results}, slowest {worst:.2f}s")
    finally:
        stop.touch()
        swapper.wait(10)
        os.chown(image_dir, 0, 0)


@pytest.mark.parametrize("spelling", ["//etc", "///etc", "/etc/.", "/etc/", "//etc/svirt",
                                      "/var/../etc", "/var/lib/../../etc/x"])
def test_spellings_of_etc_are_refused_as_roots(spelling: str) -> None:
    for key in ("image_roots", "log_roots"):
        with pytest.raises(ConfigError, match="never relabels") as err:
            config.parse({key: [spelling]})
        assert err.value.key == key


def test_roots_are_compared_in_one_spelling() -> None:
    parsed = config.parse({"image_roots": ["//var//lib/./svirt/images/"]})
    assert parsed.image_roots == (Path("/var/lib/svirt/images"),)


def test_a_refused_console_log_leaves_nothing_behind(tmp_path: Path) -> None:
    """A log root spelled ``//etc`` (what the old parser let through): the
    log is refused before it exists; and a log whose directory is a symlink
    out of the root is refused before its file is created."""
    log = Path("/etc/svirt-test-never-created.log")
    assert not log.exists()
    try:
        with pytest.raises(RelabelRefused, match="never relabels"):
            open_log(Path("//etc") / log.name, Roots((), logs=(Path("//etc"),)))
        assert not log.exists()
    finally:
        log.unlink(missing_ok=True)
    # the directory check comes before the create, also below a legal root
    outside = tmp_path / "outside"
    outside.mkdir()
    root = tmp_path / "logs"
    root.mkdir()
    (root / "sub").symlink_to(outside)
    with pytest.raises(RelabelRefused, match="symbolic link"):
        open_log(root / "sub" / "console.log", Roots((), logs=(root,)))
    assert list(outside.iterdir()) == []


def test_a_launch_refused_for_its_log_root_creates_no_log(tmp_path: Path,
                                                           tiny_uml: TinyGuest,
                                                           image_dir: Path) -> None:
    """Through `svirt run` of a real UML spec with a host config whose log
    root is //etc: refused, and /etc holds no new file (the old parser took
    the root, and the launch created the log before its real path was
    checked)."""
    conf = tmp_path / "svirt.toml"
    cache = os.environ.get("SVIRT_CACHE") or str(DEFAULT_CACHE)
    write_host_config(conf, image_roots=(*TEST_IMAGE_ROOTS, cache), log_roots=("//etc",))
    log = Path("/etc/svirt-refused-guest.log")
    spec = write_spec(image_dir / "g.toml", "refused", "uml", tiny_uml,
                      extra=f'[console]\nlog = "//etc/{log.name}"\n')
    before = set(os.listdir("/etc"))
    try:
        out = subprocess.run([sys.executable, "-m", "svirt", "run", str(spec)],
                             capture_output=True, text=True, timeout=60, check=False, cwd=ROOT,
                             env={**os.environ, "SVIRT_CONFIG": str(conf)})
        assert out.returncode != 0
        assert "never relabels" in out.stderr, out.stderr
        assert not log.exists()
        assert set(os.listdir("/etc")) - before == set()
    finally:
        log.unlink(missing_ok=True)
