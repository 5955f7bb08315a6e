"""A ``--timeout`` is a finite number of seconds from 0 to a day: a huge or
non-finite one reached poll()/Event.wait in the shutdown ladder and raised
OverflowError there, so the ladder never ran (found by the hostile review)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from svirt.cli.common import seconds


@pytest.mark.parametrize("text", ["1e308", "inf", "-inf", "nan", "-1", "86401", "soon"])
def test_bad_timeouts_are_refused(text: str) -> None:
    import argparse

    with pytest.raises(argparse.ArgumentTypeError):
        seconds(text)


@pytest.mark.parametrize("text", ["0", "0.5", "30", "86400"])
def test_good_timeouts_are_kept(text: str) -> None:
    assert seconds(text) == float(text)


@pytest.mark.parametrize("verb", [["stop", "web1"], ["restart", "web1"]])
def test_the_cli_refuses_a_huge_timeout_with_a_message(verb: list[str]) -> None:
    done = subprocess.run([sys.executable, "-m", "svirt", *verb, "--timeout", "1e308"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2, done
    assert "a timeout is from 0 to 86400 seconds" in done.stderr
    assert "Traceback" not in done.stderr
