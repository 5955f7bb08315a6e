"""cloud-init NoCloud seeds: built with pycdlib, read back with pycdlib, the
host's isoinfo/bsdtar and blkid, and parsed with PyYAML (cloud-init's loader)."""

from __future__ import annotations

import email
import io
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pycdlib
import pytest
import yaml

from svirt.images.seed import (
    MERGE_HOW,
    SEED_MAX_BYTES,
    CloudInit,
    SeedRefused,
    build_iso,
    make_seed,
    seed_files,
)
from svirt.resources import Access, ResourceKind

UUID = "1b4e28ba-2fa1-11d2-883f-0016d3cca427"
KEY = ("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl "
       "me@host")
USER = "#cloud-config\nruncmd:\n  - [sh, -c, 'echo hello > /run/svirt-hello']\n"
NET = "version: 2\nethernets:\n  eth0:\n    dhcp4: true\n"


@pytest.fixture
def run_dir(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    run = tmp_path.resolve() / "run"
    run.mkdir(mode=0o700)
    fd = os.open(run, os.O_RDONLY | os.O_DIRECTORY)
    yield fd, run
    os.close(fd)


def read_back(iso: bytes) -> tuple[str, dict[str, bytes], dict[str, bytes]]:
    """(volume id, files by Rock Ridge name, files by Joliet name) as pycdlib reads them."""
    cd = pycdlib.PyCdlib()
    cd.open_fp(io.BytesIO(iso))
    try:
        vol = cd.pvd.volume_identifier.decode().strip()
        rr: dict[str, bytes] = {}
        joliet: dict[str, bytes] = {}
        for child in cd.list_children(rr_path="/"):
            if child.is_dot() or child.is_dotdot():
                continue
            name = child.rock_ridge.name().decode()
            out = io.BytesIO()
            cd.get_file_from_iso_fp(out, rr_path="/" + name)
            rr[name] = out.getvalue()
            out = io.BytesIO()
            cd.get_file_from_iso_fp(out, joliet_path="/" + name)
            joliet[name] = out.getvalue()
        return vol, rr, joliet
    finally:
        cd.close()


def test_seed_files_plain() -> None:
    files = seed_files(CloudInit(user_data=USER, network_config=NET), uuid=UUID, name="web1")
    assert files["user-data"] == USER.encode()  # byte for byte
    assert files["network-config"] == NET.encode()
    assert yaml.safe_load(files["meta-data"]) == {"instance-id": UUID, "local-hostname": "web1"}
    extra = seed_files(CloudInit(meta_data={"local-hostname": "db.example.org",
                                            "instance-id": "i-42", "public-keys": "x"}),
                       uuid=UUID, name="web1")
    assert yaml.safe_load(extra["meta-data"]) == {"instance-id": "i-42", "public-keys": "x",
                                                  "local-hostname": "db.example.org"}
    assert "network-config" not in extra and extra["user-data"] == b""


def _parts(user_data: bytes) -> list[tuple[str, bytes]]:
    msg = email.message_from_bytes(user_data)
    assert msg.is_multipart()
    out = []
    for part in msg.walk():
        if part.is_multipart():
            continue
        payload = part.get_payload(decode=True)
        assert isinstance(payload, bytes)
        out.append((part.get_content_type(), payload))
    return out


def test_ssh_keys_shortcut_adds_a_part() -> None:
    files = seed_files(CloudInit(user_data=USER, ssh_authorized_keys=(KEY,)),
                       uuid=UUID, name="web1")
    (kind1, user), (kind2, ours) = _parts(files["user-data"])
    assert (kind1, user) == ("text/cloud-config", USER.encode())  # the user's, unchanged
    assert kind2 == "text/cloud-config" and ours.startswith(b"#cloud-config\n")
    assert yaml.safe_load(ours) == {"ssh_authorized_keys": [KEY], "merge_how": MERGE_HOW}
    script = seed_files(CloudInit(user_data="#!/bin/sh\necho hi\n", ssh_authorized_keys=(KEY,)),
                        uuid=UUID, name="web1")
    assert [k for k, _ in _parts(script["user-data"])] == ["text/x-shellscript",
                                                         "text/cloud-config"]
    alone = seed_files(CloudInit(ssh_authorized_keys=(KEY,)), uuid=UUID, name="web1")
    assert alone["user-data"].startswith(b"#cloud-config\n")
    assert yaml.safe_load(alone["user-data"])["ssh_authorized_keys"] == [KEY]


def test_ssh_keys_shortcut_refusals() -> None:
    with pytest.raises(SeedRefused, match="does not start with a line"):
        seed_files(CloudInit(user_data="just text\n", ssh_authorized_keys=(KEY,)),
                   uuid=UUID, name="a")
    with pytest.raises(SeedRefused, match="not one OpenSSH public key line"):
        seed_files(CloudInit(ssh_authorized_keys=(KEY + "\nruncmd: [reboot]",)),
                   uuid=UUID, name="a")


def test_user_data_from_a_file(tmp_path: Path) -> None:
    f = tmp_path / "user-data"
    f.write_text(USER)
    files = seed_files(CloudInit(user_data_file=f), uuid=UUID, name="a", roots=[tmp_path])
    assert files["user-data"] == USER.encode()
    with pytest.raises(SeedRefused, match="not both"):
        seed_files(CloudInit(user_data=USER, user_data_file=f), uuid=UUID, name="a",
                   roots=[tmp_path])
    with pytest.raises(SeedRefused, match="outside"):
        seed_files(CloudInit(user_data_file=f), uuid=UUID, name="a", roots=[tmp_path / "x"])


def test_iso_reads_back_with_pycdlib_and_the_host(run_dir: tuple[int, Path]) -> None:
    dirfd, run = run_dir
    ci = CloudInit(user_data=USER, network_config=NET, ssh_authorized_keys=(KEY,))
    seed = make_seed(ci, uuid=UUID, name="web1", dirfd=dirfd, directory=run)
    st = os.stat(seed.path)
    assert st.st_mode & 0o777 == 0o400 and st.st_size == seed.size
    res = seed.resource()
    assert (res.path, res.access, res.kind) == (run / "seed.iso", Access.PRIVATE_RO,
                                                ResourceKind.SEED)
    want = seed_files(ci, uuid=UUID, name="web1")
    vol, rr, joliet = read_back(seed.path.read_bytes())
    assert vol == "cidata"
    assert set(rr) == {"user-data", "meta-data", "network-config"}
    assert yaml.safe_load(rr["meta-data"]) == {"instance-id": UUID, "local-hostname": "web1"}
    assert rr["network-config"] == NET.encode() and joliet == rr
    assert _parts(rr["user-data"])[0][1] == USER.encode()
    if shutil.which("blkid"):  # what cloud-init's ds-identify looks for
        out = subprocess.run(["blkid", "-o", "export", str(seed.path)], capture_output=True,
                             text=True, check=True).stdout
        assert "LABEL=cidata" in out.splitlines() and "TYPE=iso9660" in out.splitlines()
    if shutil.which("isoinfo"):
        info = subprocess.run(["isoinfo", "-d", "-i", str(seed.path)], capture_output=True,
                              text=True, check=True).stdout
        assert "Volume id: cidata" in info and "Rock Ridge signatures" in info
        assert "Joliet" in info
        meta = subprocess.run(["isoinfo", "-R", "-x", "/meta-data", "-i", str(seed.path)],
                              capture_output=True, check=True).stdout
        assert meta == want["meta-data"]
    if shutil.which("bsdtar"):
        net = subprocess.run(["bsdtar", "-xOf", str(seed.path), "network-config"],
                             capture_output=True, check=True).stdout
        assert net == NET.encode()


def test_seed_bound_and_plain_refusals(tmp_path: Path) -> None:
    big = "#cloud-config\n" + "#" * SEED_MAX_BYTES
    with pytest.raises(SeedRefused, match="exceed"):
        seed_files(CloudInit(user_data=big), uuid=UUID, name="a")
    just = "x" * (SEED_MAX_BYTES - 200)  # meta-data takes the rest of the budget
    seed_files(CloudInit(user_data=just), uuid=UUID, name="a")
    with pytest.raises(SeedRefused, match="exceed"):
        seed_files(CloudInit(user_data=just, network_config="y" * 400), uuid=UUID, name="a")
    with pytest.raises(SeedRefused, match="not a regular file"):
        seed_files(CloudInit(user_data_file=tmp_path), uuid=UUID, name="a", roots=[tmp_path])
    with pytest.raises(SeedRefused, match="key"):
        seed_files(CloudInit(meta_data={"Bad Key": "x"}), uuid=UUID, name="a")


def test_build_iso_refuses_odd_names() -> None:
    with pytest.raises(SeedRefused):
        build_iso({"../etc": b""})
