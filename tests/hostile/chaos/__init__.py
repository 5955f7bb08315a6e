"""The chaos suite (issue 22 item 14): hostile stand-ins of both backend
shapes draw attacks from a catalogue (catalogue.py) while a driver
(runner.py) runs random verbs through the real CLI and checks invariants
(invariants.py) after every step.

    python -m tests.hostile.chaos --steps 10000 --seed S [--all] [--keep-going]

``SVIRT_CHAOS_SEED`` and ``SVIRT_CHAOS_STEPS`` set the seed and the number
of steps of the run in the test suite (test_chaos.py).
"""
