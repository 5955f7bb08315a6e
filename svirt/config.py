"""The host config file: which directories svirt may take guest objects from.

``/etc/svirt/svirt.toml`` (``$SVIRT_CONFIG`` names another file).  A missing
file means the defaults below; a file that is there but wrong is a
:class:`~svirt.errors.ConfigError` naming the key.  Every key is optional::

    # directories under which disks, kernels, initrds and backing files may be
    image_roots = ["/var/lib/svirt/images", "/var/cache/svirt"]
    # directories under which console logs may be (image roots count too)
    log_roots = ["/var/log/svirt"]
    # directories under which a disk may be a block device (none by default);
    # the node itself must be named, not a symlink to it (/dev/disk/by-id/*
    # are symlinks: name /dev/sdb with block_device_roots = ["/dev"])
    block_device_roots = []
    # svirt's persistent state
    state_dir = "/var/lib/svirt"
    # detached guests' console logs (STATE/logs/NAME.log): rotated at this
    # size, this many files kept; a spec's [console] max_bytes / keep win
    console_log_max_bytes = 2097152
    console_log_keep = 3

Roots are an allow-list: svirt opens every object by walking from a root's
directory fd, refusing symlinks and mount points on the way (see
:mod:`svirt.security.files`).  A guest spec's ``security.image_roots`` may only
narrow the image roots.  The file is read once per process (again only when it
changes).
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from svirt.errors import ConfigError

DEFAULT_PATH = Path("/etc/svirt/svirt.toml")
#: never allowed as (or inside) an image or log root: svirt never relabels there
DENIED_TREES = ("/etc", "/usr", "/boot", "/proc", "/sys", "/dev")


@dataclass(frozen=True)
class HostConfig:
    #: disks, kernels, initrds and backing files must be under one of these
    #: (``/var/cache/svirt`` is where the demo's and the tests' tiny guests are built)
    image_roots: tuple[Path, ...] = (Path("/var/lib/svirt/images"), Path("/var/cache/svirt"))
    #: console logs must be under one of these (or under an image root)
    log_roots: tuple[Path, ...] = (Path("/var/log/svirt"),)
    #: a disk may be a block device only under one of these (default: none)
    block_device_roots: tuple[Path, ...] = ()
    #: svirt's persistent state
    state_dir: Path = Path("/var/lib/svirt")
    #: the file this came from ("" for the built-in defaults)
    source: str = ""
    #: detached guests' rotated console logs: bytes per file, files kept
    #: (virtlogd's defaults); a spec's [console] max_bytes / keep win
    console_log_max_bytes: int = 2 * 1024 * 1024
    console_log_keep: int = 3


def config_path() -> Path:
    env = os.environ.get("SVIRT_CONFIG")
    return Path(env) if env else DEFAULT_PATH


_cache: dict[tuple[str, int, int, int], HostConfig] = {}


def load(path: Path | None = None) -> HostConfig:
    """The host config (defaults when the file is missing), cached per process."""
    path = path or config_path()
    try:
        st = path.stat()
    except FileNotFoundError:
        return HostConfig()
    except OSError as err:
        raise ConfigError(f"cannot read it: {err.strerror}", source=str(path)) from None
    key = (str(path), st.st_ino, st.st_mtime_ns, st.st_size)
    cached = _cache.get(key)
    if cached is None:
        cached = _cache[key] = parse(_read(path), str(path))
    return cached


def _read(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as err:
        raise ConfigError(f"cannot read it: {err.strerror}", source=str(path)) from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"not valid TOML: {err}", source=str(path)) from None


def parse(data: dict[str, Any], source: str = "<config>") -> HostConfig:
    known = {"image_roots", "log_roots", "block_device_roots", "state_dir",
             "console_log_max_bytes", "console_log_keep"}
    for key in data:
        if key not in known:
            raise ConfigError("unknown key", source=source, key=key,
                              hint=f"known keys: {', '.join(sorted(known))}")
    defaults = HostConfig()
    roots: dict[str, tuple[Path, ...]] = {}
    for key in ("image_roots", "log_roots", "block_device_roots"):
        value = data.get(key, getattr(defaults, key))
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"expected an array of paths, got {value!r}", source=source,
                              key=key)
        roots[key] = tuple(_abs_path(source, key, v) for v in value)
    for key in ("image_roots", "log_roots"):
        for root in roots[key]:
            denied = next((t for t in DENIED_TREES if _under(root, Path(t))), None)
            if denied is not None or root == Path("/"):
                raise ConfigError(f"{root} is (or contains) {denied or '/etc'}, "
                                  "which svirt never relabels", source=source, key=key)
    state = _abs_path(source, "state_dir", data.get("state_dir", str(defaults.state_dir)))
    sizes = {}
    for key, low, high in (("console_log_max_bytes", 4096, 1 << 40), ("console_log_keep", 1, 100)):
        value = data.get(key, getattr(defaults, key))
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ConfigError(f"expected an integer {low}-{high}, got {value!r}", source=source,
                              key=key)
        sizes[key] = value
    return HostConfig(roots["image_roots"], roots["log_roots"], roots["block_device_roots"],
                      state, source, **sizes)


def _abs_path(source: str, key: str, value: object) -> Path:
    if isinstance(value, Path):
        value = str(value)
    if not isinstance(value, str) or not value.startswith("/") or "\0" in value:
        raise ConfigError(f"expected an absolute path, got {value!r}", source=source, key=key)
    return Path(os.path.normpath(value))


def _under(path: Path, tree: Path) -> bool:
    return path == tree or tree in path.parents
