"""Helpers for the hostile-hypervisor tests: canaries, specs, processes."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import inspect
import json
import os
import signal
import socket
import stat
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from svirt.launcher.registry import Registry
from tests.hostile.standin_spec import HOSTILE_LINE as HOSTILE_LINE
from tests.hostile.standin_spec import STANDIN as STANDIN
from tests.hostile.standin_spec import build_spec as build_spec
from tests.hostile.standin_spec import install_standin as install_standin
from tests.hostile.standin_spec import read_info as read_info
from tests.hostile.standin_spec import spec_dict as spec_dict
from tests.integration.helpers import pids_of_uid as pids_of_uid

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
PYTHON = sys.executable
SVIRT = str(Path(PYTHON).with_name("svirt"))
ACL_XATTR = "system.posix_acl_access"
UID_BASE = 1_600_000  # these tests' guests: 1600000+slot (SVIRT_UID_BASE)
OTHER_UID = 1_500_000 + 65_000  # "another guest": a DAC uid no test guest gets
HAS_STATE_DIR = "state" in inspect.signature(Registry.__init__).parameters


def make_registry(run_root: Path, state_dir: Path) -> Registry:
    if HAS_STATE_DIR:
        return Registry(run_root, state=state_dir)  # type: ignore[call-arg,unused-ignore]
    return Registry(run_root)


# ----------------------------------------------------------------- snapshots
@dataclass(frozen=True)
class Meta:
    kind: str
    uid: int
    gid: int
    mode: int
    acl: str | None
    xattrs: tuple[tuple[str, str], ...]
    content: str  # sha256 of a regular file, the target of a symlink, the entries of a dir


def meta(path: Path) -> Meta | None:
    """Owner, mode, ACL, every xattr and content of ``path`` (never followed)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    xattrs: list[tuple[str, str]] = []
    acl: str | None = None
    if not stat.S_ISLNK(st.st_mode):
        for name in sorted(os.listxattr(path, follow_symlinks=False)):
            with contextlib.suppress(OSError):
                value = os.getxattr(path, name, follow_symlinks=False).hex()
                xattrs.append((name, value))
                if name == ACL_XATTR:
                    acl = value
    if stat.S_ISREG(st.st_mode):
        with open(path, "rb") as f:
            content = hashlib.sha256(f.read(1 << 20)).hexdigest()
    elif stat.S_ISLNK(st.st_mode):
        content = os.readlink(path)
    elif stat.S_ISDIR(st.st_mode):
        content = ",".join(sorted(os.listdir(path)))
    else:
        content = ""
    kind = stat.filemode(st.st_mode)[0]
    return Meta(kind, st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode), acl, tuple(xattrs),
                content)


def snapshot_paths(paths: list[Path], content: bool = True) -> dict[str, Meta | None]:
    """``content=False``: owner, mode, ACL and xattrs only (a guest's disk and
    console log legitimately change their content)."""
    out = {str(p): meta(p) for p in paths}
    if not content:
        out = {k: dataclasses.replace(v, content="") if v else v for k, v in out.items()}
    return out


def snapshot_tree(root: Path) -> dict[str, Meta | None]:
    """Every entry below ``root`` (symlinks not followed)."""
    out: dict[str, Meta | None] = {str(root): meta(root)}
    for base, dirs, files in os.walk(root):
        for name in dirs + files:
            out[os.path.join(base, name)] = meta(Path(base) / name)
    return out


def diff(before: dict[str, Meta | None], after: dict[str, Meta | None]) -> list[str]:
    out = []
    for path in sorted(set(before) | set(after)):
        b, a = before.get(path), after.get(path)
        if b != a:
            out.append(f"{path}: {b} -> {a}")
    return out


# ------------------------------------------------------------------ canaries
class VictimSocket:
    """Another guest's mconsole: a datagram socket nobody but that guest may
    make root talk to.  Counts what arrives."""

    def __init__(self, path: Path, uid: int) -> None:
        self.path = path
        self.received: list[bytes] = []
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        os.chown(path, uid, uid)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                data = self.sock.recv(65536)
            except OSError:
                return
            self.received.append(data)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


