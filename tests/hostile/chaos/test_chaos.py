"""The chaos suite in the test suite: a seeded run of SVIRT_CHAOS_STEPS
(default 300) steps, SVIRT_CHAOS_SEED (default 22014) as its seed.

It runs as a process of its own (it enters a mount namespace of its own,
see world.py) and must end without a violation well within its time
budget (4 minutes on a 2-core machine).  A failure prints the seed, the
step, the history and the evidence: replay it with
``SVIRT_CHAOS_SEED=S python -m tests.hostile.chaos --steps N -v``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.hostile.chaos.runner import BOUNDS
from tests.hostile.helpers import ROOT

SEED = int(os.environ.get("SVIRT_CHAOS_SEED") or 22014)
STEPS = int(os.environ.get("SVIRT_CHAOS_STEPS") or 300)
BUDGET = float(os.environ.get("SVIRT_CHAOS_BUDGET") or 240)
#: the budget is looked at between steps: the last one may take its verb's
#: bound (a hang is then a violation with its evidence, not a bare timeout),
#: the teardown a stop --all and two gc
WAIT = BUDGET + max(BOUNDS.values()) + BOUNDS["stop_all"] + 2 * BOUNDS["gc"]


def test_chaos_run() -> None:
    with tempfile.TemporaryDirectory(prefix="svirt-chaos-result-") as tmp:
        result = Path(tmp) / "result.json"
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.hostile.chaos", "--steps", str(STEPS),
             "--seed", str(SEED), "--budget", str(BUDGET), "--json", str(result)],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            out, err = proc.communicate(timeout=WAIT)
        except subprocess.TimeoutExpired:
            proc.terminate()  # its teardown stops the guests and cleans up
            try:
                out, err = proc.communicate(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, err = proc.communicate()
            raise AssertionError(f"the chaos run (seed {SEED}) did not end within "
                                 f"{WAIT:g} s:\n{err[-20000:]}") from None
        print(out + err)
        assert result.exists(), f"the chaos run ended without a result:\n{err[-5000:]}"
        data = json.loads(result.read_text())
    assert not data["violations"], (
        f"chaos: {len(data['violations'])} violation(s), seed {SEED}:\n"
        + err[-20000:])
    assert proc.returncode == 0, err[-5000:]
    assert data["steps"] == STEPS, (f"only {data['steps']} of {STEPS} chaos steps within the "
                                    f"budget of {BUDGET:g} s")
