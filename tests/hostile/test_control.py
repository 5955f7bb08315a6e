"""Attack (c): the guest answers mconsole with garbage: random bytes, runts,
lengths far beyond the datagram, errors with undecodable text, request-shaped
packets, an endless stream of ``more`` fragments, replies from another socket,
oversized datagrams, silence, and a valid OK from a guest that then ignores
SIGTERM.  Every stop must end within the shutdown ladder's own timeouts, and
nothing outside the guest may change (canaries, registry, the launcher's fds).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from svirt.backends import uml
from svirt.host import HostInfo
from svirt.launcher.registry import Registry

from .cycles import Tally, check_after_cycle, run_cycle
from .helpers import Canaries, spec_dict

SLOW = {10, 11}  # silence, deaf to SIGTERM: they cost the ladder's timeouts
GRACEFUL = 0.5
# the launcher's per-command timeout, shortened here: a real UML kernel answers
# within microseconds, and 200 cycles of a silent guest at 2 s would not fit
MCONSOLE_TIMEOUT = 0.25
# cad and halt may each time out, then SIGTERM gets its 5 s: that is the ladder
STOP_LIMIT = GRACEFUL + 2 * MCONSOLE_TIMEOUT + 5.0 + 5.0 + 4.0
CYCLES = {"stop": 170, "crash": 24, "gc": 10}


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_garbage_control_replies_cannot_hang_or_hurt_the_launcher(
    standin: Path, hostile_registry: Registry, canaries: Canaries, host: HostInfo,
    guest_uids: set[int], monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(uml, "MCONSOLE_TIMEOUT", MCONSOLE_TIMEOUT)
    tally = Tally()
    run_cycle("stop", spec_dict(standin, "garbage"), hostile_registry, host, guest_uids, tally)
    canaries.baseline()
    fds = _fds()
    started = time.monotonic()
    cycle = 0
    for scenario, count in CYCLES.items():
        variant = 0
        for _ in range(count):
            cycle += 1
            # each slow variant once, in the stop scenario only
            while variant % 12 in SLOW and (scenario != "stop" or variant >= 12):
                variant += 1
            spec = spec_dict(standin, "garbage", "garbage", variant,
                             shutdown_timeout=GRACEFUL)
            info = run_cycle(scenario, spec, hostile_registry, host, guest_uids, tally,
                             attack_ms=5, stop_limit=STOP_LIMIT)
            check_after_cycle(canaries, hostile_registry, info, scenario, cycle)
            assert _fds() <= fds, f"cycle {cycle} (variant {variant}): the launcher leaks fds"
            variant += 1
    assert tally.total - 1 >= 200
    worst = max(tally.stop_seconds)
    assert worst < STOP_LIMIT
    print(f"garbage: {tally.cycles} in {time.monotonic() - started:.1f} s, "
          f"worst stop {worst:.1f} s, outcomes {tally.outcomes}")


def test_a_trickling_mconsole_cannot_hold_the_ladder(
    standin: Path, hostile_registry: Registry, canaries: Canaries, host: HostInfo,
    guest_uids: set[int], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The stand-in answers cad and halt with ``more`` fragments, one every
    0.2 s (each read well within the per-read limit; 64 of them held one
    command ~13 s, twice per stop), and ignores SIGTERM: the whole ladder
    must still end within its steps' deadlines, through the real launch path."""
    monkeypatch.setattr(uml, "MCONSOLE_TIMEOUT", 1.0)
    limit = GRACEFUL + 2 * 1.0 + 5.0 + 3.0  # cad, halt, SIGTERM's 5 s, SIGKILL
    tally = Tally()
    canaries.baseline()
    spec = spec_dict(standin, "trickle", "trickle", 200, shutdown_timeout=GRACEFUL)
    info = run_cycle("stop", spec, hostile_registry, host, guest_uids, tally,
                     attack_ms=5, stop_limit=limit + 20)
    check_after_cycle(canaries, hostile_registry, info, "stop", 1)
    assert tally.stop_seconds[0] < limit, f"stop took {tally.stop_seconds[0]:.1f} s"
    assert tally.outcomes == {"killed": 1}
