"""Attack (b): the guest rewrites the qcow2 header of its own writable disk so
that it names a file it must never read (a root-only canary, another guest's
disk, /etc/shadow, through symlinks it planted, as json: or file: pseudo
protocols...) as its backing file.  The next launch of the same spec must
refuse, or at least not label that file for the guest: the guest's uid must
still be unable to open it, and its owner, mode, ACL and xattrs must not
change, during that launch or after.

QEMU is the hypervisor of a qcow2 spec, so the stand-in cannot be the guest
here: a child that is really the guest's uid (taken from the record) does the
rewrite while the guest holds its labels.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from pathlib import Path

from svirt.errors import SvirtError
from svirt.host import HostInfo
from svirt.launcher.launch import launch
from svirt.launcher.registry import Registry
from svirt.spec import Backing, Disk, GuestSpec

from .helpers import ACL_XATTR, Canaries, Meta, can_open, meta, run_as, set_qcow2_backing

CYCLES = 200


def _variants(canaries: Canaries, image_dir: Path, top: Path, registry: Registry,
              uid: int) -> list[tuple[str, bytes, str | None, Path | None]]:
    """(what, backing name, backing format, the file it really is)."""
    secret = canaries.secret
    rel = os.path.relpath(secret, image_dir).encode()
    link = Path(f"/tmp/svirt-hostile-{uid}-link")
    dirlink = Path(f"/tmp/svirt-hostile-{uid}-dir")
    json_name = json.dumps({"driver": "raw", "file": {"driver": "file",
                                                       "filename": str(secret)}})
    lock = Path(getattr(registry, "state", registry.root)) / "lock"
    return [
        ("root-only canary, raw", bytes(secret), "raw", secret),
        ("root-only canary, qcow2", bytes(secret), "qcow2", secret),
        ("root-only canary, no format", bytes(secret), None, secret),
        ("/etc/shadow, raw", b"/etc/shadow", "raw", Path("/etc/shadow")),
        ("another guest's disk", bytes(canaries.other_disk), "raw", canaries.other_disk),
        ("canary by a relative name", rel, "raw", secret),
        ("file in a root-only directory", bytes(canaries.inner), "raw", canaries.inner),
        ("file with an ACL", bytes(canaries.acl_file), "raw", canaries.acl_file),
        ("json: pseudo-protocol", b"json:" + json_name.encode(), "raw", secret),
        ("file: protocol prefix", b"file:" + bytes(secret), "raw", secret),
        ("symlink the guest planted", bytes(link), "raw", secret),
        ("directory symlink the guest planted", bytes(dirlink / secret.name), "raw", secret),
        ("the registry's lock", bytes(lock), "raw", lock),
        ("its own image (a loop)", bytes(top), "qcow2", None),
        ("the registry directory", bytes(registry.root), "raw", registry.root),
    ]


def _plant_links(secret: Path, uid: int) -> None:
    for path, target in ((Path(f"/tmp/svirt-hostile-{uid}-link"), secret),
                         (Path(f"/tmp/svirt-hostile-{uid}-dir"), secret.parent)):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        path.symlink_to(target)


def _check_unreachable(canaries: Canaries, uid: int, gid: int, shadow: Meta | None,
                       what: str) -> None:
    changes = canaries.changes(trees=False)
    assert not changes, f"{what}: labelled for the guest:\n" + "\n".join(changes)
    for victim in canaries.files:
        assert not can_open(uid, gid, victim), f"{what}: the guest's uid can now read {victim}"
    assert meta(Path("/etc/shadow")) == shadow, f"{what}: /etc/shadow changed"


def _put_back_shadow(shadow: Meta | None) -> None:
    """Should the product ever label /etc/shadow and not restore it: undo it
    (the test has failed already)."""
    if shadow is None or meta(Path("/etc/shadow")) == shadow:
        return
    os.chown("/etc/shadow", shadow.uid, shadow.gid)
    os.chmod("/etc/shadow", shadow.mode)
    if shadow.acl is None:
        with contextlib.suppress(OSError):
            os.removexattr("/etc/shadow", ACL_XATTR)


def test_rewritten_backing_file_is_never_labelled(
    standin: Path, image_dir: Path, hostile_registry: Registry, canaries: Canaries,
    host: HostInfo, guest_uids: set[int],
) -> None:
    base = image_dir / "base.raw"
    base.write_bytes(b"\0" * 65536)
    base.chmod(0o600)  # a legitimate backing file the guest gets an ACL on
    top = image_dir / "top.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(base),
                    str(top), "1M"], check=True)
    top.chmod(0o600)
    spec = GuestSpec(name="backing", backend="qemu", kernel=standin,  # type: ignore[arg-type]
                     accel="tcg", memory=32,  # type: ignore[arg-type]
                     disks=(Disk(top, format="qcow2",  # type: ignore[arg-type]
                                 backing=(Backing(base, "raw"),)),),  # type: ignore[arg-type]
                     shutdown_timeout=0.5)
    shadow = meta(Path("/etc/shadow"))
    canaries.baseline()
    refused: dict[str, int] = {}
    started = time.monotonic()
    pending: str | None = None  # the rewrite the next launch must survive
    variants: list[tuple[str, bytes, str | None, Path | None]] = []
    rewrites = 0
    try:
        while rewrites < CYCLES or pending is not None:
            try:
                with launch(spec, registry=hostile_registry, host=host) as guest:
                    uid, gid = (int(x) for x in guest.labels["dac"].split(":"))
                    guest_uids.add(uid)
                    if not variants:
                        variants = _variants(canaries, image_dir, top, hostile_registry, uid)
                    if pending is not None:
                        # the hostile header was accepted: the file it names must
                        # be as unreachable for the guest as before
                        _check_unreachable(canaries, uid, gid, shadow, pending)
                        key = f"accepted, unlabelled: {pending}"
                        refused[key] = refused.get(key, 0) + 1
                        pending = None
                    if rewrites < CYCLES:
                        # the guest (its real uid) rewrites its own header, running
                        what, name, fmt, _real = variants[rewrites % len(variants)]
                        _plant_links(canaries.secret, uid)
                        err = run_as(uid, gid, set_qcow2_backing, top, name, fmt)
                        assert err == "", f"the guest could not write its own image: {err}"
                        pending = what
                        rewrites += 1
            except SvirtError as err:
                assert pending is not None, f"the legitimate launch failed: {err}"
                refused[pending] = refused.get(pending, 0) + 1
                # put a legitimate header back, as root, for the next cycle
                set_qcow2_backing(top, bytes(base), "raw")
                pending = None
            changes = canaries.changes()
            assert not changes, f"after rewrite {rewrites} ({pending}):\n" + "\n".join(changes)
            assert meta(Path("/etc/shadow")) == shadow
            assert hostile_registry.records() == []
    finally:
        for path in Path("/tmp").glob("svirt-hostile-*"):
            path.unlink()
        _put_back_shadow(shadow)
    assert sum(refused.values()) >= CYCLES, refused
    print(f"backing: {rewrites} hostile relaunches in {time.monotonic() - started:.1f} s: "
          f"{refused}")
