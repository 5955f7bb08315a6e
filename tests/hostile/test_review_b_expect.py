"""Review finding (review-b): expect() rescans EXPECT_OVERLAP (64 KiB) again
for every wake-up, so a guest that trickles its console one byte per write
makes the supervisor search 64 KiB per byte it writes (~65,000x), under the
GIL that every other guest's pump shares: measured, a one-byte trickle during
a ``--wait-for`` cut another thread's throughput to a third.  Searches must
cost time linear in the output with a small factor, whatever the trickle.

The trickle is played by a thread feeding the real Console the way the pump
does (one feed per read); a counting ``find`` stands in for expect()'s own.
"""

from __future__ import annotations

import threading
import time

from svirt.errors import ConsoleTimeout
from svirt.launcher.console import EXPECT_OVERLAP, Console

SECONDS = 2.0


def test_review_b_trickled_console_is_not_rescanned_per_byte() -> None:
    console = Console("trickle")
    console.feed(b"A" * (256 << 10))  # boot output before the wait
    stop = threading.Event()
    fed = [0]

    def trickle() -> None:
        while not stop.is_set():
            console.feed(b"B")
            fed[0] += 1
            time.sleep(0.0001)

    searches = [0]
    scanned = [0]

    def find(window: bytes, base: int, lo: int) -> None:
        searches[0] += 1
        scanned[0] += len(window)
        window.find(b"SVIRT-READY", lo - base)
        return None

    feeder = threading.Thread(target=trickle, daemon=True)
    feeder.start()
    try:
        console._search(find, EXPECT_OVERLAP, SECONDS, "marker")
    except ConsoleTimeout:
        pass
    finally:
        stop.set()
        feeder.join(5)
    total = (256 << 10) + fed[0]
    # a bound that does not depend on how the guest cuts its output: every
    # byte a few times, plus a search per few milliseconds
    assert scanned[0] <= 8 * total + (SECONDS / 0.005 + 20) * (EXPECT_OVERLAP + 512), (
        f"{searches[0]} searches scanned {scanned[0]} bytes for {fed[0]} trickled bytes")