class Canaries:
    """Files no guest may ever gain, and the registry's own trees.

    ``check()`` compares them with the baseline: owner, mode, ACL, every
    xattr and content (entries, for directories)."""

    def __init__(self, base: Path, trees: list[Path]) -> None:
        self.base = base
        self.trees = trees
        base.chmod(0o755)
        self.secret = self._file("secret", 0, 0o600, b"root only\n", {"user.canary": b"s"})
        self.acl_file = self._file("acl-file", 0, 0o640, b"root with an ACL\n",
                                   {"user.note": b"keep"})
        set_acl(self.acl_file, user_obj=6, users={4242: 4}, group_obj=4, other=0)
        self.other_file = self._file("other-file", OTHER_UID, 0o600, b"another guest's\n")
        other = base / "other-guest"
        other.mkdir(mode=0o700)
        os.chown(other, OTHER_UID, OTHER_UID)
        self.other_dir = other
        self.other_disk = self._file("other-guest/disk.img", OTHER_UID, 0o600, b"\0" * 4096)
        umid = other / "victim"
        umid.mkdir(mode=0o700)
        os.chown(umid, OTHER_UID, OTHER_UID)
        self.victim_dir = umid
        (umid / "pid").write_text("1\n")
        os.chown(umid / "pid", OTHER_UID, OTHER_UID)
        self.victim = VictimSocket(umid / "mconsole", OTHER_UID)
        root_dir = base / "root-dir"
        root_dir.mkdir(mode=0o700)
        self.root_dir = root_dir
        self.inner = self._file("root-dir/inner", 0, 0o600, b"deep\n")
        self.targets = base / "targets.json"
        self.files = [self.secret, self.acl_file, self.other_file, self.other_disk, self.inner]
        self.dirs = [self.victim_dir, self.other_dir, self.root_dir, base]
        self._baseline: dict[str, Meta | None] = {}

    def _file(self, rel: str, uid: int, mode: int, data: bytes,
              xattrs: dict[str, bytes] | None = None) -> Path:
        path = self.base / rel
        path.write_bytes(data)
        os.chown(path, uid, uid)
        path.chmod(mode)
        for k, v in (xattrs or {}).items():
            os.setxattr(path, k, v)
        return path

    def write_targets(self, extra_files: list[Path] = (), extra_dirs: list[Path] = ()) -> None:  # type: ignore[assignment]
        data = {"files": [str(p) for p in [*self.files, *extra_files]],
                "dirs": [str(p) for p in [*self.dirs, *extra_dirs]]}
        self.targets.write_text(json.dumps(data))
        self.targets.chmod(0o644)

    def snapshot(self, trees: bool = True) -> dict[str, Meta | None]:
        snap = snapshot_tree(self.base)
        for tree in self.trees if trees else ():
            snap.update(snapshot_tree(tree))
        return snap

    def baseline(self) -> None:
        self._baseline = self.snapshot()

    def changes(self, trees: bool = True) -> list[str]:
        """What differs from the baseline (``trees=False``: leave out the
        registry's trees, which a running guest legitimately changes)."""
        base = self._baseline if trees else {
            k: v for k, v in self._baseline.items() if k.startswith(str(self.base))}
        out = diff(base, self.snapshot(trees))
        if self.victim.received:
            out.append(f"{self.victim.path}: root sent another guest's mconsole "
                       f"{len(self.victim.received)} datagram(s), first "
                       f"{self.victim.received[0][:40]!r}")
        return out

    def close(self) -> None:
        self.victim.close()


def set_acl(path: Path, *, user_obj: int, users: dict[int, int], group_obj: int,
            other: int) -> None:
    """Write a POSIX access ACL (the kernel's xattr format, no setfacl needed)."""
    undefined = 0xFFFFFFFF
    entries = [(0x01, user_obj, undefined)]
    entries += [(0x02, perm, uid) for uid, perm in sorted(users.items())]
    entries.append((0x04, group_obj, undefined))
    if users:
        mask = group_obj
        for perm in users.values():
            mask |= perm
        entries.append((0x10, mask, undefined))
    entries.append((0x20, other, undefined))
    raw = struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)
    os.setxattr(path, ACL_XATTR, raw)


