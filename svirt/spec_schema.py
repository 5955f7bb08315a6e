"""``svirt schema``: print the JSON Schema of a spec file, for editors.

The handler the command line calls (``cmd_schema(args)``), kept out of
``cli.py`` so the verb is one line there.  What it prints is
:func:`svirt.spec.schema_text`, the same text as the committed
``svirt/data/spec.schema.json`` (a test keeps the two equal).
"""

from __future__ import annotations

import sys
from typing import IO, Any

from svirt.spec import schema_text


def print_schema(out: IO[str] | None = None) -> int:
    """Write the spec's JSON Schema to ``out`` (stdout); the exit code, 0."""
    (out or sys.stdout).write(schema_text())
    return 0


def cmd_schema(args: Any = None) -> int:
    """The ``svirt schema`` verb (it takes no arguments)."""
    return print_schema()
