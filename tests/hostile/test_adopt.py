"""Issue 22 item 6: adoption cannot be refused by the guest.

A detached guest's console input is a FIFO in its run directory; the guest
holds the read side.  A guest that closes it left no reader, and the next
supervisor's write-only open failed with ENXIO: the guest could not be
adopted, so neither stopped nor fenced.  Played here in both shapes (QEMU:
console input on stdin; UML: ``con0=fd:N``) at the channel, and end to end
(the end-to-end run with the UML stand-in under a killed supervisor is not
here yet: a detached stand-in did not start in this suite, see the report).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from svirt.launcher.channels import console_fifos

CLOSER = ("import os, sys, time\n"
          "os.close(int(sys.argv[1]))\n"
          "print('closed', flush=True)\n"
          "time.sleep(60)\n")


@pytest.mark.parametrize("shape", ["qemu-stdin", "uml-fd"])
def test_console_fifos_open_after_the_guest_closed_its_input(shape: str) -> None:
    """The guest holds its ends, closes its console input (stdin for QEMU,
    fd 3 for UML), the launcher's copies are gone: the next supervisor still
    opens both FIFOs (the old write-only open: ENXIO), and input it types
    waits in the pipe instead of failing or blocking."""
    run_dir = Path(tempfile.mkdtemp(prefix="svirt-adopt-", dir="/run"))
    try:
        hyp_in, hyp_out, sup_read, sup_write = console_fifos(run_dir, create=True)
        os.close(sup_read)
        os.close(sup_write)
        # QEMU: the input is stdin; UML: con0=fd:N (any fd of its own)
        target = 0 if shape == "qemu-stdin" else hyp_in
        kwargs: dict[str, object] = (
            {"stdin": hyp_in} if target == 0 else {"pass_fds": (hyp_in,)})
        guest = subprocess.Popen([sys.executable, "-I", "-c", CLOSER, str(target)],
                                 stdout=subprocess.PIPE, text=True, **kwargs)  # type: ignore[call-overload]
        try:
            os.close(hyp_in)
            assert guest.stdout is not None and guest.stdout.readline() == "closed\n"
            _, _, sup_read, sup_write = console_fifos(run_dir, create=False)
            try:
                assert os.write(sup_write, b"echo hi\n") == 8  # waits in the pipe
            finally:
                os.close(sup_read)
                os.close(sup_write)
        finally:
            guest.kill()
            guest.wait()
            os.close(hyp_out)
    finally:
        for name in ("console.in", "console.out"):
            (run_dir / name).unlink(missing_ok=True)
        run_dir.rmdir()