# ----------------------------------------------------------------- processes
# pids_of_uid: tests/integration/helpers.py


def kill_uid(uid: int) -> list[int]:
    """SIGKILL every process of ``uid`` (test cleanup; the product failed)."""
    killed = []
    for _ in range(20):
        pids = pids_of_uid(uid)
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
        time.sleep(0.02)
    return killed


def svirt_gc(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([SVIRT, "gc"], capture_output=True, text=True, timeout=60,
                          env=env, check=False)


def record_uids(registry: Registry) -> set[int]:
    """The DAC uids of every record the registry still has."""
    uids = set()
    for r in registry.records():
        dac = r.labels.get("dac")
        if dac is not None:
            uids.add(int(dac.process.split(":")[0]))
    return uids


def wait_for(predicate: Any, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return bool(predicate())


# --------------------------------------------------------------------- qcow2
BACKING_FORMAT_EXT = 0xE2792ACA


def set_qcow2_backing(path: Path, name: bytes | None, fmt: str | None) -> None:
    """Rewrite the backing file name and format of a qcow2 image in place,
    header bytes only (what a guest with write access to its image can do)."""
    with open(path, "r+b") as f:
        head = bytearray(f.read(65536))
        magic, version = struct.unpack_from(">4sI", head, 0)
        assert magic == b"QFI\xfb", f"{path} is not qcow2"
        cluster = 1 << struct.unpack_from(">I", head, 20)[0]
        header_length = struct.unpack_from(">I", head, 100)[0] if version >= 3 else 72
        off = (header_length + 7) & ~7
        exts = []
        while off + 8 <= len(head):
            typ, length = struct.unpack_from(">II", head, off)
            if typ == 0:
                break
            exts.append((typ, bytes(head[off + 8:off + 8 + length])))
            off += 8 + ((length + 7) & ~7)
        exts = [(t, d) for t, d in exts if t != BACKING_FORMAT_EXT]
        if fmt is not None:
            exts.insert(0, (BACKING_FORMAT_EXT, fmt.encode()))
        out = bytearray(head[:header_length])
        out += b"\0" * ((-len(out)) % 8)
        for typ, data in exts:
            out += struct.pack(">II", typ, len(data)) + data + b"\0" * ((-len(data)) % 8)
        out += b"\0" * 8
        if name:
            struct.pack_into(">QI", out, 8, len(out), len(name))
            out += name
        else:
            struct.pack_into(">QI", out, 8, 0, 0)
        assert len(out) <= min(cluster, 65536), "backing name too long for the header"
        f.seek(0)
        f.write(out + b"\0" * (min(cluster, 65536) - len(out)))


def run_as(uid: int, gid: int, fn: Any, *args: Any) -> str:
    """Run ``fn(*args)`` in a child that is really ``uid``/``gid`` (no groups,
    no capabilities left); returns "" on success, else the error text."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            os.close(r)
            os.setgroups([])
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
            try:
                fn(*args)
                msg = b"ok"
            except BaseException as err:  # noqa: BLE001 - reported to the parent
                msg = f"{type(err).__name__}: {err}".encode()[:1000] or b"error"
            os.write(w, msg)
        finally:
            os._exit(0)
    os.close(w)
    chunks = []
    while chunk := os.read(r, 4096):
        chunks.append(chunk)
    os.close(r)
    os.waitpid(pid, 0)
    text = b"".join(chunks).decode(errors="replace")
    return "" if text == "ok" else text or "the child died"


def can_open(uid: int, gid: int, path: Path) -> bool:
    """Can ``uid`` read ``path``, by the kernel's own check?"""
    def probe() -> None:
        os.close(os.open(path, os.O_RDONLY))

    return run_as(uid, gid, probe) == ""
