"""A launcher the lab kills with SIGKILL (check ``kill_gc`` of main.py).

Starts a QEMU guest (``kq``, without PR_SET_PDEATHSIG, so that it outlives
the launcher and ``svirt gc`` must kill it) and a UML guest (``ku``, with
it), prints ``READY {json}`` once both showed their marker, then waits to be
killed.  Argument: the UML initramfs; or ``--qemu-only SHARED`` (the SMACK
pass, where UML cannot run): ``kq`` alone, with SHARED as a shared disk.
"""

from __future__ import annotations

import json
import sys
import time
from contextlib import ExitStack
from pathlib import Path

from svirt.launcher.launch import launch
from svirt.launcher.registry import Registry
from svirt.spec import Disk
from tests.lab.inside import common
from tests.lab.inside.main import IMAGES, qemu_spec, uml_spec, wait_marker


def main() -> None:
    registry = Registry()
    with ExitStack() as stack:
        t0 = time.monotonic()
        if sys.argv[1] == "--qemu-only":
            disks = (Disk(IMAGES / "kq.img"), Disk(Path(sys.argv[2]), shared=True))
            guests = [stack.enter_context(launch(qemu_spec("kq", disks=disks),
                                                 registry=registry, pdeathsig=False))]
        else:
            guests = [
                stack.enter_context(launch(qemu_spec("kq"), registry=registry,
                                           pdeathsig=False)),
                stack.enter_context(launch(uml_spec("ku", Path(sys.argv[1])),
                                           registry=registry)),
            ]
        out = {}
        for guest in guests:
            seconds = wait_marker(guest, t0)
            out[guest.name] = {"pid": guest.pid, "context": common.proc_context(guest.pid),
                               "marker_seconds": seconds}
        print("READY " + json.dumps(out), flush=True)
        while True:
            time.sleep(60)


if __name__ == "__main__":
    main()
