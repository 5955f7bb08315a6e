"""A launcher in its own process, for tests that kill it or run many at once.

    python -m tests.integration.launcher_proc SPEC.toml [RELEASE_FILE]

Launches the guest, waits for its marker, prints one JSON line (name, slot,
labels, hypervisor pid), then waits until RELEASE_FILE exists (or forever)
and stops the guest.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from svirt.launcher.launch import launch
from svirt.spec import load_spec


def main() -> int:
    spec = load_spec(sys.argv[1])
    release = Path(sys.argv[2]) if len(sys.argv) > 2 else None
    with launch(spec) as guest:
        guest.console.expect_line("SVIRT-READY", timeout=300)
        print(json.dumps({"name": guest.name, "slot": guest.record.slot,
                          "labels": guest.labels, "pid": guest.pid}), flush=True)
        while release is None or not release.exists():
            time.sleep(0.1)
        outcome = guest.stop()
    print(json.dumps({"outcome": str(outcome.kind)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
