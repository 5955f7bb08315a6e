"""A guest's cloud-init NoCloud seed: an ISO 9660 image with volume id ``cidata``.

cloud-init's NoCloud source finds a filesystem labelled ``cidata`` and reads
``user-data``, ``meta-data`` and (optionally) ``network-config`` from its top
directory.  svirt builds that image per guest with pycdlib (ISO 9660 level 3
with Rock Ridge and Joliet, as ``genisoimage -V cidata -J -r`` makes it),
in memory, and writes it by fd into a directory the launcher owns
(``O_CREAT | O_EXCL | O_NOFOLLOW``, mode 0400): the launcher then labels it
for that guest alone, and it goes with the run directory at release.

What goes in, and the choices made:

- **meta-data** is generated, never templated: ``instance-id`` (the guest's
  uuid unless given) and ``local-hostname`` (the guest's name unless given),
  plus any extra keys, written as JSON (JSON is YAML, and cloud-init reads
  meta-data with a YAML loader): no value can add a key or a line.  A
  hostname must be an RFC 1123 name and an instance id a short token; keys
  are lower-case words.  Anything else is refused (:class:`SeedRefused`).
- **user-data** (inline text or a file) is passed on byte for byte.  The
  ``ssh_authorized_keys`` shortcut never edits it (svirt has no YAML
  parser to merge with, and a second ``ssh_authorized_keys:`` appended to
  a cloud-config would silently replace the user's): with keys, the
  user-data becomes a MIME multi-part message of the user's part (its type
  from its first line, as cloud-init's own ``make-mime`` names them) and a
  generated ``#cloud-config`` part carrying ``merge_how`` with
  ``list(append)``, so the keys are added to any the user listed.  This
  works for a ``#cloud-config``, a ``#!`` script, a boothook or an include
  file alike; user-data that is already MIME, gzip or anything else with
  the shortcut is refused (say the keys in the user-data instead).  Without
  user-data, the keys alone make a ``#cloud-config``.
- **files** (``user_data_file``, ``network_config_file``) are read by root
  and end up readable by the guest, so they are reached like disks: from an
  image root, no symlink, no mount crossing, one link, never under /etc
  (a spec naming /etc/shadow must not hand it to the guest).
- **network-config** is passed on as given (cloud-init's v1 or v2 YAML).
- **Bound**: everything that goes into the seed, together, is at most
  :data:`SEED_MAX_BYTES` (1 MiB, far beyond any real cloud-config, and an
  ISO that costs the launcher little memory to build); a file is read
  through an fd that was checked to be a regular file, never more than the
  bound plus one byte.
"""

from __future__ import annotations

import io
import json
import os
import re
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from pathlib import Path

import pycdlib

from svirt.errors import RelabelRefused, SvirtError
from svirt.resources import Access, Resource, ResourceKind
from svirt.security.files import open_object
from svirt.security.inodes import proc_fd

#: every byte that goes into one seed, user-data, meta-data and network-config together
SEED_MAX_BYTES = 1024 * 1024
VOLUME_ID = "cidata"
SEED_NAME = "seed.iso"
#: one RFC 1123 label; a hostname is labels joined by dots, at most 253 bytes
_LABEL = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_INSTANCE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
_META_KEY = re.compile(r"[a-z][a-z0-9_-]{0,63}")
#: an OpenSSH public key line: type, base64, optional comment; no control characters
_SSH_KEY = re.compile(r"[a-z0-9@.-]{3,64} [A-Za-z0-9+/=]{16,16384}( [\x20-\x7e]{0,1024})?")
#: cloud-init's part types by the user-data's first line (cloudinit/handlers)
_STARTS = (
    ("#cloud-config", "cloud-config"),
    ("#!", "x-shellscript"),
    ("#cloud-boothook", "cloud-boothook"),
    ("#include", "x-include-url"),
    ("#part-handler", "part-handler"),
    ("## template: jinja", "jinja2"),
)
#: how the shortcut's part is merged into what came before (cloud-init merging)
MERGE_HOW = "dict(recurse_array,no_replace)+list(append)"


class SeedRefused(SvirtError):
    """A cloud-init seed cannot be built from what was given (the key says what)."""

    def __init__(self, message: str, *, key: str, hint: str | None = None) -> None:
        super().__init__(f"cloud_init.{key}: {message}", hint=hint)
        self.key = key


@dataclass(frozen=True)
class CloudInit:
    """What the spec's ``[cloud_init]`` says (``*_file``: read by the launcher)."""

    user_data: str | None = None
    user_data_file: Path | None = None
    meta_data: Mapping[str, str | int | bool] = field(default_factory=dict)
    network_config: str | None = None
    network_config_file: Path | None = None
    ssh_authorized_keys: tuple[str, ...] = ()


