"""python -m tests.hostile.chaos [--steps N] [--seed S] [--all] [--keep-going] [--json F]

Runs N chaos steps (default $SVIRT_CHAOS_STEPS or 300) with seed S (default
$SVIRT_CHAOS_SEED or a random one, printed) and prints a summary: steps,
violations, time.  Exit 0 when no invariant was violated.  Must run as root;
it enters a mount namespace of its own (see world.py), so run it as a
process of its own, never imported into another program.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import sys
from pathlib import Path

from tests.hostile.chaos.runner import Chaos, dump, summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.hostile.chaos")
    p.add_argument("--steps", type=int, default=int(os.environ.get("SVIRT_CHAOS_STEPS", "300")))
    p.add_argument("--seed", type=int,
                   default=int(os.environ.get("SVIRT_CHAOS_SEED") or random.randrange(1 << 31)))  # noqa: S311
    p.add_argument("--all", action="store_true",
                   help="also the primitives and invariants known open (catalogue.KNOWN_OPEN)")
    p.add_argument("--keep-going", action="store_true",
                   help="go on after a violation (each distinct one is reported once)")
    p.add_argument("--primitives", help="draw only these (comma-separated catalogue names; "
                   "implies --all for them)")
    p.add_argument("-v", "--verbose", action="store_true", help="print every step")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds: take no new step after this long (the summary says how "
                        "many were taken)")
    p.add_argument("--json", type=Path, help="write the result here")
    args = p.parse_args(argv)
    def interrupted(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # the run's finally: stop every guest, clean up

    signal.signal(signal.SIGTERM, interrupted)
    if os.geteuid() != 0:
        print("chaos: must run as root (guests get uids of their own)", file=sys.stderr)
        return 2
    only = args.primitives.split(",") if args.primitives else None
    result = Chaos(args.seed, args.steps, include_open=args.all or bool(only), only=only,
                   keep_going=args.keep_going, verbose=args.verbose,
                   budget=args.budget).run()
    print(summary(result), flush=True)
    if args.json:
        dump(result, args.json)
    return 1 if result.violations else 0


if __name__ == "__main__":
    sys.exit(main())
