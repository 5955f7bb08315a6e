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
    # `svirt run`'s console log ([console] log = PATH): at most this many MiB;
    # past it the file restarts with a marker line (svirt/launcher/bounds.py)
    console_log_max_mib = 64
    # each guest's writable storage (its run directory: home, ephemeral
    # layers) is a tmpfs of its own with these caps; every ephemeral disk
    # adds its virtual size (+1/256 + 1 MiB) to the size (svirt/launcher/storage.py)
    guest_storage_mib = 16
    guest_storage_inodes = 4096
    # every guest's storage cap together (tmpfs: RAM or swap when written)
    # at most this % of MemTotal + SwapTotal: a launch past it is refused
    guest_storage_budget_percent = 50

    # several hosts on shared storage (optional; see svirt/claims/): uids,
    # MCS pairs and writer locks on images are allocated in etcd
    [cluster]
    etcd = ["https://etcd1.example:2379", "https://etcd2.example:2379"]
    name = "default"            # the cluster: keys live under /svirt/NAME/
    host = "node1"              # this host's name (default: the hostname)
    ttl = 15                    # seconds; the host's lease, and the fence rule
    timeout = 2.0               # seconds per etcd request
    ca = "/etc/svirt/etcd/ca.pem"        # TLS: verify the members (default:
                                         # the system's CAs)
    cert = "/etc/svirt/etcd/client.pem"  # TLS: client certificate (required)
    key = "/etc/svirt/etcd/client.key"   # and its key (required)
    insecure = false            # true: allow http:// members and no client
                                # certificate (every svirt command warns)
    user = "svirt-prod"         # etcd auth: this user (its role limited to
    password_file = "/etc/svirt/etcd/password"  # /svirt/NAME/); root's, 0600
    image_identity = "file"     # "file": the filesystem's id and the inode;
                                # "export": an export's name + the path in it
    exports = { nfs1 = "/srv/nfs1" }     # export name = where it is mounted here

Roots are an allow-list: svirt opens every object by walking from a root's
directory fd, refusing symlinks and mount points on the way (see
:mod:`svirt.security.files`).  A guest spec's ``security.image_roots`` may only
narrow the image roots.  The file is read once per process (again only when it
changes).
"""

from __future__ import annotations

import os
import re
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
    #: a foreground guest's console log (``[console] log``): at most this many
    #: MiB, then truncated with a marker (svirt/launcher/bounds.py)
    console_log_max_mib: int = 64
    #: each guest's storage mount (svirt/launcher/storage.py): MiB beyond its
    #: ephemeral layers, and inodes
    guest_storage_mib: int = 16
    guest_storage_inodes: int = 4096
    #: the storage caps of every guest on the host together: at most this
    #: percent of MemTotal + SwapTotal (svirt/launcher/storage.py)
    guest_storage_budget_percent: int = 50
    #: [cluster]: allocations in etcd (None: this host alone)
    cluster: ClusterConfig | None = None


@dataclass(frozen=True)
class ClusterConfig:
    """The ``[cluster]`` table (see :mod:`svirt.claims`)."""

    etcd: tuple[str, ...]
    name: str = "default"
    host: str = ""  # "" = the hostname
    ttl: int = 15
    timeout: float = 2.0
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    image_identity: str = "file"  # or "export"
    exports: tuple[tuple[str, Path], ...] = ()
    #: allow http:// members and no client certificate (anyone who reaches
    #: etcd could then revoke the host's lease or free its image locks)
    insecure: bool = False
    #: etcd auth (the JSON gateway ignores a certificate's CN): user, and the
    #: file holding its password
    user: str = ""
    password_file: Path | None = None

    def transport_problems(self) -> list[str]:
        """What makes this table's etcd transport unauthenticated (empty: none)."""
        problems = [f"{url} is not https://" for url in self.etcd
                    if not url.startswith("https://")]
        if self.cert is None or self.key is None:
            problems.append("no client certificate (cert, key)")
        return problems


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
             "console_log_max_bytes", "console_log_keep", "console_log_max_mib",
             "guest_storage_mib",
             "guest_storage_inodes", "guest_storage_budget_percent", "cluster"}
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
    for key, low, high in (("console_log_max_bytes", 4096, 1 << 40), ("console_log_keep", 1, 100),
                           ("console_log_max_mib", 1, 1 << 20),
                           ("guest_storage_mib", 1, 1 << 20),
                           ("guest_storage_inodes", 64, 1 << 20),
                           ("guest_storage_budget_percent", 1, 100)):
        value = data.get(key, getattr(defaults, key))
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ConfigError(f"expected an integer {low}-{high}, got {value!r}", source=source,
                              key=key)
        sizes[key] = value
    cluster = parse_cluster(data["cluster"], source) if "cluster" in data else None
    return HostConfig(roots["image_roots"], roots["log_roots"], roots["block_device_roots"],
                      state, source, cluster=cluster, **sizes)