def seed_files(ci: CloudInit, *, uuid: str, name: str,
               roots: Sequence[Path] | None = None) -> dict[str, bytes]:
    """The seed's files (``user-data``, ``meta-data``, ``network-config``)
    for a guest called ``name`` with ``uuid`` (``*_file`` inputs are read
    from under the image ``roots``, the host's when None); SeedRefused when
    a value is not allowed or the whole is over :data:`SEED_MAX_BYTES`."""
    budget = [SEED_MAX_BYTES]
    meta = _spend(budget, "meta_data", meta_data(ci.meta_data, uuid=uuid, name=name))
    user = _text_or_file(ci.user_data, ci.user_data_file, "user_data", budget, roots)
    if ci.ssh_authorized_keys:
        user = _spend(budget, "ssh_authorized_keys",
                      with_ssh_keys(user, ci.ssh_authorized_keys), already=len(user or b""))
    files = {"meta-data": meta, "user-data": user if user is not None else b""}
    net = _text_or_file(ci.network_config, ci.network_config_file, "network_config", budget,
                        roots)
    if net is not None:
        files["network-config"] = net
    return files


def meta_data(extra: Mapping[str, str | int | bool], *, uuid: str, name: str) -> bytes:
    """NoCloud meta-data as JSON: one line, no value can become a key."""
    data: dict[str, str | int | bool] = {"instance-id": uuid, "local-hostname": name}
    for key, value in extra.items():
        if not _META_KEY.fullmatch(key):
            raise SeedRefused(f"key {key!r} is not a lower-case word", key="meta_data")
        if not isinstance(value, str | int | bool):
            raise SeedRefused(f"{key} must be a string, integer or boolean", key="meta_data")
        data[key] = value
    hostname = data["local-hostname"]
    if not isinstance(hostname, str) or not _hostname_ok(hostname):
        raise SeedRefused(f"local-hostname {hostname!r} is not a host name (RFC 1123 labels "
                          "of letters, digits and '-', joined by dots)", key="meta_data")
    instance = data["instance-id"]
    if not isinstance(instance, str) or not _INSTANCE_ID.fullmatch(instance):
        raise SeedRefused(f"instance-id {instance!r} is not a token (letters, digits, "
                          "'.', '_', ':', '-'; at most 128)", key="meta_data")
    for key, value in data.items():
        if isinstance(value, str) and not value.isprintable():
            raise SeedRefused(f"{key} holds a control character", key="meta_data")
    return (json.dumps(data, ensure_ascii=True, sort_keys=True) + "\n").encode()


def _hostname_ok(name: str) -> bool:
    return (0 < len(name) <= 253 and name.isascii()
            and all(_LABEL.fullmatch(label) for label in name.split(".")))


def with_ssh_keys(user: bytes | None, keys: tuple[str, ...]) -> bytes:
    """``user`` with the ``ssh_authorized_keys`` shortcut added (see the
    module docstring: a MIME multi-part, the user's part unchanged)."""
    for key in keys:
        if not _SSH_KEY.fullmatch(key):
            raise SeedRefused(f"{key[:60]!r} is not one OpenSSH public key line",
                              key="ssh_authorized_keys")
    ours = "#cloud-config\n" + json.dumps({"ssh_authorized_keys": list(keys),
                                           "merge_how": MERGE_HOW}, ensure_ascii=True) + "\n"
    if user is None:
        return ours.encode()
    try:
        text = user.decode("utf-8")
    except UnicodeDecodeError:
        raise SeedRefused("user-data is not UTF-8 text (gzip?); with ssh_authorized_keys it "
                          "must be", key="user_data",
                          hint="list the keys in the user-data itself") from None
    subtype = next((t for start, t in _STARTS if text.startswith(start)), None)
    if subtype is None:
        raise SeedRefused("user-data does not start with a line cloud-init names a part "
                          "type by (#cloud-config, #!, ...); svirt cannot add "
                          "ssh_authorized_keys to it", key="user_data",
                          hint="list the keys in the user-data itself")
    message = MIMEMultipart()
    for body, kind, filename in ((text, subtype, "user-data"),
                                 (ours, "cloud-config", "svirt-ssh-keys")):
        part = MIMEText(body, kind, "utf-8")
        part.add_header("Content-Disposition", "attachment", filename=filename)
        message.attach(part)
    return message.as_bytes()


def _spend(budget: list[int], key: str, data: bytes, *, already: int = 0) -> bytes:
    budget[0] -= len(data) - already
    if budget[0] < 0:
        raise _too_big(key)
    return data


