"""Fake registry records whose supervisor is a live process of ours.

``reconcile`` keeps a record while its supervisor (pid + start time) is
alive, so records pointing at our ``sleep`` processes stay registered for
as long as the bench wants.  They hold no objects and no run directory.
Their registries are removed without a reconcile (releasing thousands of
records would scan /proc once per record for leftover guest processes).
"""

from __future__ import annotations

import uuid
from pathlib import Path

from bench.util import make_temp_dir, run_dir_base
from svirt.launcher.record import Record
from svirt.launcher.registry import Registry
from svirt.procfs import ProcessId
from svirt.security.base import Label
from svirt.security.dac import DacDriver


def fake_registry(tag: str) -> Path:
    return make_temp_dir(f"bench-{tag}-reg-", run_dir_base())


def add_fake_records(root: Path, count: int, supervisors: list[int],
                     first_slot: int = 0) -> None:
    dac = DacDriver()
    reg = Registry(root)
    sups = [ProcessId.of(pid) for pid in supervisors]
    with reg.locked():
        for i in range(count):
            slot = first_slot + i
            uid = dac.uid(slot)
            ids = f"{uid}:{uid}"
            reg.save(Record(
                name=f"fake-{slot:05d}", uuid=str(uuid.uuid4()), backend="uml", slot=slot,
                supervisor=sups[i % len(sups)], labels={"dac": Label("dac", ids, ids, ids, ids)},
                status="running"))