def parse_cluster(data: object, source: str) -> ClusterConfig:
    """The ``[cluster]`` table; every error names its key."""
    if not isinstance(data, dict):
        raise ConfigError("expected a table", source=source, key="cluster")
    known = {"etcd", "name", "host", "ttl", "timeout", "ca", "cert", "key", "image_identity",
             "exports", "insecure", "user", "password_file"}
    for key in data:
        if key not in known:
            raise ConfigError("unknown key", source=source, key=f"cluster.{key}",
                              hint=f"known keys: {', '.join(sorted(known))}")
    endpoints = data.get("etcd")
    if (not isinstance(endpoints, list) or not endpoints
            or not all(isinstance(e, str) and re.fullmatch(r"https?://[^/\s]+/?", e)
                       for e in endpoints)):
        raise ConfigError(f"expected a non-empty array of http(s)://HOST:PORT URLs, got "
                          f"{endpoints!r}", source=source, key="cluster.etcd")
    word = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
    out: dict[str, Any] = {"etcd": tuple(e.rstrip("/") for e in endpoints)}
    for key in ("name", "host"):
        if key in data:
            if not isinstance(data[key], str) or not word.fullmatch(data[key]):
                raise ConfigError(f"expected a name of letters, digits, '_', '.', '-', got "
                                  f"{data[key]!r}", source=source, key=f"cluster.{key}")
            out[key] = data[key]
    if "ttl" in data:
        if type(data["ttl"]) is not int or not 2 <= data["ttl"] <= 3600:
            raise ConfigError(f"expected whole seconds from 2 to 3600, got {data['ttl']!r}",
                              source=source, key="cluster.ttl")
        out["ttl"] = data["ttl"]
    if "timeout" in data:
        if type(data["timeout"]) not in (int, float) or not 0 < data["timeout"] <= 60:
            raise ConfigError(f"expected seconds (0-60], got {data['timeout']!r}",
                              source=source, key="cluster.timeout")
        out["timeout"] = float(data["timeout"])
    for key in ("ca", "cert", "key"):
        if key in data:
            out[key] = _abs_path(source, f"cluster.{key}", data[key])
    if ("cert" in out) != ("key" in out):
        raise ConfigError("cert and key go together", source=source, key="cluster.cert")
    out.update(_cluster_images(data, source, word))
    out.update(_cluster_user(data, source, word))
    insecure = data.get("insecure", False)
    if not isinstance(insecure, bool):
        raise ConfigError(f"expected true or false, got {insecure!r}", source=source,
                          key="cluster.insecure")
    out["insecure"] = insecure
    config = ClusterConfig(**out)
    problems = config.transport_problems()
    if problems and not insecure:
        key = "cluster.etcd" if any("https" in p for p in problems) else "cluster.cert"
        raise ConfigError(
            "etcd must be reached over TLS with a client certificate: " + "; ".join(problems),
            source=source, key=key,
            hint="anyone who reaches an unauthenticated etcd can revoke this host's lease "
                 "(fencing every guest) or delete image locks; use https:// members with "
                 "cert and key (and ca), or say insecure = true in [cluster] to accept that")
    return config


def _cluster_images(data: dict[str, Any], source: str, word: re.Pattern[str]) -> dict[str, Any]:
    """``[cluster]``'s ``image_identity`` and ``exports``."""
    identity = data.get("image_identity", "file")
    if identity not in ("file", "export"):
        raise ConfigError(f"expected \"file\" or \"export\", got {identity!r}", source=source,
                          key="cluster.image_identity")
    exports = data.get("exports", {})
    if not isinstance(exports, dict) or not all(
            isinstance(k, str) and word.fullmatch(k) for k in exports):
        raise ConfigError("expected a table of export name = mount point", source=source,
                          key="cluster.exports")
    out = {"image_identity": identity,
           "exports": tuple(sorted((k, _abs_path(source, f"cluster.exports.{k}", v))
                                   for k, v in exports.items()))}
    if identity == "export" and not out["exports"]:
        raise ConfigError("image_identity = \"export\" needs exports", source=source,
                          key="cluster.exports")
    return out


def _cluster_user(data: dict[str, Any], source: str, word: re.Pattern[str]) -> dict[str, Any]:
    """``[cluster]``'s etcd ``user`` and its ``password_file`` (both or neither)."""
    out: dict[str, Any] = {}
    if "user" in data:
        if not isinstance(data["user"], str) or not word.fullmatch(data["user"]):
            raise ConfigError(f"expected an etcd user name, got {data['user']!r}",
                              source=source, key="cluster.user")
        out["user"] = data["user"]
    if "password_file" in data:
        out["password_file"] = _abs_path(source, "cluster.password_file", data["password_file"])
    if ("user" in out) != ("password_file" in out):
        raise ConfigError("user and password_file go together", source=source,
                          key="cluster.user")
    return out


def _abs_path(source: str, key: str, value: object) -> Path:
    if isinstance(value, Path):
        value = str(value)
    if not isinstance(value, str) or not value.startswith("/") or "\0" in value:
        raise ConfigError(f"expected an absolute path, got {value!r}", source=source, key=key)
    return normalise(value)


def normalise(path: str | os.PathLike[str]) -> Path:
    """``path`` in the one spelling every comparison uses: no ``.``, ``..``,
    repeated or trailing slashes (POSIX's ``normpath`` keeps a leading
    ``//``, which would slip past the deny-list as a different path)."""
    text = os.path.normpath(os.fspath(path))
    if text.startswith("//"):
        text = "/" + text.lstrip("/")
    return Path(text)


def _under(path: Path, tree: Path) -> bool:
    return path == tree or tree in path.parents