def _too_big(key: str, what: str = "the seed") -> SeedRefused:
    return SeedRefused(f"{what} would exceed {SEED_MAX_BYTES} bytes", key=key,
                       hint="cloud-init seeds are small; fetch large content from the guest")


def _text_or_file(text: str | None, path: Path | None, key: str, budget: list[int],
                  roots: Sequence[Path] | None) -> bytes | None:
    if text is not None and path is not None:
        raise SeedRefused("give the text or a file, not both", key=key)
    if text is not None:
        if len(text) > budget[0]:  # before encoding a huge string
            raise _too_big(key)
        return _spend(budget, key, text.encode("utf-8"))
    if path is None:
        return None
    return _spend(budget, key, read_bounded(path, budget[0], key, roots))


def read_bounded(path: Path, limit: int, key: str,
                 roots: Sequence[Path] | None = None) -> bytes:
    """At most ``limit`` bytes of regular file ``path``, reached like every
    object from an image root (``roots``; the host's when None: no symlink,
    no mount crossing, one link, nothing deny-listed such as /etc/shadow,
    whose bytes would otherwise end up in the guest's seed), and checked
    through its ``O_PATH`` fd before it is opened for reading: never a FIFO
    or a device.  SeedRefused when it is longer or refused."""
    try:
        obj = open_object(Path(path), roots=tuple(roots) if roots is not None else None)
    except RelabelRefused as err:
        raise SeedRefused(err.message, key=key, hint=err.hint) from None
    try:
        if not stat.S_ISREG(obj.st_mode):
            raise SeedRefused(f"{path} is not a regular file", key=key)
        fd = os.open(proc_fd(obj.fd), os.O_RDONLY | os.O_CLOEXEC)
    finally:
        obj.close()
    with os.fdopen(fd, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise _too_big(key, str(path))
    return data


def build_iso(files: Mapping[str, bytes]) -> bytes:
    """The ``cidata`` ISO holding ``files`` (names of letters, digits and
    '-'), in memory."""
    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=3, joliet=3, rock_ridge="1.09", vol_ident=VOLUME_ID)
    try:
        for name, data in sorted(files.items()):
            if not re.fullmatch(r"[a-z][a-z0-9-]{0,29}", name):
                raise SeedRefused(f"file name {name!r}", key="files")
            iso9660 = "/" + name.upper().replace("-", "_") + ".;1"
            iso.add_fp(io.BytesIO(data), len(data), iso9660, rr_name=name,
                       joliet_path="/" + name)
        out = io.BytesIO()
        iso.write_fp(out)
        return out.getvalue()
    finally:
        iso.close()


@dataclass(frozen=True)
class Seed:
    """A written seed: its path (what gets labelled) and its size."""

    path: Path
    size: int

    def resource(self) -> Resource:
        """Read-only, for this guest alone (``Access.PRIVATE_RO``: not RO,
        which is content every guest may read): a root-owned 0400 file in the
        run directory, reached like an ephemeral layer.  The launch holds the
        same resource from ``QemuBackend.resources``."""
        return Resource(self.path, Access.PRIVATE_RO, ResourceKind.SEED)


def write_seed(dirfd: int, directory: Path, data: bytes, name: str = SEED_NAME) -> Seed:
    """Write ``data`` as ``name`` below the launcher's directory ``dirfd``:
    created ``O_EXCL | O_NOFOLLOW`` with mode 0400 (a name already there,
    whatever it is, is refused, never followed or reused)."""
    if not name or "/" in name or name in (".", ".."):
        raise SeedRefused(f"not a plain file name: {name!r}", key="seed")
    try:
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o400, dir_fd=dirfd)
    except FileExistsError:
        raise SeedRefused(f"{directory / name} already exists", key="seed") from None
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fchmod(fd, 0o400)  # whatever the umask
        os.fsync(fd)
    except BaseException:
        try:
            if os.path.samestat(os.stat(name, dir_fd=dirfd, follow_symlinks=False),
                                os.fstat(fd)):
                os.unlink(name, dir_fd=dirfd)
        finally:
            os.close(fd)
        raise
    os.close(fd)
    return Seed(directory / name, len(data))


def make_seed(ci: CloudInit, *, uuid: str, name: str, dirfd: int, directory: Path,
              roots: Sequence[Path] | None = None) -> Seed:
    """Build and write one guest's seed (see :func:`seed_files`, :func:`write_seed`)."""
    files = seed_files(ci, uuid=uuid, name=name, roots=roots)
    return write_seed(dirfd, directory, build_iso(files))
