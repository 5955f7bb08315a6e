"""Review of issue 24: ``svirt exec``'s ``--timeout`` is "seconds for the
whole exchange", yet stdin (forwarded by default when it is not a terminal)
is read to EOF before the deadline starts (svirt/cli/exec.py:_stdin, called
from cmd_exec): a caller whose stdin is a pipe nobody closes (``ssh host
svirt exec vm -- true``, a supervisor's socket, a script's inherited pipe)
waits forever, against DESIGN.md's "every wait in the CLI has a bound".
"""

from __future__ import annotations

import subprocess
import time

from .test_exec_hostile import NAME, SLACK, SVIRT, Channel, channel  # noqa: F401


def test_review_i24_exec_waits_forever_on_an_open_stdin(channel: Channel) -> None:  # noqa: F811
    channel.scenario[0] = "honest"
    start = time.monotonic()
    proc = subprocess.Popen([SVIRT, "exec", "--timeout", "2", NAME, "--", "true"],  # noqa: S603
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        proc.wait(timeout=2 + SLACK + 5)
    except subprocess.TimeoutExpired:
        proc.kill()  # our own child, by pid
        proc.wait()
        raise AssertionError(f"svirt exec --timeout 2 still waiting on stdin after "
                             f"{time.monotonic() - start:.1f} s") from None
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
