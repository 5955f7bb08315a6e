"""Review finding (review-b): the CLI gave up on the supervisor before the
supervisor's own bound: ``svirt kill`` waited 150 s while the supervisor
waited the guest's graceful time + 165 s, and ``stop``/``restart`` 5 s less
than the supervisor's ladder slack; a negative ``--timeout`` shortened the
CLI's wait below the ladder.  A guest whose release is slow then got a
"did not answer" from the CLI instead of the supervisor's reason.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from svirt.service import client, daemon


@pytest.mark.parametrize("timeout", [None, -100.0, 0.0, 7.0, 5000.0])
def test_review_b_cli_waits_at_least_as_long_as_the_supervisor(timeout: Any) -> None:
    entry: Any = SimpleNamespace(spec=SimpleNamespace(shutdown_timeout=600.0))
    stop = daemon._stop_bound(entry, timeout)
    assert client.answer_bound({"op": "stop", "timeout": timeout}) >= stop
    assert (client.answer_bound({"op": "restart", "timeout": timeout})
            >= stop + daemon.LAUNCH_WAIT)
    assert client.answer_bound({"op": "kill", "timeout": timeout}) >= daemon.KILL_WAIT
