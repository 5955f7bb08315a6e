"""Picking a guest's slot and labels: free here, on the host and in the cluster.

A slot is one integer per running guest; each security driver turns it into
its identity (DAC a uid, SELinux a category pair, SMACK a label) and names
the host-wide claim that identity needs.  :func:`free_slot` scans from the
claims' hint for a slot no record, no object table, no live process and no
claim holds; :func:`pick_labels` asks each driver for a label no one else
holds.  Both run under the registry's lock and the host's
(:meth:`svirt.launcher.registry.Registry.reserve`), which then claims what
they picked.
"""

from __future__ import annotations

import itertools

from svirt.claims.host import ClaimSession
from svirt.errors import SlotsExhausted
from svirt.launcher.record import Record
from svirt.procfs import LiveProcesses
from svirt.security.base import Label
from svirt.security.stack import SecurityStack
from svirt.spec import GuestSpec

MAX_SLOTS = 65_536
STALE_CHECKS = 8  # held claims a slot scan checks for staleness before only counting files
LISTING_AFTER = 64  # held slots in a row before the scan lists the claims directory once

Remembered = list[tuple[int, dict[str, Label]]]  # (slot, labels) objects still remember


def free_slot(stack: SecurityStack, used: set[int], live: LiveProcesses,
               host: ClaimSession, space: str, taken: frozenset[str]) -> int:
    """The first slot from the claims' hint on that no record here, no live
    process and no host-wide claim holds (nor the cluster: ``taken``)."""
    start = host.hint(space) if space else 0
    if not 0 <= start < MAX_SLOTS:
        start = 0
    checks, held = STALE_CHECKS, 0
    for s in itertools.chain(range(start, MAX_SLOTS), range(start)):
        if s in used:
            continue
        keys = stack.slot_claims(s)
        if taken and any(k in taken for k in keys):
            continue  # another host's
        if any(host.exists(k) for k in keys):
            # held, or stale: only the first few are read; past a run of
            # held ones the scan answers from one listing of the directory
            held += 1
            if held == LISTING_AFTER:
                host.list_names()
            if checks <= 0 or not all(host.free(k) for k in keys):
                checks -= 1
                continue
        if not stack.slot_usable(s, live):
            continue
        return s
    raise SlotsExhausted(f"all {MAX_SLOTS} guest slots are in use")


def pick_labels(spec: GuestSpec, stack: SecurityStack, slot: int,
                records: list[Record], remembered: Remembered, live: LiveProcesses,
                host: ClaimSession, taken: frozenset[str]
                ) -> tuple[dict[str, Label], list[str]]:
    """Each driver's label for ``slot``, none a record, an object or a
    host-wide claim holds (nor the cluster: ``taken``); and their claims."""
    held: dict[str, list[Label]] = {}
    for labels in [r.labels for r in records] + [lab for _, lab in remembered]:
        for name, label in labels.items():
            held.setdefault(name, []).append(label)
    return stack.pick_labels(spec, slot, held, live,
                             free=lambda k: k not in taken and host.free(k))
