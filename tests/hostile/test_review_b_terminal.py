"""Review findings (review-b): guest bytes that still reach the admin's terminal.

The stand-in refuses every mconsole command with a reason made of terminal
orders (OSC 52 clipboard, a cursor-position query, a title, a bidi override,
a raw C1 byte).  The shutdown ladder keeps why each step was passed over in
the outcome's detail, and the outcome is printed as it is by ``svirt run``,
``svirt stop`` (through the supervisor's answer) and kept in ``status``: it
must hold no control character.
"""

from __future__ import annotations

from pathlib import Path

from svirt.host import HostInfo
from svirt.launcher.launch import launch
from svirt.launcher.state import Registry

from .helpers import build_spec, read_info, spec_dict

CONTROLS = [chr(c) for c in (*range(0x20), 0x7F, *range(0x80, 0xA0))] + ["\u202e"]


def test_review_b_refusal_reason_in_outcome_is_escaped(
    standin: Path, hostile_registry: Registry, host: HostInfo, guest_uids: set[int],
) -> None:
    spec = spec_dict(standin, "errtext", "errtext", shutdown_timeout=0.5)
    with launch(build_spec(spec), registry=hostile_registry, host=host) as guest:
        guest_uids.add(read_info(guest)["uid"])
        outcome = guest.stop()
    text = str(outcome)
    assert "mconsole cad" in text, text  # the refusal is kept, as data
    found = sorted({repr(c) for c in CONTROLS if c in text})
    assert not found, f"the outcome carries the guest's control characters {found}: {text!r}"
