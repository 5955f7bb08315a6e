"""svirt's own test suite's pytest plugin: fixtures for tests that boot real guests.

Load it with ``-p svirt.testing`` (the plugin for users' tests is
:mod:`svirt.pytest_plugin`, loaded by its entry point).  It gives a private registry per test, tiny
UML and QEMU guests (built once per session), an image directory other uids
can traverse, a host config (``SVIRT_CONFIG``) whose roots hold them, a
``launch_guest`` factory that stops and releases every guest
it started, and attaches the console of each guest to a failing test's report.
Skips come from the product's own host probe.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from svirt.host import HostInfo, probe_host
from svirt.images import build
from svirt.launcher.launch import Guest
from svirt.launcher.registry import Registry
from svirt.pytest_plugin import started_guests
from svirt.spec import Backend, GuestSpec

#: the console of a failing test's guests in its report (when the entry point
#: is not loaded: PYTEST_DISABLE_PLUGIN_AUTOLOAD)
pytest_plugins = ["svirt.pytest_plugin"]

_CONFIG_KEY = pytest.StashKey[tuple[str, str | None]]()

#: the host config the test session runs under: images in /var/tmp/svirt-img-*
#: (``image_dir``) with their logs beside them, tiny guests in the image cache
IMAGE_PARENT = "/var/tmp"  # noqa: S108 - a private 0755 mkdtemp below it, see image_dir
TEST_IMAGE_ROOTS = (IMAGE_PARENT, "/var/lib/svirt/images")
TEST_LOG_ROOTS = (IMAGE_PARENT, "/var/log/svirt")


def write_host_config(path: Path, *, image_roots: Iterable[str | Path] = (),
                      log_roots: Iterable[str | Path] = (),
                      block_device_roots: Iterable[str | Path] = ()) -> Path:
    """Write a host config file (see :mod:`svirt.config`) for a test."""
    def array(items: Iterable[str | Path]) -> str:
        return "[" + ", ".join(json.dumps(str(i)) for i in items) + "]"

    path.write_text(f"image_roots = {array(image_roots)}\nlog_roots = {array(log_roots)}\n"
                    f"block_device_roots = {array(block_device_roots)}\n")
    return path


def pytest_configure(config: pytest.Config) -> None:
    """Point SVIRT_CONFIG (inherited by the CLI the tests run) at a host config
    whose roots hold the test images, the tiny guests' cache and the defaults."""
    fd, name = tempfile.mkstemp(prefix="svirt-test-config-", suffix=".toml")
    os.close(fd)
    cache = os.environ.get("SVIRT_CACHE") or str(build.DEFAULT_CACHE)
    write_host_config(Path(name), image_roots=(*TEST_IMAGE_ROOTS, cache),
                      log_roots=TEST_LOG_ROOTS)
    config.stash[_CONFIG_KEY] = (name, os.environ.get("SVIRT_CONFIG"))
    os.environ["SVIRT_CONFIG"] = name


def pytest_unconfigure(config: pytest.Config) -> None:
    saved = config.stash.get(_CONFIG_KEY, None)
    if saved is None:
        return
    name, previous = saved
    Path(name).unlink(missing_ok=True)
    if previous is None:
        os.environ.pop("SVIRT_CONFIG", None)
    else:
        os.environ["SVIRT_CONFIG"] = previous


@pytest.fixture(scope="session")
def host() -> HostInfo:
    return probe_host()


def require_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: guests run under their own uids")


def require_kvm(host: HostInfo) -> None:
    if not host.kvm.usable:
        pytest.skip(f"KVM cannot boot a standard guest here: {host.kvm.reason}")


@pytest.fixture(scope="session")
def tiny_uml() -> build.TinyGuest:
    return build.tiny_uml_guest()


@pytest.fixture(scope="session")
def tiny_qemu() -> build.TinyGuest:
    return build.tiny_qemu_guest()


@dataclass(frozen=True)
class DebianImage:
    """The cached Debian image (never write to it: boot it ``snapshot=on`` or
    through an overlay), how long getting it took and whether it was built."""

    path: Path
    seconds: float
    built: bool


@pytest.fixture(scope="session")
def debian_image() -> DebianImage:
    """``svirt image build debian``'s default image (BIOS and UEFI), built
    once into the image cache and reused by every later session; skipped
    with the reason where it cannot be built (not root, a tool missing)."""
    from svirt.errors import ImageBuildError
    from svirt.images.debian import DebianRecipe, check_host, ensure_debian, image_key

    recipe = DebianRecipe()
    try:
        check_host()
    except ImageBuildError as err:
        pytest.skip(f"cannot build the Debian image here: {err.message} ({err.hint})")
    cache = Path(os.environ.get("SVIRT_CACHE") or build.DEFAULT_CACHE)
    built = not (cache / "debian" / f"{recipe.release}-{image_key(recipe)}.qcow2").is_file()
    start = time.monotonic()
    path = ensure_debian(recipe)
    return DebianImage(path, time.monotonic() - start, built)


@pytest.fixture
def run_root(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A private registry directory, also exported as SVIRT_RUN_DIR for the CLI."""
    root = Path(tempfile.mkdtemp(prefix="svirt-run-", dir="/run" if os.access("/run", os.W_OK)
                                 else None))
    root.chmod(0o755)  # guest uids walk to their own run directory below it
    monkeypatch.setenv("SVIRT_RUN_DIR", str(root))
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def registry(run_root: Path) -> Registry:
    return Registry(run_root)


@pytest.fixture
def image_dir() -> Iterator[Path]:
    """A directory for test images that guest uids may traverse (pytest's tmp is 0700)."""
    path = Path(tempfile.mkdtemp(prefix="svirt-img-", dir=IMAGE_PARENT))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def tiny_spec(guest: build.TinyGuest, name: str, backend: Backend, mode: str = "stay",
              **kwargs: Any) -> GuestSpec:
    marker = kwargs.pop("marker", "SVIRT-READY")
    extra = kwargs.pop("extra_cmdline", "")
    # UML: 128M, not less: its host mapping is randomised and small guests then
    # fail at random (fork EAGAIN, OOM) under load
    memory = kwargs.pop("memory", 128 if backend is Backend.UML else 256)
    return GuestSpec(name=name, backend=backend, kernel=guest.kernel, initrd=guest.initrd,
                     memory=memory, cmdline=build.guest_cmdline(mode, marker, extra),
                     **kwargs)


@pytest.fixture
def launch_guest(request: pytest.FixtureRequest, registry: Registry
                 ) -> Iterator[Callable[..., Guest]]:
    """Start guests that are stopped and released when the test ends."""
    with started_guests(request.node) as start_one:

        def start(spec: GuestSpec, **kwargs: Any) -> Guest:
            kwargs.setdefault("registry", registry)
            return start_one(spec, **kwargs)

        yield start
