"""The agent client through QEMU 7.2's virtio-serial port to qemu-ga in a TCG guest.

One guest for the module (agent_guest.py): the socket is bound by root in a
root-only directory and handed to QEMU as a listening fd, as the launcher
will; everything the tests see went through QEMU's chardev, the virtio
port and the guest's qemu-ga.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
from collections.abc import Iterator

import pytest

from svirt.agent import exit_status
from svirt.errors import GuestCommandNotExecutable, GuestCommandNotFound

from .agent_guest import AgentGuest, agent_guest
from .host_agent import QEMU_GA

pytestmark = pytest.mark.skipif(
    not os.path.exists(QEMU_GA) or shutil.which("qemu-system-x86_64") is None,
    reason="needs qemu-ga (qemu-guest-agent) and qemu-system-x86_64")


@pytest.fixture(scope="module")
def guest() -> Iterator[AgentGuest]:
    with agent_guest() as booted:
        yield booted


def test_exec_in_the_guest(guest: AgentGuest) -> None:
    result = guest.client.exec(["sh", "-c", "printf out; printf err >&2; cat; exit 7"],
                               input=b"in\x00\xff")
    assert (result.returncode, result.stdout, result.stderr) == (7, b"outin\x00\xff", b"err")
    assert exit_status(result) == 7
    assert guest.client.exec(["id", "-u"]).stdout == b"0\n"  # qemu-ga is the guest's root


def test_not_found_and_cannot_run(guest: AgentGuest) -> None:
    with pytest.raises(GuestCommandNotFound) as missing:
        guest.client.exec(["no-such-command"])
    assert exit_status(missing.value) == 127
    with pytest.raises(GuestCommandNotExecutable) as cannot:
        guest.client.exec(["/dev"])
    assert exit_status(cannot.value) == 126


def test_copy_both_ways(guest: AgentGuest) -> None:
    data = os.urandom((1 << 20) + 777)
    assert guest.client.copy_to_guest(io.BytesIO(data), "/tmp/blob") == len(data)
    digest = guest.client.exec(["sha256sum", "/tmp/blob"]).stdout.split()[0]
    assert digest == hashlib.sha256(data).hexdigest().encode()
    out = io.BytesIO()
    assert guest.client.copy_from_guest("/tmp/blob", out) == len(data)
    assert out.getvalue() == data
